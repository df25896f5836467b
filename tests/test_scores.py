import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsekit.scores import CRITERIA, ScoreContext, batches
from sparsekit.targets import batchnorm_scales, resolve_targets

DATA_CRITERIA = ["wanda", "snip", "taylor", "taylor:accumulated", "grasp", "synflow"]
LABEL_CRITERIA = ["snip", "taylor", "taylor:accumulated", "grasp"]


def scores(name, model, data=None, *, targets=None, loss_fn=None, seed=0):
    ctx = ScoreContext(
        model, resolve_targets(model, targets), data, loss_fn, torch.Generator().manual_seed(seed)
    )
    return CRITERIA.get(name)(ctx)


def test_registry_names():
    assert CRITERIA.names() == [
        "flap", "gradient", "graph:barabasi_albert", "graph:erdos_renyi", "graph:watts_strogatz",
        "grasp", "magnitude", "random", "snip", "synflow", "taylor", "taylor:accumulated",
        "wanda",
    ]


# -- magnitude / random -------------------------------------------------------------------


def test_magnitude_is_abs():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[-3.0, 0.5, 0.0], [2.0, -0.25, 1.0]]))
    out = scores("magnitude", model)
    assert list(out) == ["0.weight", "1.weight"]
    assert torch.equal(out["0.weight"], torch.tensor([[3.0, 0.5, 0.0], [2.0, 0.25, 1.0]]))
    assert torch.equal(out["1.weight"], model[1].weight.detach().abs())


def test_magnitude_also_scores_the_batchnorm_scales_it_is_given():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2), nn.Linear(2, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([-0.5, 2.0]))
    ctx = ScoreContext(model, resolve_targets(model), scales=batchnorm_scales(model))
    out = CRITERIA.get("magnitude")(ctx)
    assert list(out) == ["0.weight", "2.weight", "1.weight"]
    assert torch.equal(out["1.weight"], torch.tensor([0.5, 2.0]))
    assert torch.equal(model[1].weight, torch.tensor([-0.5, 2.0]))  # unchanged
    assert list(CRITERIA.get("random")(ctx)) == ["0.weight", "2.weight"]  # targets only


def test_magnitude_is_float32_for_other_dtypes():
    model = nn.Linear(3, 2).double()
    out = scores("magnitude", model)["weight"]
    assert out.dtype == torch.float32
    assert torch.equal(out, model.weight.detach().abs().float())


def test_random_uses_generator_deterministically():
    model = nn.Sequential(nn.Linear(3, 4), nn.Conv1d(1, 2, 3))
    out = scores("random", model, seed=3)
    g = torch.Generator().manual_seed(3)
    expected = [torch.rand(4, 3, generator=g), torch.rand(2, 1, 3, generator=g)]
    assert torch.equal(out["0.weight"], expected[0])
    assert torch.equal(out["1.weight"], expected[1])
    again = scores("random", model, seed=3)
    assert all(torch.equal(out[n], again[n]) for n in out)
    other = scores("random", model, seed=4)
    assert not torch.equal(out["0.weight"], other["0.weight"])


def test_random_does_not_touch_global_rng():
    model = nn.Linear(3, 3)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    scores("random", model)
    assert torch.equal(torch.rand(3), expected)


# -- wanda --------------------------------------------------------------------------------


def wanda_linear():
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.5, 0.5]]))  # equal |W|
    # feature norms: ‖(6, 8)‖ = 10, ‖(0.6, 0.8)‖ = 1, ‖(0.06, 0.08)‖ = 0.1
    x = torch.tensor([[6.0, 0.6, 0.06], [8.0, 0.8, 0.08]])
    return model, x


def test_wanda_orders_by_input_norm():
    model, x = wanda_linear()
    out = scores("wanda", model, x)["weight"]
    assert out.shape == (1, 3)
    assert out.argsort(descending=True).tolist() == [[0, 1, 2]]
    torch.testing.assert_close(out, torch.tensor([[5.0, 0.5, 0.05]]))


def test_wanda_is_abs_w_times_feature_norm():
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    x = torch.randn(7, 5)
    out = scores("wanda", model, x)["weight"]
    norms = torch.stack([x[:, j].pow(2).sum().sqrt() for j in range(5)])
    expected = model.weight.detach().abs() * norms[None, :]
    torch.testing.assert_close(out, expected)


