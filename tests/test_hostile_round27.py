"""Hostile inputs, round 27.

- ``sparsekit.load`` of a compiled model with input thresholds into another compiled copy
  failed ("missing ['0.bitmap', …], unexpected ['0.weight_t', …]") where the copy's
  layers took another single-row kernel, kept or dropped the ``prefill`` copy, or stayed
  weight-only: all timing outcomes, which the saved model's weight formats already were
  free of. A W8A8 bitmap layer loaded into a float-input bitmap one silently (same
  buffers), and computed with the other kernel. The file now records each layer's kernel
  and the copy takes the saved layer's kind, kernel and number of stored weights.
- save_pretrained refused a fused group whose stacked layer is activation-sparse; it
  round-trips now.
- Silent wrong numbers: the bf16 one-row values of ``weight_dtype="bf16"`` (float32 where the
  prompt path held bf16), the density of grouped convolutions, ``diff`` of tied tensors,
  ``moe.evaluate`` under ``set_oracle``.
- A NumPy number in an IterativePruning history made a checkpoint ``weights_only`` refused;
  scoring with dropout drew from the caller's RNG instead of ``seed``.
"""

from __future__ import annotations

import json

import pytest
import torch
from _kernels import needs_kernels
from _llama import tiny_llama
from safetensors import safe_open
from torch import nn

import sparsekit
from sparsekit.engine import CompiledLinear, autotune
from sparsekit.engine.activation_linear import ActivationSparseLinear, conform, kernels_of

pytestmark = [needs_kernels, pytest.mark.usefixtures("one_thread")]


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight[torch.rand_like(layer.weight) < 0.5] = 0
    return model


def _clock(kernel: str | None, *, lean: bool = False, act: bool = True):
    """Stands in for ``autotune._time_block``: one row is fastest on ``kernel`` (``None``:
    thresholds lose), several rows on the bitmap weight format, or with ``lean`` on the
    dense one, which the transposed copy alone matches (one copy serves all rows)."""
    def clock(module, x, reps):
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if isinstance(module, ActivationSparseLinear):
            if rows == 1:
                return (0.3e-4 if module.kernel == kernel else 0.5e-4) if act else 9e-4
            return 0.9e-4 if module.prefill is None and lean else 1e-4
        fmt = getattr(module, "format", None)
        return 1e-4 if fmt is not None and fmt.name == ("dense" if lean else "bitmap") else 2e-4
    return clock


def _compiled(model, x, monkeypatch, kernel, **clock):
    monkeypatch.setattr(autotune, "_time_block", _clock(kernel, **clock))
    act = sparsekit.activation.calibrate(model, x, sparsity=0.5)
    return sparsekit.compile(model, x, activation_sparsity=act, cache=False)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("saved,copy", [
    ("act_gemv", "act_bitmap_gemv"), ("act_bitmap_gemv", "act_sparse_gemv"),
    ("act_sparse_gemv", "act_gemv"), ("act_gemv", None), (None, "act_bitmap_gemv")])
def test_load_takes_the_saved_kernel_whatever_the_copys(saved, copy, monkeypatch, tmp_path):
    model, x = _model(), torch.randn(16, 64)
    a = _compiled(model, x, monkeypatch, saved, act=saved is not None)
    b = _compiled(model, x, monkeypatch, copy, act=copy is not None)
    assert isinstance(a[0], ActivationSparseLinear) == (saved is not None)
    assert isinstance(b[0], ActivationSparseLinear) == (copy is not None)
    sparsekit.save(a, tmp_path / "a.sk")
    sparsekit.load(b, tmp_path / "a.sk")
    assert type(b[0]) is type(a[0]) and getattr(b[0], "kernel", None) == saved
    assert _same_state(a, b)
    for rows in (x[:1], x):
        assert torch.equal(a(rows), b(rows))


def test_load_takes_the_saved_prefill_copy_or_its_absence(monkeypatch, tmp_path):
    model, x = _model(), torch.randn(16, 64)
    a = _compiled(model, x, monkeypatch, "act_gemv", lean=True)  # one copy serves all
    b = _compiled(model, x, monkeypatch, "act_gemv")
    assert a[0].prefill is None and b[0].prefill is not None
    sparsekit.save(a, tmp_path / "a.sk")
    sparsekit.save(b, tmp_path / "b.sk")
    sparsekit.load(b, tmp_path / "a.sk")
    assert b[0].prefill is None and _same_state(a, b) and torch.equal(a(x), b(x))
    sparsekit.load(b, tmp_path / "b.sk")
    assert b[0].prefill is not None


