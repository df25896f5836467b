"""sparsekit.sae: every variant recovers planted features; decoding paths agree; bad input."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from sparsekit.engine import kernels
from sparsekit.sae import ACTIVATIONS, SAE, objective, resample, train

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(d=32, n=64, k=3, rows=20000, *, signed=False, d_out=None, seed=0):
    """Rows ``z @ D`` of a known unit-norm dictionary ``D`` (n, d) with k-sparse codes ``z``
    (values in [0.5, 1.5], random signs if ``signed``); with ``d_out`` also ``z @ D_out``."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(n, d, generator=g)
    dictionary /= dictionary.norm(dim=-1, keepdim=True)
    idx = torch.rand(rows, n, generator=g).topk(k, dim=-1).indices
    vals = torch.rand(rows, k, generator=g) + 0.5
    if signed:
        vals = vals * (torch.randint(0, 2, (rows, k), generator=g) * 2 - 1)
    z = torch.zeros(rows, n).scatter(-1, idx, vals)
    if d_out is None:
        return z @ dictionary, dictionary
    out = torch.randn(n, d_out, generator=g)
    out /= out.norm(dim=-1, keepdim=True)
    return (z @ dictionary, z @ out), out


def mmcs(sae, dictionary):
    """Mean over planted features of the best |cosine| with a decoder row."""
    rows = sae.W_dec.detach()
    rows = rows / rows.norm(dim=-1, keepdim=True)
    return float((dictionary @ rows.T).abs().max(dim=1).values.mean())


VARIANTS = {  # activation: (SAE kwargs, train kwargs)
    "topk": ({}, {}),
    "batchtopk": ({}, {}),
    "abstopk": ({}, {}),
    "jumprelu": ({"threshold": 0.1, "bandwidth": 0.05}, {"sparsity_coef": 0.05}),
    "l1": ({}, {"sparsity_coef": 0.3}),
}


def test_every_registered_activation_has_a_recovery_case():
    assert set(ACTIVATIONS.names()) == set(VARIANTS)


@pytest.mark.parametrize("activation", sorted(VARIANTS))
def test_recovers_planted_features(activation):
    x, dictionary = planted(signed=activation == "abstopk")
    sae_kw, train_kw = VARIANTS[activation]
    sae = SAE(32, 128, activation, k=3, seed=1, **sae_kw)
    out = train(sae, x, steps=1500, batch_size=256, lr=3e-3, dead_window=2000, **train_kw)
    assert out["steps"] == 1500 and out["tokens"] == 1500 * 256
    assert mmcs(sae, dictionary) >= 0.95
    with torch.no_grad():
        l0 = (sae.encode(x) != 0).sum(-1).float().mean()
    assert 1 <= l0 <= 12


def test_matryoshka_recovers_and_its_prefix_reconstructs_alone():
    x, dictionary = planted()
    sae = SAE(32, 128, "topk", k=3, matryoshka=(32, 128), seed=1)
    train(sae, x, steps=1500, batch_size=256, lr=3e-3, dead_window=2000)
    assert mmcs(sae, dictionary) >= 0.95
    sae.eval()
    with torch.no_grad():
        values, indices = sae.encode_sparse(x)
        prefix = sae.decode_sparse(values * (indices < 32), indices)
        variance = (x - x.mean(0)).pow(2).sum()
        # the first quarter of the dictionary alone explains most of the variance
        assert float((prefix - x).pow(2).sum() / variance) < 0.5


def test_transcoder_recovers_the_output_dictionary():
    (x, y), out_dictionary = planted(d_out=24)
    sae = SAE(32, 128, "topk", k=3, d_out=24, seed=1)
    assert sae.transcoder
    train(sae, [(x, y)], steps=1500, batch_size=256, lr=3e-3, dead_window=2000)
    assert mmcs(sae, out_dictionary) >= 0.95
    with torch.no_grad():
        assert sae(x).shape == y.shape


def test_decoder_rows_stay_unit_norm_and_steps_keep_them_there():
    x, _ = planted(rows=2048)
    sae = SAE(32, 64, "topk", k=3)
    train(sae, x, steps=5, batch_size=256)
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)
    sae.W_dec.grad = torch.randn_like(sae.W_dec)
    sae.project_decoder_grad_()
    assert float((sae.W_dec.grad * sae.W_dec.detach()).sum(-1).abs().max()) < 1e-5


