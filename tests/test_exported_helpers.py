"""Direct tests of exported helpers that the other tests reach only through their callers:
each checks what its docstring promises on a tiny case (values, or the refusal message)."""

import copy
import math
import os
import socket
import stat
import types
from collections import OrderedDict

import pytest
import torch
from _moe import routed_ffn
from torch import nn

import sparsekit
from sparsekit._atomic import special_kind, sync_directory
from sparsekit.activation.layers import find_layers
from sparsekit.activation.scores import feature_threshold, score
from sparsekit.allocation import ALLOCATIONS
from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.engine.formats.csr import csr_parts
from sparsekit.engine.formats.index16 import narrow_index, unsigned_index
from sparsekit.moe.distillation import training_inputs
from sparsekit.sae import SAE
from sparsekit.sae.capture import find_module
from sparsekit.scores._context import ScoreContext
from sparsekit.structured.dependency import Group, Slice
from sparsekit.structured.importance import channel_masks, powered, score_part
from sparsekit.structured.transformer import block_group, transformer_blocks
from sparsekit.targets import resolve_targets

# -- activation: find_layers, feature_threshold ----------------------------------------------


class _Decoder(nn.Module):
    """Names as in a Hugging Face decoder: an embedding, a gated MLP, a norm, the head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(4, 8), "up_proj": nn.Linear(4, 8),
                                  "down_proj": nn.Linear(8, 4)})
        self.norm = nn.LayerNorm(4)
        self.lm_head = nn.Linear(4, 10)


def test_find_layers_defaults_per_method_and_targets_in_definition_order():
    model = _Decoder()
    mlp = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    for method in ("teal", "wina"):  # every nn.Linear but the output head
        layers = find_layers(model, method)
        assert list(layers) == mlp
        assert all(layers[n] is model.get_submodule(n) for n in mlp)
    assert list(find_layers(model, "cats")) == ["mlp.down_proj"]  # the down projections only
    # targets replace the default (the head too), in definition order whatever their order
    assert list(find_layers(model, "teal", ["lm_head", "mlp.up_proj"])) == ["mlp.up_proj",
                                                                           "lm_head"]
    assert list(find_layers(model, "cats", "mlp.*")) == mlp


def test_find_layers_refusals():
    model = _Decoder()
    for target, kind in (("embed", "Embedding"), ("norm", "LayerNorm")):
        with pytest.raises(ValueError, match=rf"targets: \{{'{target}': '{kind}'\}} are not "
                                             r"nn.Linear layers"):
            find_layers(model, "teal", target)
    with pytest.raises(ValueError, match=r"targets: the model has no nn.Linear modules named "
                                         r"'\*down_proj' .* for method='cats'"):
        find_layers(nn.Sequential(nn.Linear(2, 2)), "cats")
    head_only = nn.Module()
    head_only.lm_head = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"targets: the model has no nn.Linear modules among "
                                         r"targets=None for method='teal'"):
        find_layers(head_only, "teal")


def test_feature_threshold_values():
    weight = torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, 0.0]])  # column norms 5, 0, 1
    wina = feature_threshold("wina", 2.0, weight)
    assert wina.dtype == torch.float32 and wina.shape == (3,)
    torch.testing.assert_close(wina, torch.tensor([0.4, math.inf, 2.0]))  # inf: zero column
    for method in ("teal", "cats"):  # |x| itself is the score
        torch.testing.assert_close(feature_threshold(method, 2.0, weight),
                                   torch.full((3,), 2.0))
    # float32 for a 16-bit weight too
    half = feature_threshold("wina", 2.0, weight.bfloat16())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, torch.tensor([0.4, math.inf, 2.0]))
    for threshold in (0.0, -1.0):  # every input kept
        assert torch.equal(feature_threshold("wina", threshold, weight), torch.zeros(3))


def test_feature_threshold_is_the_score_threshold_on_abs_x():
    weight = torch.tensor([[3.0, 0.0, 1.0], [4.0, 0.0, 0.0]])
    x = torch.tensor([[0.5, 7.0, 2.5], [0.3, 1.0, 1.5], [-0.41, -9.0, -1.9]])
    for method in ("teal", "wina", "cats"):
        kept_by_score = score(method, x, weight) >= 2.0
        kept_by_threshold = x.abs() >= feature_threshold(method, 2.0, weight)
        assert torch.equal(kept_by_score, kept_by_threshold), method
    assert torch.equal(x.abs() >= feature_threshold("wina", 2.0, weight),
                       torch.tensor([[True, False, True], [False, False, False],
                                     [True, False, False]]))


# -- sae: find_module, SAE.activate ---------------------------------------------------------


def test_find_module_returns_the_submodule_or_names_close_matches():
    model = nn.Sequential(OrderedDict(encoder=nn.Linear(2, 2), decoder=nn.Linear(2, 2)))
    assert find_module(model, "encoder") is model.encoder
    assert find_module(model, "") is model
    with pytest.raises(ValueError, match=r"^module_name 'encoderr' is not a module of the "
                                         r"model; did you mean 'encoder'"):
        find_module(model, "encoderr")
    with pytest.raises(ValueError, match=r"^target 'zzz' is not a module of the model$"):
        find_module(model, "zzz", "target")
    with pytest.raises(ValueError, match=r"^module_name 3 is not a module of the model"):
        find_module(model, 3)
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        find_module({"encoder": model.encoder}, "encoder")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"model: 0.weight is on the meta device"):
        find_module(meta, "0")


def test_sae_activate_applies_the_registered_activation_densely():
    pre = torch.tensor([[3.0, -1.0, 2.0, 5.0], [-1.0, -2.0, -3.0, -4.0]])
    with torch.no_grad():
        topk = SAE(4, 4, "topk", k=2).activate(pre)  # k largest, ReLU'd
        assert torch.equal(topk, torch.tensor([[3.0, 0, 0, 5], [0, 0, 0, 0]]))
        abstopk = SAE(4, 4, "abstopk", k=2).activate(pre)  # k largest magnitudes, signed
        assert torch.equal(abstopk, torch.tensor([[3.0, 0, 0, 5], [0, 0, -3, -4]]))
        assert torch.equal(SAE(4, 4, "l1").activate(pre), pre.relu())
        jump = SAE(4, 4, "jumprelu", threshold=0.5).activate(
            torch.tensor([[0.4, 0.6, -1.0, 2.0]]))
        torch.testing.assert_close(jump, torch.tensor([[0.0, 0.6, 0.0, 2.0]]))
        batch = SAE(4, 4, "batchtopk", k=1)
        pre2 = torch.tensor([[3.0, 1.0, -1.0, 0.5], [2.0, 0.1, 0.2, 0.3]])
        # training: the k · rows = 2 largest of the whole batch
        assert torch.equal(batch.train().activate(pre2),
                           torch.tensor([[3.0, 0, 0, 0], [2.0, 0, 0, 0]]))
        # inference: a JumpReLU at the learned threshold (0 before any training)
        assert torch.equal(batch.eval().activate(pre2), pre2.relu())
        # any leading shape, codes of the same shape
        assert SAE(4, 4, "topk", k=2).activate(torch.randn(2, 3, 4)).shape == (2, 3, 4)


# -- moe: training_inputs, RoutedFFN.reader_norms -------------------------------------------


def test_training_inputs_keeps_the_non_empty_batches_after_checking_lr_and_seed():
    x, empty = torch.ones(2, 3), torch.zeros(0, 3)
    got = training_inputs([x, empty, 2 * x], 1e-3, 0)
    assert len(got) == 2 and got[0] is x and torch.equal(got[1], 2 * x)
    assert training_inputs(x, 1e-3, 0)[0] is x and len(training_inputs(x, 1e-3, 0)) == 1
    assert training_inputs(None, 1e-3, 0, required=False) == []
    with pytest.raises(ValueError, match="data must be a tensor of inputs or a list of them, "
                                         "got None"):
        training_inputs(None, 1e-3, 0)
    with pytest.raises(ValueError, match=r"data holds no \(non-empty\) batches"):
        training_inputs([empty], 1e-3, 0)
    with pytest.raises(ValueError, match=r"lr must be a positive finite float, got 0.0"):
        training_inputs(x, 0.0, 0)
    with pytest.raises(ValueError, match=r"lr must be a positive finite float, got nan"):
        training_inputs(None, math.nan, 0, required=False)  # checked without data too
    with pytest.raises(TypeError, match=r"lr must be a positive finite float, got '1'"):
        training_inputs(x, "1", 0)
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*63 - 1\], got -1"):
        training_inputs(x, 1e-3, -1)


def test_routed_ffn_reader_norms_are_the_reader_column_norms():
    reader = torch.tensor([[3.0, 0.0, 1.0, 0.0], [4.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    layer = routed_ffn(4, 3, 2, 2, w_out=reader)
    norms = layer.reader_norms()
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.tensor([5.0, 2.0, 1.0, 0.0]))
    assert torch.equal(layer.norms, norms)  # what the buffer holds
    # stored in the layer's neuron order
    permuted = routed_ffn(4, 3, 2, 2, w_out=reader, order=torch.tensor([1, 0, 3, 2]))
    torch.testing.assert_close(permuted.reader_norms(), torch.tensor([2.0, 5.0, 0.0, 1.0]))
    # from the current weights: an int8 reader's dequantized, a bfloat16 one's in float32
    codes = torch.tensor([[3, 0, 1, 0], [4, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.int8)
    layer.w_out = ActivationSparseLinear(codes, None, 0.0, scales=torch.tensor([1.0, 1.0, 2.0]))
    torch.testing.assert_close(layer.reader_norms(), torch.tensor([5.0, 2.0, 1.0, 0.0]))
    layer.w_out = ActivationSparseLinear(2 * reader.bfloat16(), None, 0.0)
    norms = layer.reader_norms()
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, torch.tensor([10.0, 4.0, 2.0, 0.0]))


# -- structured: transformer_blocks, block_group, channel_masks, powered, score_part ---------


def _llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_transformer_blocks_and_block_group_on_llama():
    model = _llama()
    prefix, blocks = transformer_blocks(model)
    assert prefix == "model.layers" and blocks is model.model.layers
    name = "model.layers.1"
    ffn = block_group(name, blocks[1], "ffn")  # a neuron: a row of gate/up, a column of down
    assert ffn == Group(f"{name}.ffn", 64, (
        Slice(f"{name}.mlp.gate_proj.weight", 0, "out"),
        Slice(f"{name}.mlp.up_proj.weight", 0, "out"),
        Slice(f"{name}.mlp.down_proj.weight", 1, "in")))
    # 2 key/value heads of head_dim 8, each read by 2 query heads (16 q rows, 16 o columns)
    heads = block_group(name, blocks[1], "heads")
    assert heads == Group(f"{name}.heads", 2, (
        Slice(f"{name}.self_attn.q_proj.weight", 0, "out", 0, 16),
        Slice(f"{name}.self_attn.k_proj.weight", 0, "out", 0, 8),
        Slice(f"{name}.self_attn.v_proj.weight", 0, "out", 0, 8),
        Slice(f"{name}.self_attn.o_proj.weight", 1, "in", 0, 16)))


def test_transformer_blocks_and_block_group_refusals():
    with pytest.raises(ValueError, match="model: Linear has no list of transformer blocks"):
        transformer_blocks(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"unit 'ffn': block 'b' \(Linear\) has no "
                                         r"feed-forward network this knows"):
        block_group("b", nn.Linear(2, 2), "ffn")
    with pytest.raises(ValueError, match=r"unit 'heads': block 'b' \(Linear\) has no "
                                         r"attention this knows"):
        block_group("b", nn.Linear(2, 2), "heads")
    model = _llama()
    block = model.model.layers[0]
    with pytest.raises(ValueError, match=r"unknown unit 'ffns'; accepted: 'ffn', 'heads'"):
        block_group("model.layers.0", block, "ffns")  # was taken for "heads"
    block = copy.deepcopy(block)
    block.mlp.down_proj = nn.Identity()
    with pytest.raises(ValueError, match=r"unit 'ffn': model.layers.0.mlp.down_proj must be an "
                                         r"nn.Linear, got Identity"):
        block_group("model.layers.0", block, "ffn")


def _two_layers() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1, 1, 1], [0.1, 0.1, 0.1, 0.1], [2, 2, 2, 2]]))
        model[2].weight.copy_(torch.tensor([[1.0, 0.1, 1], [1, 0.1, 1]]))
    return model


def test_channel_masks_remove_the_least_important_channel_from_writer_and_reader():
    model = _two_layers()
    targets = resolve_targets(model)  # 0.weight and 2.weight
    scores = {t.name: t.param.detach().abs() for t in targets}
    group = Group("0", 3, (Slice("0.weight", 0, "out"), Slice("0.bias", 0, "out"),
                           Slice("2.weight", 1, "in")))
    # importance: channel 0 (3 + 2) / 6, channel 1 (0.4 + 0.2) / 6, channel 2 (8 + 2) / 6
    uniform = ALLOCATIONS.get("uniform")
    masks = channel_masks(model, targets, scores, uniform, 0.34, [group])
    assert set(masks) == {"0.weight", "2.weight"}  # the bias is no target
    assert torch.equal(masks["0.weight"], torch.tensor([[False, True, True, True],
                                                        [False, False, False, False],
                                                        [True, True, True, True]]))
    assert torch.equal(masks["2.weight"], torch.tensor([[True, False, True]] * 2))
    # groups default to the model's dependency groups: the same one here
    traced = channel_masks(model, targets, scores, uniform, 0.34)
    assert all(torch.equal(traced[n], masks[n]) for n in masks)
    # a group whose reader is no target is left alone: its writer keeps every channel
    first = resolve_targets(model, "0")
    alone = channel_masks(model, first, {"0.weight": scores["0.weight"]}, uniform, 0.34,
                          [group])
    assert torch.equal(alone["0.weight"], model[0].weight != 0)


def test_channel_masks_refuses_a_bad_round_to():
    model = _two_layers()
    targets = resolve_targets(model)
    with pytest.raises(ValueError, match="round_to must be an int ≥ 1, got 0"):
        channel_masks(model, targets, {}, ALLOCATIONS.get("uniform"), 0.5, round_to=0)


def test_powered():
    torch.testing.assert_close(powered("w", torch.tensor([[4.0], [9.0]]), 0.5),
                               torch.tensor([[2.0], [3.0]]))
    assert torch.equal(powered("w", torch.tensor([-2.0, 3.0]), 2), torch.tensor([4.0, 9.0]))
    with pytest.raises(ValueError, match=r"scores\['w'\] has negative mean scores \(down to "
                                         r"-2\), which power=0.5 turns into NaN"):
        powered("w", torch.tensor([-2.0, 3.0]), 0.5)


def test_score_part_reads_the_groups_entries_in_float64():
    group = Group("g", 2, (Slice("w", 1, "in", 1, 2),))  # columns 1..4 of "w"
    s = group.slices[0]
    expected = torch.tensor([[1.0, 7.0], [2.0, 8.0], [3.0, 9.0], [4.0, 10.0]],
                            dtype=torch.float64)
    for scores in (torch.arange(12.0).view(2, 6), torch.arange(12).view(2, 6),
                   torch.arange(12.0).view(2, 6).to_sparse()):
        part = score_part(group, s, scores)
        assert part.dtype == torch.float64 and torch.equal(part, expected)
    outside = torch.arange(12.0).view(2, 6)
    outside[:, 0] = outside[:, 5] = math.nan  # entries of no channel are not read
    assert torch.equal(score_part(group, s, outside), expected)


def test_score_part_refusals():
    group = Group("g", 2, (Slice("w", 1, "in", 1, 2),))
    s = group.slices[0]
    with pytest.raises(ValueError, match=r"scores\['w'\] does not fit group 'g': it needs 5 "
                                         r"entries along dim 1, got shape \(2, 4\)"):
        score_part(group, s, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"it needs 5 entries along dim 1, got a list"):
        score_part(group, s, [[0.0] * 6] * 2)
    with pytest.raises(ValueError, match=r"scores\['w'\] must be a real tensor, got dtype "
                                         r"torch.bool"):
        score_part(group, s, torch.ones(2, 6, dtype=torch.bool))
    bad = torch.zeros(2, 6)
    bad[1, 3] = math.inf
    with pytest.raises(ValueError, match=r"scores\['w'\] holds inf for channels of group 'g'"):
        score_part(group, s, bad)
    with pytest.raises(ValueError, match=r"scores\['w'\] is on the meta device"):
        score_part(group, s, torch.zeros(2, 6, device="meta"))


# -- engine formats: narrow_index, unsigned_index, csr_parts ---------------------------------


def test_narrow_and_unsigned_index_round_trip():
    index = torch.tensor([0, 1, 32767, 32768, 65535])
    narrow = narrow_index(index, 65536)
    assert narrow.dtype == torch.int16
    assert narrow.tolist() == [0, 1, 32767, -32768, -1]
    wide = unsigned_index(narrow)  # read back as uint16
    assert wide.dtype == torch.int64 and torch.equal(wide, index)
    big = narrow_index(torch.tensor([0, 65535, 65536, 70000]), 70001)  # past 16 bits: int32
    assert big.dtype == torch.int32 and big.tolist() == [0, 65535, 65536, 70000]
    back = unsigned_index(big)
    assert back.dtype == torch.int64 and back.tolist() == [0, 65535, 65536, 70000]
    assert unsigned_index(torch.tensor([-1], dtype=torch.int16)).tolist() == [65535]


def test_csr_parts():
    weight = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [3.0, 0.0, 4.0]])
    rowptr, col, values = csr_parts(weight)
    assert rowptr.dtype == col.dtype == torch.int32
    assert rowptr.tolist() == [0, 1, 1, 3] and col.tolist() == [1, 0, 2]
    assert values.tolist() == [2.0, 3.0, 4.0] and values.dtype == torch.float32
    rowptr, col, values = csr_parts(torch.zeros(2, 3))
    assert rowptr.tolist() == [0, 0, 0] and col.numel() == values.numel() == 0
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(6, 9, generator=g) * (torch.rand(6, 9, generator=g) < 0.4)
    reference = dense.to_sparse_csr()
    rowptr, col, values = csr_parts(dense)
    assert torch.equal(rowptr.long(), reference.crow_indices())
    assert torch.equal(col.long(), reference.col_indices())
    assert torch.equal(values, reference.values())


# -- finetune: MaskedMerge ------------------------------------------------------------------


def test_masked_merge_adds_and_subtracts_the_masked_update():
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import sparse_lora
    from sparsekit.finetune.lora import MASK_NAME, MaskedMerge

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4))
    keep = sparsekit.prune(model, 0.5).masks["0.weight"].clone()
    lora = sparse_lora(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                              init_lora_weights=False))
    layer = next(m for m in lora.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    assert torch.equal(getattr(layer, MASK_NAME), keep)
    with torch.no_grad():
        base = layer.get_base_layer().weight.detach().clone()
        delta = layer.get_delta_weight("default")  # s·B@A, dense
        assert bool((delta[~keep] != 0).any())
        masked = torch.where(keep, delta, torch.zeros(()))
        merged = MaskedMerge.merge_safe(layer, "default", base.clone())
        torch.testing.assert_close(merged, base + masked)
        assert bool((merged[~keep] == 0).all())  # the pruned weights stay zero
        torch.testing.assert_close(MaskedMerge.unmerge(layer, "default", merged), base)
        in_place = base.clone()
        assert MaskedMerge.merge_unsafe(layer, "default", in_place) is None
        torch.testing.assert_close(in_place, base + masked)
        wide = MaskedMerge.merge_safe(layer, "default", base.double())  # the weight's dtype
        assert wide.dtype == torch.float64
        torch.testing.assert_close(wide, base.double() + masked.double())


# -- integrations: SparsityCallback.on_exception, teardown ----------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))


def _trainer(optimizer: torch.optim.Optimizer) -> types.SimpleNamespace:
    """What SparsityCallback reads of a Trainer when training starts."""
    return types.SimpleNamespace(optimizers=[optimizer], global_step=0)


def test_lightning_on_exception_lets_go_of_the_optimizer():
    pytest.importorskip("lightning.pytorch")
    from sparsekit.integrations.lightning import SparsityCallback

    model = _mlp()
    gradual = sparsekit.GradualPruner(model, 0.5, start_step=0, end_step=4, every=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = SparsityCallback(gradual)
    first.on_train_start(_trainer(optimizer), model)
    assert optimizer._optimizer_step_post_hooks
    again = SparsityCallback(gradual)
    retry = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="is attached already"):
        again.on_train_start(_trainer(retry), model)
    first.on_exception(_trainer(optimizer), model, RuntimeError("boom"))
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    again.on_train_start(_trainer(retry), model)  # no longer refused
    assert again.schedule is gradual


@pytest.mark.parametrize("torn_down", [False, True])
def test_lightning_teardown_drops_a_checkpoint_state_no_training_took(torn_down):
    pytest.importorskip("lightning.pytorch")
    from sparsekit.integrations.lightning import SparsityCallback

    model = _mlp()
    checkpoint = {"sparsity": sparsekit.prune(copy.deepcopy(model), 0.75).state_dict()}
    masks = sparsekit.prune(model, 0.5)
    callback = SparsityCallback(masks)
    callback.load_state_dict(checkpoint)  # as validate(ckpt_path=...) does
    if torn_down:
        callback.teardown(None, model, "validate")
    callback.on_train_start(_trainer(torch.optim.SGD(model.parameters(), lr=0.1)), model)
    # without teardown the next fit resumes from the checkpoint's masks
    assert masks.sparsity() == pytest.approx(0.5 if torn_down else 0.75, abs=0.02)


# -- scores: ScoreContext -------------------------------------------------------------------


def _context(data=None, targets=None) -> ScoreContext:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    return ScoreContext(model, resolve_targets(model, targets), data)


def test_score_context_require_data():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    empty = torch.zeros(0, 3)
    with pytest.raises(ValueError, match="criterion 'wanda' needs data="):
        _context().require_data("wanda", labels=False)
    with pytest.raises(ValueError, match="data for criterion 'wanda' holds no batches"):
        _context([]).require_data("wanda", labels=False)
    with pytest.raises(ValueError, match=r"data for criterion 'wanda' holds no rows: its 2 "
                                         r"batch\(es\) of inputs are all empty"):
        _context([empty, empty]).require_data("wanda", labels=False)
    with pytest.raises(ValueError, match="criterion 'snip' needs labels: pass data as "
                                         r"\(inputs, labels\) batches"):
        _context(x).require_data("snip", labels=True)
    (batch,) = _context(x).require_data("wanda", labels=False)
    assert batch[0] is x and batch[1] is None
    got = _context([(x, y), (empty, y[:0])]).require_data("snip", labels=True)  # empty dropped
    assert len(got) == 1 and got[0][0] is x and got[0][1] is y


def test_score_context_require_grad_and_layer_weights():
    ctx = _context()
    ctx.require_grad("snip")  # every target takes a gradient: no error
    ctx.require_layer_weights("wanda")
    ctx.model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"criterion 'snip' differentiates the loss with "
                                         r"respect to every target, but \['0.weight'\] have "
                                         r"requires_grad=False"):
        ctx.require_grad("snip")
    with pytest.raises(ValueError, match=r"criterion 'wanda' scores Linear/Conv1D/Conv weights "
                                         r"only; target '0.bias' is not one"):
        _context(targets="0.bias").require_layer_weights("wanda")


def test_score_context_rank_share_and_outputs():
    x = torch.randn(4, 3)
    ctx = _context(x)
    data = ctx.require_data("wanda", labels=False)
    assert ctx.rank_share(data) is data  # one process: every batch
    with torch.no_grad():
        torch.testing.assert_close(ctx.outputs(x), ctx.model(x))
    with pytest.raises(ValueError, match="data: the model cannot run on the inputs of a batch"):
        ctx.outputs(torch.randn(4, 5))


# -- _atomic: special_kind, sync_directory ----------------------------------------------------


def test_special_kind(tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    assert special_kind(regular) is None
    assert special_kind(tmp_path) is None
    assert special_kind(tmp_path / "missing") is None
    assert special_kind("bad\0name") is None  # a name stat refuses
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert special_kind(loop) is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert special_kind(fifo) == "FIFO"
    link = tmp_path / "link"
    link.symlink_to(fifo)
    assert special_kind(str(link)) == "FIFO"  # links followed
    assert special_kind(os.devnull) == "character device"  # read with stat only
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        assert special_kind(tmp_path / "sock") == "socket"


def test_sync_directory_fsyncs_the_directory_and_closes_it(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd: int) -> None:
        synced.append((fd, stat.S_ISDIR(os.fstat(fd).st_mode)))
        real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    sync_directory(tmp_path)
    assert [is_dir for _, is_dir in synced] == [True]
    with pytest.raises(OSError):
        os.fstat(synced[0][0])  # closed again

    def failing(fd: int) -> None:
        synced.append((fd, True))
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", failing)
    with pytest.raises(OSError, match="I/O error"):
        sync_directory(tmp_path)
    with pytest.raises(OSError):
        os.fstat(synced[-1][0])  # closed on the error too
    monkeypatch.setattr(os, "fsync", real)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        sync_directory(tmp_path / "file")