def test_wanda_linear_flattens_leading_dims_and_sums_batches():
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    x = torch.randn(2, 3, 5)  # (batch, tokens, features)
    whole = scores("wanda", model, x)["weight"]
    norms = x.reshape(-1, 5).norm(dim=0)
    torch.testing.assert_close(whole, model.weight.detach().abs() * norms)
    split = scores("wanda", model, [x[:1], x[1:]])["weight"]
    torch.testing.assert_close(split, whole)


def patch_sq_norms(x, kernel, stride, padding):
    """Sum over samples and positions of each (channel, ky, kx) patch entry squared."""
    n, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding))
    out = torch.zeros(c, kernel, kernel)
    for i in range(0, h + 2 * padding - kernel + 1, stride):
        for j in range(0, w + 2 * padding - kernel + 1, stride):
            out += xp[:, :, i:i + kernel, j:j + kernel].pow(2).sum(0)
    return out


def test_wanda_conv2d_uses_unfolded_patch_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU())
    x = torch.randn(2, 2, 5, 5)
    out = scores("wanda", model, x)["0.weight"]
    norms = patch_sq_norms(x, 3, 2, 1).sqrt()  # (2, 3, 3) = (in, kh, kw)
    expected = model[0].weight.detach().abs() * norms[None]
    assert out.shape == (3, 2, 3, 3)
    torch.testing.assert_close(out, expected)
    # padding matters: border patch entries see zeros, so their norms are smaller
    assert norms[:, 0, 0].sum() < norms[:, 1, 1].sum()


def test_wanda_conv1d_uses_unfolded_patch_norms():
    torch.manual_seed(0)
    model = nn.Conv1d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 6)
    out = scores("wanda", model, x)["weight"]
    xp = F.pad(x, (1, 1))
    sq = torch.zeros(2, 3)
    for i in range(6):
        sq += xp[:, :, i:i + 3].pow(2).sum(0)
    torch.testing.assert_close(out, model.weight.detach().abs() * sq.sqrt()[None])


def test_wanda_second_layer_sees_first_layer_output():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        model[2].weight.copy_(torch.tensor([[2.0, 2.0]]))
    x = torch.tensor([[3.0, -4.0], [4.0, 3.0]])
    out = scores("wanda", model, x)
    # hidden = relu([[3, 4], [4, -3]]) = [[3, 4], [4, 0]] → norms (5, 4)
    torch.testing.assert_close(out["2.weight"], torch.tensor([[10.0, 8.0]]))
    torch.testing.assert_close(out["0.weight"], torch.tensor([[5.0, 0.0], [0.0, 5.0]]))


def test_wanda_target_never_reached():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(2, 2)
            self.unused = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match="unused.weight"):
        scores("wanda", Unused(), torch.randn(3, 2))


@pytest.mark.parametrize("targets", [["0.bias"], [nn.BatchNorm1d]])
def test_wanda_rejects_non_weight_targets_clearly(targets):
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    with pytest.raises((ValueError, TypeError), match="wanda"):
        scores("wanda", model, torch.randn(5, 4), targets=targets)


# -- snip / taylor ------------------------------------------------------------------------


def ce_problem():
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(
            torch.tensor([[0.5, -1.0, 0.25, 2.0], [-0.5, 0.75, 1.5, -2.0], [1.0, 0.0, -1.25, 0.1]])
        )
        model.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    return model, x, y


def ce_grad(w, b, x, y):
    """∂ mean-CE / ∂W by hand: (softmax(z) - onehot(y))ᵀ x / B."""
    p = torch.softmax(x @ w.T + b, dim=1)
    return (p - F.one_hot(y, 3).float()).T @ x / x.shape[0]


def test_ce_grad_helper_matches_autograd():
    model, x, y = ce_problem()
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), [model.weight])
    torch.testing.assert_close(ce_grad(model.weight.detach(), model.bias.detach(), x, y), g)


