"""Hostile inputs, round 16: observing layer inputs (observe, activation, blocks, data).

- inputs on the meta device are refused naming the caller's argument: a Hugging Face model
  runs on meta token ids and ``moe.evaluate`` / ``calibrate`` / ``profile`` returned
  numbers computed from no values;
- a model whose weights were never loaded (on the meta device) is refused naming
  ``model`` (``calibrate`` was a raw ``RuntimeError``, ``input_stats`` meta "statistics");
- bad calibration batches are reported under the caller's name (``calibration``), not
  ``data``, the name of :func:`sparsekit.observe.batches`' own argument;
- greedy calibration of a model whose block is the whole model returning a
  ``ModelOutput`` (BERT's pooler) was an ``AttributeError``;
- ``InputStats`` / ``record`` / ``preserved`` / ``watch`` / ``macs`` / ``capture_inputs``
  check their arguments; ``read_idx``, ``load_image_dataset`` and ``reber_accuracy`` too.
"""

from __future__ import annotations

import pytest
import torch
from _state import snapshot, unchanged
from torch import nn

from sparsekit import observe
from sparsekit._checks import ArgumentTypeError
from sparsekit.activation import ActivationSparsity, calibrate, profile
from sparsekit.activation.record import record_inputs
from sparsekit.blocks import BlockCall, BlockReplay, capture_inputs, find_blocks, home_device
from sparsekit.data import load_image_dataset, read_idx, reber_accuracy

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4)
    return transformers.BertModel(config).eval()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down_proj = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up(x)))


# -- meta inputs and meta models ----------------------------------------------------------


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("call, param", [
    (lambda m, x: observe.run(m, x), "data"),
    (lambda m, x: observe.run(m, [x[:1], x[1:]], "calibration"), "calibration"),
    (lambda m, x: calibrate(m, x), "calibration"),
    (lambda m, x: calibrate(m, x, allocation="greedy"), "calibration"),
    (lambda m, x: profile(m, x), "data"),
    (lambda m, x: record_inputs(m, {"q": m.model.layers[0].self_attn.q_proj}, x, max_rows=8,
                                generator=_gen()), "calibration"),
    (lambda m, x: observe.input_stats(m, {"q": m.model.layers[0].self_attn.q_proj}, x),
     "data"),
    (lambda m, x: BlockReplay(m, ["model.layers.0"], x), "data"),
    (lambda m, x: capture_inputs(m, find_blocks(m), [x]), "inputs"),
])
def test_meta_inputs_are_refused_naming_the_argument(call, param):
    """LLaMA runs on meta token ids (its embedding does not refuse them): calibrate, profile
    and moe.evaluate returned numbers computed from inputs that hold no values."""
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=f"^{param} is on the meta device"):
        call(model, TOKENS.to("meta"))
    assert unchanged(model, before) and not model.training


def test_moe_evaluate_refuses_meta_tokens():
    """The lead: moe.evaluate(routed, meta tokens) returned recall and error figures."""
    from sparsekit import moe

    routed = moe.moefy(tiny_llama(), TOKENS, experts=4, keep=0.5, steps=2)
    with pytest.raises(ValueError, match="^data is on the meta device"):
        moe.evaluate(routed, TOKENS.to("meta"))


def test_meta_inputs_nested_in_a_pair_or_dict_are_refused():
    class Keys(nn.Module):
        def forward(self, batch: dict) -> torch.Tensor:
            return torch.zeros(1)

    with pytest.raises(ValueError, match="data is on the meta device"):
        observe.run(Keys(), [({"ids": torch.ones(2, device="meta")}, torch.ones(1))])


def test_a_model_on_the_meta_device_is_refused_naming_the_model():
    """calibrate() of a model whose weights were never loaded was a raw RuntimeError
    ('item() on meta tensors'), profile() blamed the data, input_stats() returned meta
    statistics."""
    model = tiny_llama().to("meta")
    with pytest.raises(ValueError, match="^model: the inputs of layers .* meta device"):
        calibrate(model, TOKENS)
    with pytest.raises(ValueError, match="^model: the inputs of layers .* meta device"):
        profile(model, TOKENS)
    q = {"q": model.model.layers[0].self_attn.q_proj}
    with pytest.raises(ValueError, match=r"layers\['q'\].weight is on the meta device"):
        observe.input_stats(model, q, TOKENS)