def test_init_norm_sets_the_decoder_rows_and_the_encoder_is_their_transpose():
    sae = SAE(32, 64, "topk", k=3, normalize_decoder=False, init_norm=0.1)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.full((64,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    unit = SAE(32, 64, "topk", k=3)  # same seed: the same directions
    torch.testing.assert_close(sae.W_dec * 10, unit.W_dec)


def test_gradients_are_clipped_to_clip_grad_norm_before_each_step():
    x, _ = planted(rows=256)
    moved = {}
    for clip in (None, 0.01):
        sae = SAE(32, 64, "topk", k=3, normalize_decoder=False)
        before = [p.detach().clone() for p in sae.parameters()]
        sgd = torch.optim.SGD(sae.parameters(), lr=1.0)  # the step is the gradient itself
        train(sae, x, steps=1, batch_size=256, optimizer=sgd, clip_grad_norm=clip)
        moved[clip] = float(torch.stack([(p.detach() - b).norm() for p, b in zip(
            sae.parameters(), before, strict=True)]).norm())
    assert moved[None] > 0.1
    assert moved[0.01] == pytest.approx(0.01, rel=1e-4)
    with pytest.raises(ValueError, match="clip_grad_norm must be a positive finite float or "
                                         "None, got 0"):
        train(SAE(32, 64), x, steps=1, clip_grad_norm=0)


def test_dead_latents_are_counted_in_tokens_and_aux_loss_recruits_them():
    x, _ = planted(rows=1024)
    sae = SAE(32, 64, "topk", k=3)
    sae.train()
    sae(x[:10])
    dead = sae.dead_latents(10)
    assert int(dead.sum()) >= 64 - 30  # at most 30 of 64 latents fired on 10 tokens
    assert int(sae.tokens_since_fired.max()) == 10
    terms = objective(sae, x[:256], dead=dead)
    assert "aux" in terms and float(terms["aux"].detach()) > 0
    terms["loss"].backward()
    assert sae.W_dec.grad[dead].abs().sum() > 0  # dead rows learn from the residual


def test_decode_paths_agree_with_the_dense_product():
    sae = SAE(16, 96, "topk", k=5)
    x = torch.randn(7, 16)
    with torch.no_grad():
        z = sae.encode(x)
        dense = z @ sae.W_dec + sae.b_dec
        assert torch.allclose(sae.decode(z), dense, atol=1e-5)  # sparse path
        assert torch.allclose(sae(x), dense, atol=1e-5)  # forward: top-k pairs
        assert torch.allclose(sae.decode(z[:1]), dense[:1], atol=1e-5)  # one token
        wide = torch.randn(3, 96)  # not sparse: dense product
        assert torch.allclose(sae.decode(wide), wide @ sae.W_dec + sae.b_dec, atol=1e-4)
        assert sae.decode(z.view(7, 1, 96)).shape == (7, 1, 16)


def test_batchtopk_infers_with_its_learned_threshold():
    x, _ = planted(rows=4096)
    sae = SAE(32, 128, "batchtopk", k=3)
    train(sae, x, steps=50, batch_size=256, lr=3e-3)
    assert float(sae.threshold) > 0
    with torch.no_grad():
        z = sae.encode(x)
    assert torch.all((z == 0) | (z > float(sae.threshold) - 1e-6))
    assert 0.5 < float((z != 0).sum(-1).float().mean()) < 12


def test_jumprelu_threshold_learns_through_the_straight_through_estimator():
    sae = SAE(8, 16, "jumprelu", threshold=0.5, bandwidth=2.0)
    x = torch.randn(64, 8)
    terms = objective(sae, x, sparsity_coef=1.0)
    terms["loss"].backward()
    assert sae.log_threshold.grad is not None and sae.log_threshold.grad.abs().sum() > 0


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"k": 65}, r"k must be an int in \[1, n_latents=64\], got 65"),
    ({"k": 0}, "k must be an int ≥ 1, got 0"),
    ({"activation": "gated"}, "activation"),
    ({"matryoshka": (16, 32)}, "matryoshka must be increasing .* ending at n_latents=64"),
    ({"matryoshka": (32, 16, 64)}, "matryoshka"),
    ({"activation": "jumprelu", "threshold": -1.0}, "threshold must be a positive"),
    ({"init_norm": 0.0}, "init_norm must be a positive finite float, got 0.0"),
])
def test_bad_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAE(16, 64, **kwargs)


def test_wrong_width_activations_are_refused_before_training():
    sae = SAE(16, 64)
    before = sae.W_dec.detach().clone()
    with pytest.raises(ValueError,
                       match=r"activations batch 0 must have shape \(\.\.\., 16\), got"):
        train(sae, [torch.randn(4, 12)], steps=3)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 16\)"):
        sae.encode(torch.randn(3, 15))
    with pytest.raises(ValueError, match=r"z must have shape \(\.\.\., 64\)"):
        sae.decode(torch.randn(3, 16))
    with pytest.raises(TypeError, match="transcoder must be"):
        train(SAE(16, 64, d_out=8), [torch.randn(4, 16)], steps=1)
    with pytest.raises(ValueError, match="batch_size must be an int ≥ 1"):
        train(sae, [torch.randn(4, 16)], batch_size=0)
    assert torch.equal(sae.W_dec, before)


