"""Hostile inputs, round 26.

- A compiled layer took the input dtypes of the format autotuning chose: the native
  formats computed a float16 or float64 input in float32 (returning float32) and took
  bfloat16, ``dense`` and ``torch_csr`` refused all three. One model took a bfloat16 token
  and refused the bfloat16 prompt (two formats), or took it on one machine and refused it
  on another. Every compiled layer now takes its replaced layer's dtype only, as that
  layer did, and names it; candidates timed while compiling a float32 layer to bfloat16
  values take float32, as the compiled layer does.
"""

from __future__ import annotations

import math

import pytest
import torch
from _kernels import needs_kernels
from _llama import tiny_llama
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear
from sparsekit.engine.compiled_conv import CompiledConv2d

pytestmark = [needs_kernels, pytest.mark.usefixtures("one_thread")]

OTHER_DTYPES = [torch.bfloat16, torch.float16, torch.float64]


def _pruned() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    with torch.no_grad():
        layer.weight[:, 1::2] = 0
    return layer


@pytest.mark.parametrize("dtype", OTHER_DTYPES)
@pytest.mark.parametrize("fmt", ["dense", "torch_csr", "bitmap", "csr16", "fanin"])
def test_every_format_refuses_what_the_replaced_layer_refused(fmt, dtype):
    layer = CompiledLinear.from_linear(_pruned(), fmt)
    with pytest.raises(TypeError, match=rf"x must be torch.float32 \(the dtype of the layer "
                                        rf"this 48x64 compiled layer replaces.*got {dtype}"):
        layer(torch.randn(3, 64, dtype=dtype))
    assert layer(torch.randn(3, 64)).dtype == torch.float32


@pytest.mark.parametrize("dtype", OTHER_DTYPES)
def test_a_layer_of_two_formats_refuses_alike_at_one_row_and_at_many(dtype):
    linear = _pruned()
    small, large = (CompiledLinear.from_linear(linear, f).format for f in ("bitmap", "dense"))
    layer = CompiledLinear(small, linear.bias, format_large=large, split=1)
    layer.io_dtype = torch.float32
    for rows in (1, 8):
        with pytest.raises(TypeError, match=rf"x must be torch.float32 .*got {dtype}"):
            layer(torch.randn(rows, 64, dtype=dtype))


def test_a_cast_layer_takes_its_new_dtype_and_a_bare_one_its_formats():
    layer = CompiledLinear.from_linear(_pruned(), "bitmap").to(torch.bfloat16)
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"x must be torch.bfloat16 .*got torch.float32"):
        layer(torch.randn(2, 64))
    bare = CompiledLinear(layer.format)  # built from a format alone: the format's own rule
    assert bare(torch.randn(2, 64)).dtype == torch.float32


@pytest.mark.parametrize("fmt", ["dense", "bitmap", "csr16"])
def test_compiled_convolutions_refuse_bfloat16_in_every_format(fmt):
    conv = nn.Conv2d(3, 4, 3)
    layer = CompiledConv2d.from_conv2d(conv, fmt)
    with pytest.raises(ValueError, match=rf"x must be float32 for this {fmt} weight, got "
                                         r"bfloat16"):
        layer(torch.randn(1, 3, 5, 5, dtype=torch.bfloat16))


