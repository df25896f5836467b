"""Hostile data streams: padding, batching, generators, dtypes and extreme scales."""

import warnings

import pytest
import torch
from torch import nn

import sparsekit
import sparsekit.activation as A
import sparsekit.llm as L
import sparsekit.sae as S
from sparsekit.activation.record import record_inputs
from sparsekit.llm.sparsegpt import sparsegpt_prune
from sparsekit.observe import InputStats
from sparsekit.scores.flap import Moments

transformers = pytest.importorskip("transformers")


def _llama(seed=0):
    torch.manual_seed(seed)
    c = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                 num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(c).eval()


def _gpt2(seed=0):
    torch.manual_seed(seed)
    c = transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(c).eval()


def _padded(a, b, left):
    pad = torch.zeros(1, a.shape[1] - b.shape[1], dtype=torch.long)
    row = torch.cat([pad, b], 1) if left else torch.cat([b, pad], 1)
    ones, zeros = torch.ones(1, b.shape[1]), torch.zeros(1, pad.shape[1])
    mrow = torch.cat([zeros, ones], 1) if left else torch.cat([ones, zeros], 1)
    return {"input_ids": torch.cat([a, row]),
            "attention_mask": torch.cat([torch.ones(1, a.shape[1]), mrow]).long()}


@pytest.mark.parametrize("make,left", [(_llama, False), (_llama, True), (_gpt2, False)])
def test_loss_recovered_ignores_padded_positions(make, left):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = make()
        site = "model.layers.0" if make is _llama else "transformer.h.0"
        torch.manual_seed(1)
        a, b = torch.randint(1, 128, (1, 8)), torch.randint(1, 128, (1, 5))
        sae = S.SAE(64, 128, activation="topk", k=8)
        padded = S.loss_recovered(model, site, sae, _padded(a, b, left))
        separate = S.loss_recovered(model, site, sae, [a, b])
    for key, value in separate.items():
        assert padded[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_loss_recovered_takes_int32_ids_and_names_short_sequences():
    model = _llama()
    ids = torch.randint(0, 128, (2, 8))
    sae = S.SAE(64, 128, activation="topk", k=8)
    assert S.loss_recovered(model, "model.layers.0", sae, ids.int()) == pytest.approx(
        S.loss_recovered(model, "model.layers.0", sae, ids))
    with pytest.raises(ValueError, match="at least 2"):
        S.loss_recovered(model, "model.layers.0", sae, ids[:, :1])


def test_record_inputs_sample_does_not_depend_on_batching():
    model = _llama()
    torch.manual_seed(6)
    X = torch.randint(0, 128, (8, 32))
    layer = {"d": model.model.layers[0].mlp.down_proj}
    one = record_inputs(model, layer, X, max_rows=64, generator=torch.Generator().manual_seed(3))
    split = record_inputs(model, layer, [X[:7], X[7:]], max_rows=64,
                          generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(one["d"], split["d"], rtol=1e-5, atol=1e-5)
    t1 = A.calibrate(model, X, max_rows=64).thresholds["model.layers.0.mlp.down_proj"]
    t2 = A.calibrate(model, [X[:7], X[7:]], max_rows=64).thresholds[
        "model.layers.0.mlp.down_proj"]
    torch.testing.assert_close(t1, t2, rtol=1e-5, atol=1e-6)


def test_record_inputs_sample_is_uniform_over_rows():
    class Id(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Identity()

        def forward(self, x):
            return self.lin(x)

    model = Id()
    rows = torch.arange(100.0).unsqueeze(1)
    counts = torch.zeros(100)
    for seed in range(200):  # a big batch then a small one
        r = record_inputs(model, {"l": model.lin}, [rows[:90], rows[90:]], max_rows=20,
                          generator=torch.Generator().manual_seed(seed))["l"]
        assert r.shape == (20, 1) and r.unique().numel() == 20
        counts[r.long().flatten()] += 1
    share = counts[90:].sum() / counts.sum()  # true share 0.1
    assert 0.07 < share < 0.13


def test_greedy_calibration_takes_a_generator():
    model = _llama()
    torch.manual_seed(1)
    X = [torch.randint(0, 128, (2, 16)) for _ in range(3)]
    from_list = A.calibrate(model, X, sparsity=0.5, allocation="greedy")
    from_gen = A.calibrate(model, (x for x in X), sparsity=0.5, allocation="greedy")
    assert from_gen.sparsities == from_list.sparsities
    for n, t in from_list.thresholds.items():
        torch.testing.assert_close(from_gen.thresholds[n], t)


def test_flap_refuses_fewer_than_two_rows():
    model = _llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 128, (1, 1))
    for allocation in ("uniform", "adaptive"):
        with pytest.raises(ValueError, match="at least 2 calibration rows"):
            L.prune_structured(model, ids, unit="ffn", method="flap", amount=0.5,
                               allocation=allocation)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    with pytest.raises(ValueError, match="at least 2 calibration rows"):
        sparsekit.prune(mlp, 0.5, method="flap", data=(x[:1], y[:1]))
    moments = Moments(3)
    moments.observe(nn.Linear(3, 1), torch.ones(1, 3))
    with pytest.raises(ValueError, match="at least 2"):
        moments.variance()


def test_huge_finite_inputs_do_not_read_as_nan():
    stats = InputStats(4)
    stats.add(torch.full((3, 4), 1e20))
    assert torch.isfinite(stats.norms()).all()
    torch.testing.assert_close(stats.norms(), torch.full((4,), 3**0.5 * 1e20))
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    x[0, 2] = 1e20
    sparsekit.prune(mlp, 0.5, method="wanda", data=(x, y))  # finite scores: no NaN/inf error
    moments = Moments(2)
    moments.observe(nn.Linear(2, 1), torch.tensor([[1e20, 0.0], [-1e20, 1.0]]))
    with pytest.raises(ValueError, match="overflows float32"):
        moments.variance()
    gram = InputStats(2, gram=True)
    gram.add(torch.tensor([[1e20, 0.0], [-1e20, 1.0]]))
    with pytest.raises(ValueError, match="overflowed float32"):
        gram.hessian()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_sparsegpt_is_invariant_to_the_hessian_scale(pattern):
    torch.manual_seed(0)
    W = torch.randn(16, 32)
    X = torch.randn(64, 32)
    H = 2 * X.t() @ X / 64
    w, keep = sparsegpt_prune(W, H, 0.5, pattern)
    for scale in (1e-40, 1e30):
        w2, keep2 = sparsegpt_prune(W, H.double() * scale, 0.5, pattern)
        assert torch.equal(keep, keep2)
        torch.testing.assert_close(w2, w, rtol=1e-4, atol=1e-5)
    w3, keep3 = sparsegpt_prune(W, H * 1e-40, 0.5, pattern)  # float32 denormals
    assert torch.isfinite(w3).all()
    assert (keep3 == keep).float().mean() > 0.95