def test_training_streams_a_generator_once_and_rebatches_it():
    sae = SAE(16, 64, k=4)
    chunks = (torch.randn(100, 16) for _ in range(5))  # 500 rows, read once
    out = train(sae, chunks, batch_size=128)
    assert out["steps"] == 4 and out["tokens"] == 500
    with pytest.raises(ValueError, match="activations must hold at least one row"):
        train(sae, [], steps=10)  # nothing to read: an error, not an endless loop


def _killed(sae, latent):
    """``sae`` with ``latent`` unable to fire (zero encoder column, very negative bias)."""
    with torch.no_grad():
        sae.W_enc[:, latent] = 0.0
        sae.b_enc[latent] = -100.0
    return sae


def test_resample_revives_a_dead_latent_and_leaves_the_others_bit_for_bit():
    x, _ = planted(d=16, n=32, rows=2048)
    sae = _killed(SAE(16, 32, "topk", k=3, seed=1), 5)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    train(sae, x[:1024], batch_size=256, optimizer=optimizer, decay=0.0)
    assert all(optimizer.state[p]["exp_avg"].abs().sum() > 0 for p in (sae.W_dec, sae.W_enc))
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    moments = {n: {k: v.clone() for k, v in optimizer.state[p].items()}
               for n, p in sae.named_parameters()}
    dead = torch.zeros(32, dtype=torch.bool)
    dead[5] = True
    sae.tokens_since_fired[5] = 10**6
    out = resample(sae, x[1024:], dead, optimizer=optimizer, encoder_scale=1.0,
                   generator=torch.Generator().manual_seed(0))
    assert out.tolist() == [5]
    alive = ~dead
    assert torch.equal(sae.W_enc[:, alive], before["W_enc"][:, alive])
    assert torch.equal(sae.W_dec[alive], before["W_dec"][alive])
    assert torch.equal(sae.b_enc[alive], before["b_enc"][alive])
    assert torch.equal(sae.b_dec, before["b_dec"])
    for name, where_alive, where_dead in (("W_enc", (slice(None), alive), (slice(None), 5)),
                                          ("W_dec", alive, 5), ("b_enc", alive, 5)):
        state = optimizer.state[dict(sae.named_parameters())[name]]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][where_alive], moments[name][key][where_alive])
            assert not state[key][where_dead].any()  # Adam's moments of the new latent reset
    assert float(sae.W_dec[5].detach().norm()) == pytest.approx(1.0)
    assert float(sae.b_enc[5].detach()) == 0.0 and int(sae.tokens_since_fired[5]) == 0
    live_norm = before["W_enc"][:, alive].norm(dim=0).mean()
    assert float(sae.W_enc[:, 5].detach().norm()) == pytest.approx(float(live_norm), rel=1e-5)
    with torch.no_grad():
        assert (sae.encode(x[1024:])[:, 5] != 0).any()  # it fires again


def test_training_with_resampling_brings_a_dead_latent_back_to_life():
    x, _ = planted(d=16, n=32, rows=4096)
    runs = {}
    for every in (None, 4):
        sae = _killed(SAE(16, 32, "topk", k=3, seed=1), 5)
        # a sharp 32-latent dictionary: a reborn latent needs the live norm to enter the top 3
        out = train(sae, x, steps=16, batch_size=256, lr=3e-3, dead_window=512,
                    resample_every=every, resample_scale=1.0)
        with torch.no_grad():
            runs[every] = (out["resampled"], int((sae.encode(x)[:, 5] != 0).sum()))
    assert runs[None] == (0, 0)  # without resampling it stays dead
    assert runs[4][0] >= 1 and runs[4][1] > 0