def test_compiling_float32_layers_to_bfloat16_values_times_float32_inputs():
    model = nn.Sequential(_pruned(), nn.ReLU(), nn.Linear(48, 8))
    x = torch.randn(4, 64)
    compiled = sparsekit.compile(model, (x,), weight_dtype="bf16", formats=("bitmap",))
    assert compiled(x).dtype == torch.float32
    assert torch.allclose(compiled(x), model(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("task", ["BertForSequenceClassification", "BertForMaskedLM"])
def test_activation_sparsity_leaves_task_heads_not_named_lm_head_dense(task):
    """The default layers left out only a module named ``lm_head``: BERT's classifier and
    its masked-LM decoder (the model's output embeddings) were thresholded."""
    transformers = pytest.importorskip("transformers")
    from sparsekit import activation

    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=2, num_labels=3)
    model = getattr(transformers, task)(config).eval()
    layers = activation.layers.find_layers(model, "teal")
    assert layers and all(name.startswith("bert.encoder.") or name == "bert.pooler.dense"
                          for name in layers)
    llama = tiny_llama()
    assert "lm_head" not in activation.layers.find_layers(llama, "teal")
    assert len(activation.layers.find_layers(llama, "teal")) == 7


def _srigl_run(model, steps, state=None):
    from sparsekit.schedules import DynamicSparsity

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    schedule = DynamicSparsity(model, optimizer, 0.8, method="srigl", every=3, end_step=11,
                               allocation="uniform")
    if state is not None:
        schedule.load_state_dict(state[0])
        optimizer.load_state_dict(state[1])
    for i in steps:
        g = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(8, 10, generator=g), torch.randint(0, 4, (8,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        schedule.step()
    return schedule, optimizer


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(),
                         nn.Linear(24, 4))


def test_srigl_resumes_exactly_when_the_checkpoint_is_loaded_before_the_schedule(tmp_path):
    """SRigL's starting mask was drawn among all weights with a budget counted on the
    nonzero ones: built on a model loaded from a checkpoint, it zeroed kept weights (some
    grown weights were still 0), and the resumed run drifted from the uninterrupted one."""
    whole = _mlp()
    _srigl_run(whole, range(10))
    first = _mlp()
    schedule, optimizer = _srigl_run(first, range(6))
    sparsekit.save(first, tmp_path / "ck.safetensors", schedule.masks)
    state = (schedule.state_dict(), optimizer.state_dict())
    resumed = _mlp()
    sparsekit.load(resumed, tmp_path / "ck.safetensors")
    _srigl_run(resumed, range(6, 10), state)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_a_failed_save_pretrained_leaves_the_earlier_generation_config(tmp_path, monkeypatch):
    """The generation config was written in place before the config: a save that failed
    after it left the earlier model with the new generation settings."""
    from sparsekit import pretrained

    model = tiny_llama(hidden_size=16, intermediate_size=32)
    sparsekit.save_pretrained(model, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    model.generation_config.max_length = 7

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pretrained, "_write_config", full)
    with pytest.raises(OSError, match="No space left"):
        sparsekit.save_pretrained(model, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries
    monkeypatch.undo()
    sparsekit.save_pretrained(model, tmp_path)
    assert sparsekit.from_pretrained(tmp_path).generation_config.max_length == 7


@pytest.mark.parametrize("unit", ["ffn", "heads"])
def test_uniform_structured_pruning_keeps_one_width_whatever_the_amount(unit, tmp_path):
    """amount=0.3 of 128 neurons (89.6) gave blocks 90 and 89, and of two key/value
    heads (1.4) 2 and 1: the blocks differed, so plain from_pretrained failed on the model
    the README says it loads. Each block now keeps the uniform count rounded."""
    transformers = pytest.importorskip("transformers")
    from sparsekit import llm

    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.Qwen2ForCausalLM(config).eval()
    llm.prune_structured(model, None, 0.3, unit=unit, method="magnitude")
    widths = {(b.mlp.up_proj.out_features, b.self_attn.k_proj.out_features)
              for b in model.model.layers}
    assert widths == ({(90, 16)} if unit == "ffn" else {(128, 8)})
    model.save_pretrained(tmp_path)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_llm_prune_refuses_experts_it_cannot_prune_and_prunes_linear_targets_on_request():
    """Mixtral's experts are 3-D tensors in transformers 5, no Linear layers: llm.prune
    pruned the attention alone (5.5 % of the block weights) and the masks reported 0.5."""
    transformers = pytest.importorskip("transformers")
    from sparsekit import llm

    config = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, num_local_experts=4)
    model = transformers.MixtralForCausalLM(config).eval()
    experts = [(n, p) for n, p in model.named_parameters() if ".experts." in n]
    if not experts or experts[0][1].dim() != 3:
        pytest.skip("this transformers stores Mixtral's experts as Linear layers")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"hold weights that are no Linear layer \(model\.layers"
                                         r"\.0\.mlp\.gate\.weight \(4, 32\), .*experts\.gate_up_"
                                         r"proj .*mixture-of-experts .*targets="):
        llm.prune(model, ids, sparsity=0.5, method="magnitude")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    masks = llm.prune(model, ids, sparsity=0.5, method="magnitude", targets=[nn.Linear])
    assert set(masks.masks) == {n for n in before if "self_attn" in n and "weight" in n}


def test_encoder_decoder_models_are_refused_by_name():
    """T5: the decoder's blocks were found and calibrated on token ids alone, and
    llm.prune failed with transformers' "You must specify exactly one of input_ids or
    inputs_embeds", blaming the calibration data."""
    transformers = pytest.importorskip("transformers")
    from sparsekit import llm

    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=4)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with pytest.raises(ValueError, match=r"T5ForConditionalGeneration is an encoder-decoder "
                                         r"model.*not supported; accepted: decoder and encoder"):
        llm.prune(model, torch.randint(0, 64, (2, 8)), method="magnitude")