def test_load_takes_another_number_of_stored_weights(monkeypatch, tmp_path):
    """Two models of one architecture pruned apart: the copy's layers hold other counts."""
    x = torch.randn(16, 64)
    a = _compiled(_model(0), x, monkeypatch, "act_sparse_gemv")
    b = _compiled(_model(1), x, monkeypatch, "act_sparse_gemv")
    assert a[0].values.shape != b[0].values.shape
    sparsekit.save(a, tmp_path / "a.sk")
    sparsekit.load(b, tmp_path / "a.sk")
    assert _same_state(a, b) and torch.equal(a(x[:1]), b(x[:1]))


def test_a_bad_file_leaves_the_copy_as_it_was(monkeypatch, tmp_path):
    x = torch.randn(16, 64)
    a = _compiled(_model(0), x, monkeypatch, "act_gemv")
    b = _compiled(_model(1), x, monkeypatch, "act_bitmap_gemv")
    before = {k: v.clone() for k, v in b.state_dict().items()}
    layers = [b[0], b[2]]
    a[2]._buffers["threshold"].fill_(-1.0)  # thresholds must be >= 0: the last layer fails
    sparsekit.save(a, tmp_path / "bad.sk")
    with pytest.raises(ValueError, match="threshold"):
        sparsekit.load(b, tmp_path / "bad.sk")
    assert [b[0], b[2]] == layers and b[0].kernel == "act_bitmap_gemv"
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())


def test_the_file_records_each_kernel(monkeypatch, tmp_path):
    a = _compiled(_model(), torch.randn(16, 64), monkeypatch, "act_bitmap_gemv")
    sparsekit.save(a, tmp_path / "a.sk")
    with safe_open(tmp_path / "a.sk", "pt") as f:
        recorded = json.loads(f.metadata()["activation_kernels"])
    assert recorded == kernels_of(a) == {"0": "act_bitmap_gemv", "2": "act_bitmap_gemv"}
    with pytest.raises(ValueError, match="checkpoint's own header entries"):
        sparsekit.save(a, tmp_path / "b.sk", metadata={"activation_kernels": "{}"})