def test_input_stats_add_refuses_meta_rows_and_keeps_its_sums():
    """add() of a meta tensor counted its rows and added nothing to the squares."""
    stats = observe.InputStats(4)
    with pytest.raises(ValueError, match="x is on the meta device"):
        stats.add(torch.ones(2, 4, device="meta"))
    with pytest.raises(ValueError, match="x is on the meta device"):
        stats.observe(nn.Linear(4, 2), torch.ones(2, 4, device="meta"))
    assert stats.rows == 0 and not stats.sq.any()


def test_activation_sparsity_refuses_meta_thresholds():
    """A meta threshold was a raw RuntimeError from comparing it."""
    with pytest.raises(ValueError, match=r"thresholds\['up'\] is on the meta device"):
        ActivationSparsity("teal", "uniform", 0.5, {"up": 0.5},
                           {"up": torch.ones(8, device="meta")}, {"up": 128})


# -- the caller's parameter name ----------------------------------------------------------


@pytest.mark.parametrize("calibration", [
    pytest.param(lambda: ([1, 2] for _ in range(2)), id="generator of lists"),
    pytest.param(lambda: iter(["text"]), id="iterator of str"),
])
@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_calibrate_names_calibration_in_batch_errors(calibration, allocation):
    """The message named ``data``, which calibrate() has no argument called."""
    model = MLP()
    with pytest.raises(ArgumentTypeError, match="^each batch in calibration must be"):
        calibrate(model, calibration(), allocation=allocation)
    with pytest.raises(ArgumentTypeError, match="^calibration must be a tensor"):
        calibrate(model, {"input_ids": torch.ones(2, 8)})


@pytest.mark.parametrize("entry", ["moefy", "contextual"])
@pytest.mark.parametrize("calibration", [
    pytest.param(lambda: ([1, 2] for _ in range(2)), id="generator of lists"),
    pytest.param(lambda: [[1, 2], [3, 4]], id="list of lists"),
])
def test_moe_entry_points_name_calibration_in_batch_errors(entry, calibration):
    """The lead: moefy/contextual reported bad streamed batches under the name ``data``."""
    from sparsekit import moe

    model = tiny_llama()
    before = snapshot(model)
    kwargs = {"experts": 4} if entry == "moefy" else {}
    with pytest.raises(ArgumentTypeError, match="calibration") as info:
        getattr(moe, entry)(model, calibration(), **kwargs)
    assert "data" not in str(info.value)
    assert unchanged(model, before)


def test_block_replay_names_its_param_in_model_errors():
    """BlockReplay(..., param) named the model's error ``inputs``, capture_inputs' argument."""
    with pytest.raises(ArgumentTypeError, match="^calibration: the model cannot run"):
        BlockReplay(tiny_llama(), ["model.layers.0"], ([1] for _ in range(1)), "calibration")


# -- block outputs ------------------------------------------------------------------------


def test_greedy_calibration_of_bert_replays_the_whole_model_block():
    """BERT's pooler has no numbered block, so its block is the whole model, whose
    ModelOutput (no logits) was an AttributeError ('... has no attribute float')."""
    model = tiny_bert()
    before = snapshot(model)
    result = calibrate(model, TOKENS, allocation="greedy")
    assert "pooler.dense" in result.sparsities
    assert unchanged(model, before)
    replay = BlockReplay(model, [""], TOKENS)
    assert replay("").shape == (2, 12, 32)