def test_nm_masks_refuse_widths_whose_groups_would_run_across_rows():
    """``parse_pattern("2:4").mask`` on 2x6 scores grouped the flattened tensor: one group
    spanned two rows, keeping 2 and 4 of their 6 inputs, and ``is_valid`` said True."""
    from sparsekit import parse_pattern

    nm = parse_pattern("2:4")
    with pytest.raises(ValueError, match=r"pattern '2:4' needs the input dimension of 'scores' "
                                         r"to be a multiple of 4; .*\(2, 6\)"):
        nm.mask(torch.randn(2, 6), 6)
    assert not nm.is_valid(torch.tensor([[0, 0, 1, 1, 0, 0], [1, 1, 0, 0, 1, 1]]).bool())
    ties = nm.mask(torch.zeros(1, 8), 4)  # ties to the lower index, as top_k's
    assert ties.tolist() == [[True, True, False, False, True, True, False, False]]


def _tiny_llama():
    return tiny_llama(num_attention_heads=4, num_key_value_heads=4, hidden_act="relu")


def _peft_model():
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import sparse_lora

    model = _tiny_llama()
    sparsekit.prune(model, 0.5, targets=["*proj"])
    return sparse_lora(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))


def _delta_model():
    from sparsekit.finetune import masked_delta

    model = _tiny_llama()
    sparsekit.prune(model, 0.5, targets=["*proj"])
    masked_delta(model, 0.1, method="magnitude")
    return model


def _moefied():
    from sparsekit import moe

    return moe.moefy(_tiny_llama(), torch.randint(0, 64, (4, 16)), experts=8, keep=0.5,
                     rank=8, steps=2)