def test_resample_refuses_bad_arguments_before_changing_anything():
    sae = SAE(8, 16, "topk", k=2)
    x = torch.randn(10, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    state = {n: p.detach().clone() for n, p in sae.state_dict().items()}
    for kwargs, match in (({"x": torch.randn(10, 7)}, "x must"),
                          ({"dead": torch.zeros(15, dtype=torch.bool)}, "dead must"),
                          ({"dead": torch.zeros(16)}, "dead must"),
                          ({"target": torch.randn(9, 8)}, "target must"),
                          ({"encoder_scale": 0.0}, "encoder_scale must")):
        with pytest.raises(ValueError, match=match):
            resample(sae, **({"x": x, "dead": dead} | kwargs))
    with pytest.raises(TypeError, match="optimizer must"):
        resample(sae, x, dead, optimizer="adam")
    with pytest.raises(ValueError, match="resample_every"):
        train(sae, x, resample_every=0)
    with pytest.raises(ValueError, match="resample_scale"):
        train(sae, x, resample_every=1, resample_scale=float("nan"))
    assert all(torch.equal(state[n], t) for n, t in sae.state_dict().items())


@pytest.mark.parametrize("isa", ["native", "avx2"])
def test_batched_decode_through_the_sparse_input_kernel_matches_embedding_bag(isa):
    if not kernels.available() or isa not in ("native", *kernels.isas()):
        pytest.skip(f"no {isa} kernels here: {kernels.unavailable_reason()}")
    sae = SAE(24, 96, "topk", k=5, seed=2).eval()
    x = torch.randn(3, 7, 24, generator=torch.Generator().manual_seed(0))
    values, indices = sae.encode_sparse(x)
    expected = F.embedding_bag(indices.reshape(-1, 5), sae.W_dec,
                               per_sample_weights=values.reshape(-1, 5).detach(),
                               mode="sum") + sae.b_dec
    context = kernels.use_isa("avx2") if isa == "avx2" else contextlib.nullcontext()
    with torch.no_grad(), context:
        for rows in (1, 8, 21):
            v, i = values.reshape(-1, 5)[:rows], indices.reshape(-1, 5)[:rows]
            assert torch.allclose(sae.decode_sparse(v, i), expected[:rows], atol=1e-5)
        assert torch.allclose(sae.decode_sparse(values, indices).reshape(-1, 24), expected,
                              atol=1e-5)
        padded = torch.cat([values, torch.zeros(3, 7, 2)], -1)  # zero codes read nothing
        assert torch.allclose(sae.decode_sparse(padded, torch.cat(
            [indices, torch.zeros(3, 7, 2, dtype=torch.long)], -1)).reshape(-1, 24),
            expected, atol=1e-5)
        for wrong in (96, -1):  # the kernel trusts its indices: they are checked first
            bad = indices.clone()
            bad[1, 2, 3] = wrong
            with pytest.raises(ValueError, match="indices must lie in"):
                sae.decode_sparse(values, bad)
    # with gradients on, the decode stays differentiable (embedding_bag)
    out = sae.decode_sparse(values, indices)
    out.sum().backward()
    assert sae.W_dec.grad is not None and sae.W_enc.grad is not None


def test_resample_gives_every_dead_latent_its_own_row():
    sae = SAE(8, 16, "topk", k=2, seed=3)
    x = torch.randn(3, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[1, 4, 9]] = True
    for seed in range(5):  # three latents, three rows: each row exactly once
        resample(sae, x, dead, generator=torch.Generator().manual_seed(seed))
        directions = sae.W_dec.detach()[dead]
        expected = (x - sae.b_dec.detach()) / (x - sae.b_dec.detach()).norm(dim=-1, keepdim=True)
        assert torch.allclose((directions @ expected.T).abs().max(0).values, torch.ones(3),
                              atol=1e-5)


@pytest.mark.parametrize("n, count", [(1_572_864, 32_768), (100_000, 3), (500, 400), (7, 7)])
def test_largest_returns_exactly_the_entries_topk_returns(n, count):
    from sparsekit.sae.activations import largest

    flat = torch.randn(n, generator=torch.Generator().manual_seed(n)).relu()
    values, indices = largest(flat, count)
    expected = flat.topk(count, sorted=False)
    assert torch.equal(values.sort().values, expected.values.sort().values)
    assert torch.equal(flat[indices], values) and indices.unique().numel() == count


def test_largest_ranks_everything_when_the_sample_misses_the_largest_entries():
    from sparsekit.sae.activations import largest

    flat = torch.zeros(61 * 1000)
    flat[1::61] = torch.arange(1000, 0, -1).float()  # the strided sample sees only zeros
    values, indices = largest(flat, 500)
    assert torch.equal(values.sort().values, torch.arange(501, 1001).float())
    assert torch.equal(flat[indices], values)


def test_largest_falls_back_to_topk_when_the_sample_overestimates():
    from sparsekit.sae.activations import largest

    flat = torch.rand(61 * 1000, generator=torch.Generator().manual_seed(0))
    flat[::61] += 10.0  # the sample sees only the largest entries
    values, indices = largest(flat, 5000)
    expected = flat.topk(5000, sorted=False)
    assert torch.equal(values.sort().values, expected.values.sort().values)
    assert torch.equal(flat[indices], values)