def test_snip_is_normalised_abs_w_times_g():
    model, x, y = ce_problem()
    out = scores("snip", model, (x, y))["weight"]
    w = model.weight.detach()
    raw = (w * ce_grad(w, model.bias.detach(), x, y)).abs()
    torch.testing.assert_close(out, raw / raw.sum())
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))


def test_snip_normalises_over_all_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    out = scores("snip", model, (x, y))
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), [model[0].weight, model[2].weight])
    raw = [(p.detach() * g).abs() for p, g in zip([model[0].weight, model[2].weight], grads)]
    total = raw[0].sum() + raw[1].sum()
    torch.testing.assert_close(out["0.weight"], raw[0] / total)
    torch.testing.assert_close(out["2.weight"], raw[1] / total)
    torch.testing.assert_close(out["0.weight"].sum() + out["2.weight"].sum(), torch.tensor(1.0))


def test_taylor_is_abs_w_times_g():
    model, x, y = ce_problem()
    out = scores("taylor", model, (x, y))["weight"]
    w = model.weight.detach()
    torch.testing.assert_close(out, (w * ce_grad(w, model.bias.detach(), x, y)).abs())


def two_batches():
    """ce_problem split into two calibration batches, with each batch's weight gradient."""
    model, x, y = ce_problem()
    w, b = model.weight.detach(), model.bias.detach()
    halves = [(x[:3], y[:3]), (x[3:], y[3:])]
    return model, w, halves, ce_grad(w, b, *halves[0]), ce_grad(w, b, *halves[1])


def test_snip_averages_gradients_over_batches_taylor_averages_scores():
    model, w, halves, g1, g2 = two_batches()
    snip = scores("snip", model, halves)["weight"]
    raw = (w * (g1 + g2) / 2).abs()
    torch.testing.assert_close(snip, raw / raw.sum())
    taylor = scores("taylor", model, halves)["weight"]
    torch.testing.assert_close(taylor, ((w * g1).abs() + (w * g2).abs()) / 2)


def test_accumulated_taylor_is_abs_w_times_summed_g():
    # Torch-Pruning's TaylorImportance: .backward() on each batch sums the gradients,
    # then |w·Σg|; differs from "taylor" where a gradient entry flips sign between batches
    model, w, halves, g1, g2 = two_batches()
    out = scores("taylor:accumulated", model, halves)["weight"]
    torch.testing.assert_close(out, (w * (g1 + g2)).abs())
    assert ((g1 * g2) < 0).any()  # some entries cancel, so the two forms rank differently
    per_batch = scores("taylor", model, halves)["weight"]
    assert not torch.allclose(out, 2 * per_batch)
    snip = scores("snip", model, halves)["weight"]
    torch.testing.assert_close(snip, out / out.sum())


def test_custom_loss_fn():
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0], [3.0, 0.5]]))
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    y = torch.tensor([[1.0, 0.0], [0.0, 2.0]])

    def loss_fn(out, target):  # L = Σ out ⊙ target → ∂L/∂W = targetᵀ x
        return (out * target).sum()

    out = scores("taylor", model, (x, y), loss_fn=loss_fn)["weight"]
    g = y.T @ x  # [[1, 2], [6, -2]]
    torch.testing.assert_close(out, (model.weight.detach() * g).abs())
    torch.testing.assert_close(out, torch.tensor([[1.0, 4.0], [18.0, 1.0]]))


# -- grasp --------------------------------------------------------------------------------


def test_grasp_is_w_times_hessian_gradient_product():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    out = scores("grasp", model, (x, y))

    b1, b2 = model[0].bias.detach(), model[2].bias.detach()

    def loss(w1, w2):
        logits = F.linear(torch.tanh(F.linear(x, w1, b1)), w2, b2)
        return F.cross_entropy(logits / 200.0, y)

    w = (model[0].weight.detach().clone(), model[2].weight.detach().clone())
    g = torch.autograd.grad(loss(*[t.requires_grad_(True) for t in w]), w)
    w = tuple(t.detach() for t in w)
    _, hg = torch.autograd.functional.hvp(loss, w, g)
    expected = {"0.weight": (w[0] * hg[0]).float(), "2.weight": (w[1] * hg[1]).float()}
    assert out["0.weight"].dtype == torch.float32
    for n in expected:
        torch.testing.assert_close(out[n], expected[n], rtol=1e-5, atol=1e-12)
    # the product is signed (not an absolute value)
    assert (out["0.weight"] < 0).any() and (out["0.weight"] > 0).any()