def test_block_call_reads_dict_outputs_and_refuses_outputs_without_a_tensor():
    class Dict(nn.Module):
        def forward(self, x: torch.Tensor) -> dict:
            return {"hidden": x * 2, "other": 1}

    class Nothing(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None

    call = BlockCall((), {}, None)
    assert torch.equal(call(Dict(), torch.ones(2)), torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="Nothing returned no hidden states"):
        call(Nothing(), torch.ones(2))


# -- argument checks ----------------------------------------------------------------------


def test_input_stats_checks_gram_and_device():
    """gram='no' allocated the Gram matrix; an unknown device was a raw RuntimeError."""
    with pytest.raises(ArgumentTypeError, match=r"gram must be a bool \(True or False\), got 'no'"):
        observe.InputStats(4, gram="no")
    with pytest.raises(ValueError, match="device 'nope' is not available"):
        observe.InputStats(4, device="nope")
    with pytest.raises(ArgumentTypeError, match=r"gram must be a bool \(True or False\)"), \
            observe.record({"l": nn.Linear(2, 2)}, gram="yes"):
        pass


def test_input_stats_of_zero_features_counts_rows():
    """add() of (rows, 0) inputs was a raw RuntimeError from reshape(-1, 0)."""
    stats = observe.InputStats(0)
    stats.add(torch.ones(3, 2, 0))
    assert stats.rows == 6 and stats.norms().shape == (0,)


def test_preserved_and_watch_check_their_flags():
    lin = nn.Linear(2, 2)
    with pytest.raises(ArgumentTypeError, match=r"buffers must be a bool \(True or False\)"), \
            observe.preserved(lin, buffers="no"):
        pass
    with pytest.raises(ArgumentTypeError, match="observer must be a callable"), \
            observe.watch({"l": lin}, None):
        pass
    assert not lin._forward_hooks


def test_macs_checks_layers_before_reading_them():
    """A list of layers or a ReLU were AttributeErrors ('list' has no 'items',
    'ReLU' has no 'in_features')."""
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with pytest.raises(ArgumentTypeError, match="layers must be a mapping"):
        observe.macs(model, [model[0]], torch.ones(2, 4))
    with pytest.raises(ArgumentTypeError, match=r"layers\['r'\] must be a weighted layer"):
        observe.macs(model, {"r": model[1]}, torch.ones(2, 4))
    assert observe.macs(model, {"l": model[0]}, torch.ones(2, 4)) == {"l": 24}


def test_capture_inputs_checks_the_device_and_home_device_the_model():
    """An unknown device was blamed on the inputs; home_device(None) an AttributeError."""
    model = tiny_llama()
    with pytest.raises(ValueError, match="^device 'nope' is not available"):
        capture_inputs(model, find_blocks(model), [TOKENS], device="nope")
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module"):
        home_device(None)


def test_record_inputs_checks_max_rows_and_generator():
    """max_rows=0 kept no rows, which calibrate reported as layers that never ran."""
    model = MLP()
    with pytest.raises(ValueError, match="max_rows must be an int ≥ 1, got 0"):
        record_inputs(model, {"up": model.up}, torch.ones(2, 8), max_rows=0,
                      generator=_gen())
    with pytest.raises(ArgumentTypeError, match="generator must be a torch.Generator"):
        record_inputs(model, {"up": model.up}, torch.ones(2, 8), max_rows=4, generator=0)


# -- data -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [None, 3, b"/tmp/x.idx"])
def test_read_idx_and_load_image_dataset_check_the_path_type(path):
    """None, a number or bytes were bare TypeErrors from pathlib naming no argument."""
    with pytest.raises(ArgumentTypeError, match="path must be a str or an os.PathLike"):
        read_idx(path)
    if path is not None:  # None is the default root
        with pytest.raises(ArgumentTypeError, match="root must be a str or an os.PathLike"):
            load_image_dataset(path)


def test_load_image_dataset_checks_quiet():
    with pytest.raises(ArgumentTypeError,
                       match=r"quiet must be a bool \(True or False\), got 'no'"):
        load_image_dataset(quiet="no")


def test_reber_accuracy_refuses_meta_and_complex_tensors():
    """Meta tensors were a NotImplementedError from nonzero(), complex logits a raw
    RuntimeError from argmax()."""
    targets = torch.zeros(2, 3, 7)
    targets[..., 0] = 1
    with pytest.raises(ValueError, match="logits is on the meta device"):
        reber_accuracy(torch.zeros(2, 3, 7, device="meta"), targets)
    with pytest.raises(ValueError, match="targets is on the meta device"):
        reber_accuracy(torch.zeros(2, 3, 7), targets.to("meta"))
    with pytest.raises(ValueError, match="logits must be a real tensor"):
        reber_accuracy(torch.zeros(2, 3, 7, dtype=torch.complex64), targets)
    assert reber_accuracy(torch.zeros(2, 3, 7), targets) == 1.0