@pytest.mark.parametrize(("make", "match"), [
    (_peft_model, r"would rebuild a LlamaModel, whose tensors these are not \(the model's own: "
                  r"\['base_model\.model\."),
    (_delta_model, r"would rebuild a LlamaForCausalLM, .*parametrizations"),
    (_moefied, r"its compiled layer 'model\.layers\.0\.mlp\.w_out' is no layer of a "
               r"LlamaForCausalLM"),
], ids=["peft", "masked-delta", "moefy"])
def test_save_pretrained_refuses_models_from_pretrained_cannot_rebuild(make, match, tmp_path):
    """Each was written over an earlier, loadable save as a directory no call could load."""
    sparsekit.save_pretrained(_tiny_llama(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=match + r".*merge_and_unload"):
        sparsekit.save_pretrained(make(), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert isinstance(sparsekit.from_pretrained(tmp_path), type(_tiny_llama()))


def test_activation_sparsity_saves_and_loads_without_pickle(tmp_path):
    """Thresholds applied with hooks were lost by save_pretrained, and the only way to keep
    an ActivationSparsity was pickling it (torch.load(weights_only=False))."""
    from sparsekit import activation
    from sparsekit.activation import ActivationSparsity

    model = _tiny_llama()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    act = activation.calibrate(model, ids, sparsity=0.5)
    path = act.save(tmp_path / "thresholds.safetensors")
    back = ActivationSparsity.load(path)
    assert (back.method, back.allocation, back.target) == (act.method, act.allocation, act.target)
    assert back.sparsities == act.sparsities and back.sizes == act.sizes
    for name, threshold in act.thresholds.items():
        assert torch.equal(back.thresholds[name], threshold)
        assert back.thresholds[name].dtype == threshold.dtype
    with torch.no_grad():
        act.apply(model)
        expected = model(ids).logits
        act.remove()
        back.apply(model)
        assert torch.equal(model(ids).logits, expected)
        back.remove()
    sparsekit.save(model, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"is not a file written by ActivationSparsity.save "
                                         r"\(its header kind is None\)"):
        ActivationSparsity.load(tmp_path / "model.safetensors")


def test_a_loaded_masked_lora_adapter_resumes_exactly_with_its_masks_installed(tmp_path):
    """PeftModel.from_pretrained loads an adapter as plain LoRA, and sparse_lora refused a
    PeftModel, so a resumed fine-tune trained the unmasked forward (merged weights 0.04
    off an uninterrupted run). sparse_lora(peft_model, None, masks) installs the masks."""
    peft = pytest.importorskip("peft")
    from sparsekit.finetune import merge_lora, sparse_lora

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(2))

    def pruned():
        model = _tiny_llama()
        return model, sparsekit.prune(model, 0.5, targets=["*proj"])

    def config():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                               init_lora_weights="gaussian")

    def train(model, optimizer, steps):
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    def adam(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    torch.manual_seed(1)
    model, masks = pruned()
    whole = sparse_lora(model, config(), masks)
    optimizer = adam(whole)
    train(whole, optimizer, 5)
    expected = merge_lora(whole).state_dict()
    torch.manual_seed(1)
    model, masks = pruned()
    first = sparse_lora(model, config(), masks)
    optimizer = adam(first)
    train(first, optimizer, 3)
    first.save_pretrained(tmp_path)
    state = optimizer.state_dict()
    model, masks = pruned()
    loaded = peft.PeftModel.from_pretrained(model, tmp_path, is_trainable=True)
    with pytest.raises(ValueError, match=r"config must be None for a PeftModel"):
        sparse_lora(loaded, config(), masks)
    resumed = sparse_lora(loaded, None, masks)
    optimizer = adam(resumed)
    optimizer.load_state_dict(state)
    train(resumed, optimizer, 2)
    for name, value in merge_lora(resumed, masks).state_dict().items():
        assert torch.equal(value, expected[name]), name


class _Mixer(nn.Module):  # h.mT: token mixing over the transposed hidden states
    def __init__(self):
        super().__init__()
        self.fc1, self.head, self.tok = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(5, 5)

    def forward(self, x):
        h = self.fc1(x)
        return self.head(h), self.tok(h.mT)


class _WidthScaled(nn.Module):  # a number read from the width: h.shape[-1] ** -0.5
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h) * h.shape[-1] ** -0.5


class _ConvWidth(nn.Module):  # h.size(1): the channel count of a convolution's output
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        return self.c2(h) / h.size(1)


class _PoolAcross(nn.Module):  # a 2-d pool of a Conv1d's (N, C, L) output pools channels
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 8, 1), nn.Conv1d(8, 3, 1)
        self.pool = nn.MaxPool2d((3, 1), stride=1, padding=(1, 0))

    def forward(self, x):
        return self.c2(self.pool(self.c1(x)))


class _KeywordAdd(nn.Module):  # torch.add(h, other=g): g by keyword
    def __init__(self):
        super().__init__()
        self.f1, self.f2 = nn.Linear(6, 8), nn.Linear(6, 8)
        self.f3, self.f4 = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h, g = self.f1(x), self.f2(x)
        return self.f3(torch.add(h, other=g)), self.f4(g)


class _KeywordFlatten(nn.Module):  # torch.flatten(input=h, ...): the input by keyword
    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 3, 1), nn.Linear(128, 3)

    def forward(self, x):
        h = self.c1(x)
        return self.c2(h), self.fc(torch.flatten(input=h, start_dim=1))