def test_grasp_temperature_matters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])
    targets = resolve_targets(model)
    cold = CRITERIA.get("grasp")(ScoreContext(model, targets, (x, y)), temperature=1.0)
    hot = CRITERIA.get("grasp")(ScoreContext(model, targets, (x, y)))
    assert not torch.allclose(cold["0.weight"], hot["0.weight"])


# -- synflow ------------------------------------------------------------------------------


def synflow_net():
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(
            torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.5, 0.5], [3.0, 0.0, 1.0], [0.0, 0.0, 0.25]])
        )
        model[1].weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 4.0], [0.5, 3.0, 1.0, 0.0]]))
    return model


def test_synflow_by_hand():
    model = synflow_net()
    w1, w2 = model[0].weight.detach(), model[1].weight.detach()
    out = scores("synflow", model, torch.randn(5, 3))
    # R = 1ᵀ W2 W1 1 → ∂R/∂W1[i, j] = Σ_k W2[k, i];  ∂R/∂W2[k, i] = Σ_j W1[i, j]
    col = w2.sum(0)  # [1.5, 3, 3, 4]
    row = w1.sum(1)  # [3, 1.5, 4, 0.25]
    torch.testing.assert_close(out["0.weight"], w1 * col[:, None])
    torch.testing.assert_close(out["1.weight"], w2 * row[None, :])
    torch.testing.assert_close(
        out["1.weight"], torch.tensor([[3.0, 0.0, 8.0, 1.0], [1.5, 4.5, 4.0, 0.0]])
    )


def test_synflow_invariant_to_sign_flips_and_input_values():
    model = synflow_net()
    ref = scores("synflow", model, torch.randn(5, 3))
    with torch.no_grad():
        model[0].weight[::2].neg_()
        model[1].weight[:, 1:3].neg_()
    flipped = scores("synflow", model, torch.zeros(1, 3))  # only the input shape matters
    for n in ref:
        torch.testing.assert_close(flipped[n], ref[n])


def test_synflow_needs_no_labels_and_accepts_pairs():
    model = synflow_net()
    x = torch.randn(5, 3)
    a = scores("synflow", model, x)
    b = scores("synflow", model, (x, torch.zeros(5, dtype=torch.long)))
    assert all(torch.equal(a[n], b[n]) for n in a)


# -- criteria leave the model unchanged ---------------------------------------------------


def bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: (p.grad, None if p.grad is None else p.grad.clone())
                  for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": [m.training for m in model.modules()],
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modes"] == before["modes"]
    assert after["requires_grad"] == before["requires_grad"]
    assert before["params"].keys() == after["params"].keys()
    for n, p in before["params"].items():
        assert torch.equal(after["params"][n], p), n
    for n, b in before["buffers"].items():
        assert torch.equal(after["buffers"][n], b), n
    for n, (obj, value) in before["grads"].items():
        obj_after, value_after = after["grads"][n]
        assert obj_after is obj, n
        if value is not None:
            assert torch.equal(value_after, value), n


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("criterion", ["magnitude", "random", *DATA_CRITERIA])
def test_criteria_leave_model_unchanged(criterion, train):
    model = bn_model().train(train)
    model[1].running_mean.fill_(0.25)
    model[1].running_var.fill_(2.0)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = snapshot(model)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    out = scores(criterion, model, (x, y))
    assert list(out) == ["0.weight", "3.weight"]
    assert all(out[n].shape == before["params"][n].shape for n in out)
    assert all(torch.isfinite(s).all() for s in out.values())
    assert_unchanged(model, before)
    assert model.training is train and model[1].training is train


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_criteria_keep_mixed_module_modes(criterion):
    model = bn_model().train()
    model[1].eval()  # frozen BatchNorm, a common fine-tuning setup
    modes = [m.training for m in model.modules()]
    scores(criterion, model, (torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])))
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_criteria_keep_missing_grads_missing(criterion):
    model = bn_model()
    before = snapshot(model)
    scores(criterion, model, [(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))] * 2)
    assert all(p.grad is None for p in model.parameters())
    assert_unchanged(model, before)