def test_w8a8_kernel_is_taken_from_the_file(tmp_path):
    """W8A8's and the float-input bitmap kernel store the same buffers: only the record
    tells them apart (the copy computed with its own kernel before)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight[torch.rand_like(linear.weight) < 0.5] = 0
    w8a8 = nn.Sequential(ActivationSparseLinear.from_linear(
        linear, 0.1, kernel="act_bitmap_qgemv", value_dtype=torch.int8))
    floats = nn.Sequential(ActivationSparseLinear.from_linear(
        linear, 0.1, kernel="act_bitmap_gemv", value_dtype=torch.int8))
    sparsekit.save(w8a8, tmp_path / "w8a8.sk")
    sparsekit.load(floats, tmp_path / "w8a8.sk")
    x = torch.randn(1, 64)
    assert floats[0].kernel == "act_bitmap_qgemv" and torch.equal(floats(x), w8a8(x))


def test_conform_refuses_an_unknown_kernel_and_puts_layers_back():
    model = nn.Sequential(CompiledLinear.from_linear(nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="act_gemv"):
        conform(model, {"0.threshold", "0.weight_t"}, {"0": "gemv"})
    layer = ActivationSparseLinear.from_linear(nn.Linear(8, 4), 0.1)
    model = nn.Sequential(layer)
    undo = conform(model, {"0.threshold", "0.values", "0.bitmap", "0.offsets"}, {})
    assert model[0].kernel == "act_bitmap_gemv"
    undo()
    assert model[0] is layer


def test_fused_thresholded_groups_load_into_an_unfused_copy(monkeypatch, tmp_path):
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    sparsekit.llm.prune(model, ids, sparsity=0.5)
    act = sparsekit.activation.calibrate(model, ids, sparsity=0.5)

    def clock(fuse_wins):
        def time(module, x, reps):
            if type(module).__name__ == "FusedProjections":
                return 0.5e-4 if fuse_wins else 4e-4
            if type(module).__name__ == "_Separate":
                return 2e-4
            return 0.3e-4 if isinstance(module, ActivationSparseLinear) else 1e-4
        return time

    monkeypatch.setattr(autotune, "_time_block", clock(True))
    a = sparsekit.compile(model, (ids[:1],), activation_sparsity=act, cache=False)
    monkeypatch.setattr(autotune, "_time_block", clock(False))
    b = sparsekit.compile(model, (ids[:1],), activation_sparsity=act, cache=False)
    fused = sparsekit.engine.fused.groups
    assert fused(a) and not fused(b)
    sparsekit.save(a, tmp_path / "a.sk")
    sparsekit.load(b, tmp_path / "a.sk")
    assert fused(b) == fused(a) and _same_state(a, b)
    with torch.no_grad():
        assert torch.equal(a(ids[:1, :1]).logits, b(ids[:1, :1]).logits)


def test_fused_thresholded_groups_round_trip_through_save_pretrained(monkeypatch, tmp_path):
    """A stacked activation-sparse layer was recorded as a layer of its own, which
    from_pretrained could not place (save_pretrained refused it up front)."""
    model = tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    sparsekit.llm.prune(model, ids, sparsity=0.5)
    act = sparsekit.activation.calibrate(model, ids, sparsity=0.5)

    def clock(module, x, reps):
        if type(module).__name__ == "FusedProjections":
            return 0.5e-4
        if isinstance(module, ActivationSparseLinear):
            return 0.3e-4 if module.kernel == "act_bitmap_gemv" else 0.4e-4
        return 1e-4 if type(module).__name__ != "_Separate" else 2e-4

    monkeypatch.setattr(autotune, "_time_block", clock)
    compiled = sparsekit.compile(model, (ids[:1],), activation_sparsity=act, cache=False,
                                 threads=1)
    stacked = compiled.model.layers[0].mlp.gate_proj.group.linear
    assert isinstance(stacked, ActivationSparseLinear) and stacked.threads == 1
    back = sparsekit.from_pretrained(sparsekit.save_pretrained(compiled, tmp_path / "m"))
    again = back.model.layers[0].mlp.gate_proj.group.linear
    assert (again.kernel, again.threads, type(again.prefill)) == (
        stacked.kernel, 1, type(stacked.prefill))
    assert sparsekit.engine.fused.groups(back) == sparsekit.engine.fused.groups(compiled)
    assert _same_state(compiled, back)
    with torch.no_grad():
        for step in (ids[:1], ids[:1, :1]):
            assert torch.equal(back(step).logits, compiled(step).logits)


@pytest.mark.parametrize("kernel", ["act_gemv", "act_bitmap_gemv"])
def test_bf16_weight_dtype_rounds_the_one_row_values_too(kernel, monkeypatch):
    """With weight_dtype="bf16" on a float32 model the one-row kernel kept float32 values
    while the prompt path held bf16 ones: one row differed from itself among many by the
    rounding (2e-3 here)."""
    model, x = _model(), torch.randn(16, 64)
    monkeypatch.setattr(autotune, "_time_block", _clock(kernel))
    act = sparsekit.activation.calibrate(model, x, sparsity=0.5)
    b = sparsekit.compile(model, x, activation_sparsity=act, cache=False, weight_dtype="bf16")
    assert isinstance(b[0], ActivationSparseLinear) and b[0].kernel == kernel
    rounded = b[0].to_dense()
    assert rounded.dtype == torch.float32
    assert torch.equal(rounded, model[0].weight.detach().bfloat16().float())
    with torch.no_grad():
        for i in range(4):
            torch.testing.assert_close(b(x[i:i + 1])[0], b(x[:4])[i], rtol=1e-5, atol=1e-6)


def test_grouped_convolutions_count_only_their_possible_connections():
    """An unpruned depthwise layer read density 0.25 (its cross-group pairs counted as
    possible connections)."""
    from sparsekit.graph import structure_features, to_graph

    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1),
                          nn.Conv2d(8, 8, 3, groups=2))
    features = structure_features(model)
    assert features["density"] == 1.0 and features["0.weight.density"] == 1.0
    assert features["2.weight.density"] == 1.0
    with torch.no_grad():
        model[0].weight[:2] = 0  # two of the four depthwise channels
    features = structure_features(model)
    assert features["0.weight.density"] == 0.5
    assert features["density"] == (2 + 32 + 32) / (4 + 32 + 32)
    graph = to_graph(model)
    assert [spec["groups"] for spec in graph.graph["layers"]] == [4, 1, 2]
    graph.graph["layers"][2]["groups"] = 3  # divides neither width
    with pytest.raises(ValueError, match="'groups': an int ≥ 1 dividing both"):
        structure_features(graph)
    del graph.graph["layers"][2]["groups"]  # a graph that does not say: one group
    assert structure_features(graph)["2.weight.density"] == 0.5


def test_diff_counts_a_tied_tensor_once(tmp_path):
    """An update of a tied embedding counted twice, and a tied model differed from its own
    Hugging Face directory (which stores the tensor once) by the second name."""
    a = tiny_llama(tie_word_embeddings=True)
    b = tiny_llama(tie_word_embeddings=True)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.model.embed_tokens.weight[0, 0] += 1
    for other in (b, b.state_dict()):
        d = sparsekit.diff(a, other)
        assert [r.name for r in d.changed()] == ["model.embed_tokens.weight"]
        assert d.totals["changed"] == 1
        assert d.totals["numel"] == sum(p.numel() for p in a.parameters())
    b.save_pretrained(tmp_path / "hf")
    assert sparsekit.diff(a, tmp_path / "hf").totals["changed"] == 1
    untied = tiny_llama(tie_word_embeddings=False)  # fine-tuning untied the output layer
    untied.load_state_dict(a.state_dict())
    with torch.no_grad():
        untied.lm_head.weight[1, 1] += 1
    d = sparsekit.diff(a, untied)
    assert [r.name for r in d.changed()] == ["lm_head.weight"]


def test_moe_evaluate_scores_the_choice_the_layer_runs():
    """Under set_oracle the layer runs the oracle's choice, but evaluate scored its router's
    (error 0.76 where the layer as it ran had 0.44, recall 0.575 instead of 1)."""
    from sparsekit.moe import evaluate
    from sparsekit.moe.routed import RoutedFFN, set_oracle

    torch.manual_seed(0)
    d, n, size = 8, 12, 3
    w_in, w_out, b_out = torch.randn(n, 1, d), torch.randn(5, n), torch.randn(5)
    layer = RoutedFFN(w_in, None, w_out, b_out, torch.relu, order=torch.arange(n), hot=0,
                      unit_size=size, router=nn.Linear(d, n // size), k=2)
    model = nn.Sequential(layer)
    x = torch.randn(40, d)
    with torch.no_grad():
        dense = torch.relu(x @ w_in[:, 0].t()) @ w_out.t() + b_out
    for oracle in (False, True):
        set_oracle(model, oracle)
        scores = evaluate(model, x)["0"]
        with torch.no_grad():
            ran = float(torch.linalg.vector_norm(model(x) - dense)
                        / torch.linalg.vector_norm(dense))
        assert scores["error"] == pytest.approx(ran, rel=1e-5)
        if oracle:
            assert scores["recall"] == 1.0 and scores["error"] == scores["oracle_error"]


def test_iterative_pruning_state_with_numpy_numbers_loads_weights_only(tmp_path):
    """A NumPy sparsity (np.linspace) or metric went into the history as a NumPy scalar,
    which torch.load's weights_only default refused: SparsityCallback could not resume from
    the checkpoint it wrote itself."""
    import numpy as np

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    imp = sparsekit.IterativePruning(model, rounds=3, sparsity=np.float64(0.8),
                                     rewind_step=0)
    imp.next_round({"acc": np.float64(0.9), "step": np.int64(3), "name": "a",
                    "best": np.bool_(True), "loss": np.array(0.5)})
    torch.save(imp.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt")  # weights_only=True
    assert state["history"][0]["metrics"] == {"acc": 0.9, "step": 3, "name": "a",
                                              "best": True, "loss": 0.5}
    assert type(state["history"][0]["sparsity"]) is float
    assert type(state["history"][0]["metrics"]["step"]) is int
    again = sparsekit.IterativePruning(model, rounds=3, sparsity=0.8, rewind_step=0)
    again.load_state_dict(state)
    assert again.round == 1


@pytest.mark.parametrize("method", ["snip", "taylor", "grasp"])
def test_scoring_draws_from_its_seed_not_the_callers_rng(method):
    """A model in train mode with dropout: two prune() calls with one seed gave different
    masks, and scoring advanced the caller's RNG (a resume that restored it diverged)."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 4))
    data = [(torch.randn(16, 12), torch.randint(0, 4, (16,)))]
    before = torch.get_rng_state()
    a = sparsekit.prune(copy.deepcopy(model), 0.5, method=method, data=data, seed=0).masks
    assert torch.equal(torch.get_rng_state(), before)
    b = sparsekit.prune(copy.deepcopy(model), 0.5, method=method, data=data, seed=0).masks
    assert all(torch.equal(a[n], b[n]) for n in a)