@pytest.mark.parametrize(("make", "shape"), [
    (_Mixer, (2, 5, 6)), (_WidthScaled, (4, 6)), (_ConvWidth, (2, 3, 4, 4)),
    (_PoolAcross, (2, 3, 5)),
])
def test_channels_read_past_the_tracing_are_left_whole(make, shape):
    """Each was shrunk to a model whose outputs differed from the masked one (by up to
    0.67, or in shape) without a word: the tracing followed neither h.mT nor numbers read
    from the width, and took a pool across channels for one per channel."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="removes no channel of any group"):
        sparsekit.prune(make(), 0.3, pattern="channel")


@pytest.mark.parametrize(("make", "shape"), [(_KeywordAdd, (4, 6)),
                                             (_KeywordFlatten, (2, 3, 4, 4))])
def test_tensors_passed_by_keyword_are_followed(make, shape):
    """torch.add(h, other=g) left h and g unjoined (outputs 0.19 off after shrink), and
    torch.flatten(input=h) gave a shrunk model that failed in its forward."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    masks = sparsekit.prune(model, 0.3, pattern="channel")
    with torch.no_grad():
        expected = model(x)
        small = sparsekit.shrink(model, masks).eval()
        got = small(x)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_vertical_slash_covers_its_threshold_at_a_decode_step():
    """One query: each key is a column and a diagonal of equal mass, and ranking both
    against half the threshold of their doubled mass kept 0.63 of the mass at 0.9."""
    import math

    from sparsekit.attention import VerticalSlash

    p = torch.full((32,), 0.1 / 26)
    p[[0, 8, 16]] = 0.3
    p[28:] = 1e-6
    p = p / p.sum()
    q = (p.log() * math.sqrt(32))[None, None, None]  # softmax(q k^T / sqrt(32)) == p
    k = torch.eye(32)[None, None]
    pattern = VerticalSlash(threshold=0.9)
    assert pattern.block_mask(q, k, block_size=4)[0, 0, 0].int().tolist() == [1, 0, 1, 0, 1,
                                                                                0, 0, 1]
    assert pattern.coverage(q, k, block_size=4).recall >= 0.9
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 512, 16)
    for threshold in (0.5, 0.9):
        assert VerticalSlash(threshold=threshold).coverage(q, k, block_size=16).recall \
            >= threshold


def test_the_hf_switch_chooses_tiles_on_the_models_own_softmax_scale():
    """The patterns scored q·k / sqrt(head_dim) while the kernel ran the model's scaling
    (Granite, Gemma 3): Exact(0.95) kept 58 % of the mass the model computes."""
    import math

    from sparsekit.attention import Exact, hf, mass_recall

    scores = torch.zeros(64, 64)
    scores[:, 0] = 8.0
    q, k, v = (scores * 8)[None, None], torch.eye(64)[None, None], torch.randn(1, 1, 64, 64)
    scaling = 0.25 / math.sqrt(64)
    module = nn.Module()
    module.is_causal = True
    setattr(module, hf.ATTRIBUTE, hf.SparseAttention(Exact(threshold=0.95), block_size=8,
                                                     min_length=0))
    seen = {}
    kernel = hf.block_sparse_attention

    def spy(*args, **kwargs):
        seen["mask"] = args[3]
        return kernel(*args, **kwargs)
    try:
        hf.block_sparse_attention = spy
        hf.attention_forward(module, q, k, v, None, scaling=scaling)
    finally:
        hf.block_sparse_attention = kernel
    assert mass_recall(q, k, seen["mask"], block_size=8, scale=scaling) >= 0.95