def test_bn_train_mode_is_used_by_gradient_criteria():
    # in train mode BN normalises with batch statistics: scores differ from eval mode
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    model = bn_model()
    model[1].running_mean.fill_(3.0)
    train_scores = scores("taylor", model.train(), (x, y))
    eval_scores = scores("taylor", model.eval(), (x, y))
    assert not torch.allclose(train_scores["0.weight"], eval_scores["0.weight"])


# -- data forms ---------------------------------------------------------------------------


def data_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(8, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 1, 0])
    return model, x, y


def data_forms(x, y, *, labels: bool):
    forms = {
        "pair": (x, y),
        "list of pairs": [(x[:4], y[:4]), (x[4:], y[4:])],
        "list of list pairs": [[x[:4], y[:4]], [x[4:], y[4:]]],
        "dataloader": DataLoader(TensorDataset(x, y), batch_size=4),
    }
    if not labels:
        forms["tensor"] = x
        forms["list of tensors"] = [x[:4], x[4:]]
    return forms


@pytest.mark.parametrize("criterion", ["wanda", "snip"])
def test_data_forms_are_equivalent(criterion):
    model, x, y = data_problem()
    forms = data_forms(x, y, labels=criterion == "snip")
    results = {name: scores(criterion, model, data) for name, data in forms.items()}
    ref = results["pair"]
    for name, out in results.items():
        for n in ref:
            torch.testing.assert_close(out[n], ref[n], msg=f"{name}: {n}")


@pytest.mark.parametrize("criterion", ["wanda", "synflow"])
def test_dataloader_over_inputs_only(criterion):
    model, x, _ = data_problem()
    out = scores(criterion, model, DataLoader(TensorDataset(x), batch_size=4))
    ref = scores(criterion, model, x)
    for n in ref:
        torch.testing.assert_close(out[n], ref[n])


@pytest.mark.parametrize("criterion", ["taylor", "grasp", "synflow"])
def test_dataloader_accepted(criterion):
    model, x, y = data_problem()
    out = scores(criterion, model, DataLoader(TensorDataset(x, y), batch_size=4))
    assert list(out) == ["0.weight", "2.weight"]


def test_batches_normalises_forms():
    x, y = torch.randn(4, 2), torch.arange(4)
    assert [(a is x, b) for a, b in batches(x)] == [(True, None)]
    ((a, b),) = batches((x, y))
    assert a is x and b is y
    out = list(batches([x, x]))  # a list is a list of batches, never a pair
    assert len(out) == 2 and all(b is None for _, b in out)
    out = list(batches(DataLoader(TensorDataset(x, y), batch_size=3)))
    assert [tuple(a.shape) for a, _ in out] == [(3, 2), (1, 2)]
    assert torch.equal(torch.cat([b for _, b in out]), y)


@pytest.mark.parametrize("criterion", LABEL_CRITERIA)
@pytest.mark.parametrize("form", ["tensor", "list of tensors"])
def test_labels_required(criterion, form):
    model, x, _ = data_problem()
    data = x if form == "tensor" else [x[:4], x[4:]]
    with pytest.raises(ValueError, match="labels") as err:
        scores(criterion, model, data)
    assert repr(criterion) in str(err.value)


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_data_required(criterion):
    model, _, _ = data_problem()
    with pytest.raises(ValueError, match=rf"criterion '{criterion}' needs data="):
        scores(criterion, model)


@pytest.mark.parametrize("criterion", DATA_CRITERIA)
def test_empty_data(criterion):
    model, _, _ = data_problem()
    with pytest.raises(ValueError, match="holds no batches"):
        scores(criterion, model, [])


@pytest.mark.parametrize("data", [5, {"x": 1}, [3.0]])
def test_bad_data_type(data):
    model, _, _ = data_problem()
    with pytest.raises(TypeError, match="data"):
        scores("wanda", model, data)


def test_data_free_criteria_ignore_data():
    model, x, y = data_problem()
    a = scores("magnitude", model, None)
    b = scores("magnitude", model, (x, y))
    assert all(torch.equal(a[n], b[n]) for n in a)