def test_activation_sparsities_are_what_the_thresholds_zero_on_the_calibration_data():
    """They were the levels asked for: 0.3 on a ReLU layer whose thresholds zeroed 0.48 of
    its inputs (stats() said so after apply), and on inputs tied at the threshold 0.3
    where none was zeroed."""
    from sparsekit import activation

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(64, 8)
    act = activation.calibrate(model, x, sparsity=0.3, targets=["2"])
    h = model[1](model[0](x)).detach()
    zeroed = float(((h.abs() < act.thresholds["2"]) | (h == 0)).float().mean())
    assert zeroed > 0.4 and act.sparsities["2"] == pytest.approx(zeroed)
    with torch.no_grad():
        act.apply(model)
        model(x)
    assert act.stats()["2"] == pytest.approx(act.sparsities["2"])
    act.remove()
    tied = nn.Sequential(nn.Linear(4, 2))
    ones = torch.randint(1, 3, (32, 4)).float()  # only 1s and 2s: the threshold is 1
    assert activation.calibrate(tied, ones, sparsity=0.3).sparsities["0"] == 0.0


def test_the_engine_report_counts_both_formats_of_a_two_format_layer():
    """Only the few-rows format was counted (1364 of 2360 bytes) and named."""
    from sparsekit.engine import report
    from sparsekit.engine.formats import FORMATS

    torch.manual_seed(0)
    w = torch.randn(16, 32)
    w[w.abs() < 0.8] = 0
    small, large = FORMATS["csr16"].from_dense(w), FORMATS["bitmap"].from_dense(w)
    layer = CompiledLinear(small, torch.randn(16), format_large=large, split=4)
    row = report(nn.Sequential(layer), torch.randn(8, 32)).rows[0]
    assert row.extra["bytes"] == small.nbytes + large.nbytes
    assert row.extra["format"] == "csr16|bitmap>4"


def test_observe_refuses_transposed_convolutions():
    """macs() counted a stride-2 ConvTranspose2d 12.9x too many, input_stats() failed with
    a reshape error blaming the data (or, with equal channels, laid them out wrongly)."""
    from sparsekit import observe

    model = nn.Sequential(nn.ConvTranspose2d(3, 8, 3, stride=2))
    layers = {"0": model[0]}
    for call in (lambda: observe.macs(model, layers, torch.randn(2, 3, 5, 5)),
                 lambda: observe.input_stats(model, layers, torch.randn(2, 3, 5, 5))):
        with pytest.raises(TypeError, match=r"layers\['0'\] is a ConvTranspose2d, which is "
                                            r"not supported; accepted: Linear"):
            call()


def _tiny_bert(**overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=1, num_attention_heads=4, **overrides)
    return transformers.BertModel(config).eval()


def test_moe_evaluate_counts_the_reader_bias_in_the_dense_output():
    """The dense output left the reader's bias out: 0.80 reported where the routed FFN's
    relative error was 0.015 (a BERT with a trained-like output bias)."""
    from sparsekit import moe

    model = _tiny_bert()
    with torch.no_grad():
        model.encoder.layer[0].output.dense.bias.normal_(0, 0.5)
    calibration = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    routed = moe.moefy(model, calibration, experts=8, keep=0.25, steps=30)
    layer = routed.encoder.layer[0].intermediate
    reported = moe.evaluate(routed, ids)["encoder.layer.0.intermediate"]["error"]
    inputs = []
    handle = layer.register_forward_hook(lambda m, a, o: inputs.append(a[0].reshape(-1, 32)))
    with torch.no_grad():
        routed(ids)
        handle.remove()
        dense = model.encoder.layer[0]
        y = layer(inputs[0])
        expected = dense.output.dense(dense.intermediate.intermediate_act_fn(
            dense.intermediate.dense(inputs[0])))
    assert reported == pytest.approx(float((y - expected).norm() / expected.norm()), rel=1e-3)


def test_moefy_patterns_leave_out_neurons_a_token_does_not_fire():
    """On a ReLU FFN whose tokens fire fewer neurons than keep, the cut was 0 and every
    neuron counted as active on every token: the clustering saw identical patterns."""
    from sparsekit import moe
    from sparsekit.moe import moefication

    model = _tiny_bert(hidden_act="relu")
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.bias.fill_(-0.15)
    seen = []
    clustering = moefication.balanced_kmeans

    def spy(patterns, *args, **kwargs):
        seen.append(patterns)
        return clustering(patterns, *args, **kwargs)
    try:
        moefication.balanced_kmeans = spy
        moe.moefy(model, torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1)),
                  experts=8, keep=0.3, steps=1)
    finally:
        moefication.balanced_kmeans = clustering
    active = (seen[0] > 0).float().mean(0)  # per token: the share of neurons marked active
    assert float(active.max()) <= round(0.3 * 64) / 64 + 0.05


def test_set_keep_rounds_as_moefy_does():
    """0.625 of 4 experts: moefy ran 2 (Python's round), set_keep 3 (floor(x + 0.5))."""
    from sparsekit import moe

    routed = moe.moefy(_tiny_bert(), torch.randint(0, 64, (4, 16)), experts=4, keep=0.625,
                       steps=1)
    layers = [m for m in routed.modules() if isinstance(m, moe.RoutedFFN)]
    assert {m.k for m in layers} == {2}
    moe.set_keep(routed, 0.625)
    assert {m.k for m in layers} == {2}


def test_route_heads_refuses_attention_that_normalises_q_and_k():
    """Qwen3's q_norm / k_norm (and OLMo's clip_qkv) were skipped by the decode path: at
    keep=1 the routed model decoded logits 0.16 off the dense model's."""
    transformers = pytest.importorskip("transformers")
    from sparsekit import moe

    config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8)
    model = transformers.Qwen3ForCausalLM(config).eval()
    calibration = torch.randint(0, 64, (4, 16))
    predictors = moe.head_predictors(model, calibration, calibration, keep=0.5, steps=2)
    with pytest.raises(ValueError, match=r"Qwen3Attention\) applies \['q_norm', 'k_norm'\] "
                                         r"to q/k/v, which route_heads' decode path does not"):
        moe.route_heads(model, predictors, keep=1.0)


@pytest.mark.parametrize("act", [nn.ReLU(inplace=True), nn.LeakyReLU(0.1, inplace=True),
                                 nn.Hardtanh(inplace=True), nn.SiLU(inplace=True)])
def test_remove_dead_neurons_keeps_the_bias_under_an_inplace_activation(act):
    """Folding a dead neuron's constant ran the activation on a view of the layer's bias:
    an in-place one overwrote every kept neuron's bias (outputs 0.42 off)."""
    from sparsekit.graph import remove_dead_neurons

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), act, nn.Linear(4, 2))
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([-1.0, -2.0, 0.5, -0.5]))
        model[0].weight[3] = 0  # neuron 3 has no inputs: a constant folded into the next bias
    x = torch.randn(5, 3)
    with torch.no_grad():
        expected = model(x.clone())
        small = remove_dead_neurons(model)
        torch.testing.assert_close(small(x.clone()), expected, rtol=1e-6, atol=1e-6)
    assert small[0].bias.tolist() == [-1.0, -2.0, 0.5]


def test_log10_paths_is_float64_precise():
    from sparsekit.graph import structure_features

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))  # 24 paths
    assert structure_features(model)["log10_paths"] == pytest.approx(math.log10(25), abs=1e-12)


def test_soup_refuses_models_whose_parameter_free_modules_differ():
    from sparsekit.schedules import soup

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    b = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"models\[1\] has a different architecture"):
        soup([a, b])


def test_the_engine_report_counts_an_activation_layers_prompt_path_once():
    """Its prefill had a row of its own: the totals counted the layer twice."""
    from sparsekit.engine.activation_linear import ActivationSparseLinear
    from sparsekit.engine.report import report

    torch.manual_seed(0)
    linear = nn.Linear(64, 256, bias=False)
    with torch.no_grad():
        linear.weight[torch.rand_like(linear.weight) < 0.5] = 0
    layer = ActivationSparseLinear.from_linear(linear, 0.1, kernel="act_bitmap_gemv",
                                               prefill=CompiledLinear.from_linear(linear,
                                                                                  "bitmap"))
    x = torch.randn(8, 64)
    result = report(nn.Sequential(layer), x)
    assert [row.name for row in result.rows] == ["0"]
    assert result.rows[0].extra["prefill bytes"] == layer.prefill_nbytes
    expected = sparsekit.report(nn.Sequential(linear), x).totals
    for key in ("params", "nonzeros", "dense_flops"):
        assert result.totals[key] == expected[key], key
