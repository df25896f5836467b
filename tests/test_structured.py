import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekit
from sparsekit.models import LeNet5, ResNetSmall
from sparsekit.scores import CRITERIA, ScoreContext
from sparsekit.structured import dependency_groups, shrink
from sparsekit.structured.importance import group_importance
from sparsekit.targets import batchnorm_scales, resolve_targets


def _settle(model, x):
    """Give BatchNorm real running statistics, then switch to eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    return model.eval()


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(10)
        self.c = nn.Conv2d(10, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)
        y = F.relu(self.c(self.bn(y)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Depthwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # channel multiplier 2
        self.bn_dw = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = F.relu(self.bn_dw(self.dw(x)))
        x = F.max_pool2d(self.pw(x), 2)
        return self.head(x.flatten(1))


def _mlp():
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 16), nn.ReLU(),
                         nn.Linear(16, 4))


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _slices(group):
    return {(s.name, s.dim, s.role, s.offset, s.repeat) for s in group.slices}


# -- dependency groups --------------------------------------------------------------------


def test_resnet_residual_groups_join_every_branch():
    groups = {g.name: g for g in dependency_groups(ResNetSmall(width=4))}
    stem = groups["conv1"]  # stem + the residual stream of stage 1
    names = {s.name for s in stem.slices}
    assert {"conv1.weight", "bn1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight",
            "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight"} <= names
    assert ("layer1.0.conv1.weight", 1, "in", 0, 1) in _slices(stem)
    assert ("layer1.0.conv2.weight", 0, "out", 0, 1) in _slices(stem)
    inner = groups["layer1.0.conv1"]  # conv → BN → next conv
    assert _slices(inner) == {
        ("layer1.0.conv1.weight", 0, "out", 0, 1), ("layer1.0.bn1.weight", 0, "out", 0, 1),
        ("layer1.0.bn1.bias", 0, "out", 0, 1), ("layer1.0.bn1.running_mean", 0, "out", 0, 1),
        ("layer1.0.bn1.running_var", 0, "out", 0, 1), ("layer1.0.conv2.weight", 1, "in", 0, 1)}
    assert "fc" not in groups  # the output stays whole
    last = groups["layer3.0.conv2"]
    assert ("fc.weight", 1, "in", 0, 1) in _slices(last)


def test_concat_groups_keep_their_offsets():
    groups = {g.name: g for g in dependency_groups(Concat())}
    assert ("c.weight", 1, "in", 0, 1) in _slices(groups["a"])
    assert ("c.weight", 1, "in", 4, 1) in _slices(groups["b"])
    assert ("bn.weight", 0, "out", 4, 1) in _slices(groups["b"])


def test_depthwise_passes_its_input_space_through():
    groups = {g.name: g for g in dependency_groups(Depthwise())}
    stem = _slices(groups["stem"])
    assert ("dw.weight", 0, "out", 0, 2) in stem and ("bn_dw.weight", 0, "out", 0, 2) in stem
    assert ("pw.weight", 1, "in", 0, 2) in stem
    assert ("head.weight", 1, "in", 0, 16) in _slices(groups["pw"])  # flatten → linear


def test_view_as_flatten():
    class Viewed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(4 * 4 * 4, 2)

        def forward(self, x):
            y = F.relu(self.conv(x))
            return self.fc(y.view(y.size(0), -1))

    model = Viewed()
    (group,) = dependency_groups(model)
    assert ("fc.weight", 1, "in", 0, 16) in _slices(group)
    x = torch.randn(2, 1, 6, 6)
    masks = sparsekit.prune(model, 0.5, pattern="channel")
    small = shrink(model, masks)
    assert small.fc.in_features == 32
    torch.testing.assert_close(small(x), model(x))


def test_mlp_and_lenet_flatten_groups():
    assert [g.name for g in dependency_groups(_mlp())] == ["0", "2"]
    lenet = {g.name: g for g in dependency_groups(LeNet5())}
    assert ("fc1.weight", 1, "in", 0, 25) in _slices(lenet["conv2"])


class Tied(nn.Module):
    def __init__(self, tie_through_fc: bool):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight
        self.through = tie_through_fc

    def forward(self, ids):
        x = self.emb(ids)
        return self.head(F.relu(self.fc(x)) if self.through else F.relu(x))


def test_tied_weights_are_one_slice_or_frozen():
    groups = dependency_groups(Tied(False))
    assert [g.name for g in groups] == ["emb"]
    names = {s.name for s in groups[0].slices}
    assert names == {"emb.weight", "head.weight"}  # one tensor, one cut
    # the tied weight would be cut by two different spaces: both keep their width
    assert dependency_groups(Tied(True)) == []


@pytest.mark.parametrize("masks", ["zeros", "emb.weight", "head.weight"])
def test_shrink_cuts_a_tied_weight_once(masks):
    model = Tied(False)
    ids = torch.randint(0, 11, (2, 5))
    keep = torch.ones(11, 6, dtype=torch.bool)
    keep[:, :2] = False
    if masks == "zeros":
        with torch.no_grad():
            model.emb.weight[:, :2] = 0
        table = None
    else:
        table = {masks: keep}
        with torch.no_grad():
            model.emb.weight.masked_fill_(~keep, 0)
    small = shrink(model, table)
    assert small.emb.weight is small.head.weight and small.emb.weight.shape == (11, 4)
    assert (small.emb.embedding_dim, small.head.in_features) == (4, 4)
    torch.testing.assert_close(small(ids), model(ids))


def test_layer_called_twice_is_frozen():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(F.relu(self.a(F.relu(self.a(x)))))

    assert dependency_groups(Twice()) == []


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else x


def test_untraceable_model_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 4), Branchy(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"cannot trace Sequential with torch.fx to find its "
                       r"dependency groups in submodule 1 \(Branchy\): TraceError"):
        sparsekit.prune(model, 0.5, pattern="channel")
    with pytest.raises(ValueError, match="not changed|cannot trace"):
        shrink(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        dependency_groups("resnet")


# -- pattern="channel" + shrink -----------------------------------------------------------


@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("make, shape", [
    (lambda: ResNetSmall(width=8), (4, 1, 28, 28)),
    (Concat, (4, 3, 8, 8)),
    (Depthwise, (4, 3, 8, 8)),
    (_mlp, (4, 20)),
    (LeNet5, (4, 1, 28, 28)),
])
def test_shrink_matches_the_masked_model(make, shape, allocation):
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = _settle(make(), x)
    masks = sparsekit.prune(model, 0.5, pattern="channel", allocation=allocation)
    assert masks.pattern == "channel"
    with torch.no_grad():
        expected = model(x)
        small = shrink(model, masks)
        got = small(x)
    assert _count(small) < _count(model)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert shrink(small, None).state_dict().keys() == small.state_dict().keys()


def test_shrink_mlp_parameter_count_and_attributes():
    model = _mlp()
    masks = sparsekit.prune(model, 0.5, pattern="channel")
    small = shrink(model, masks)
    assert [small[i].out_features for i in (0, 2, 4)] == [15, 8, 4]
    assert [small[i].in_features for i in (0, 2, 4)] == [20, 15, 8]
    assert _count(small) == 20 * 15 + 15 + 15 * 8 + 8 + 8 * 4 + 4
    assert _count(model) == 20 * 30 + 30 + 30 * 16 + 16 + 16 * 4 + 4  # unchanged


def test_shrink_depthwise_attributes():
    model = Depthwise().eval()
    small = shrink(model, sparsekit.prune(model, 0.5, pattern="channel"))
    assert (small.dw.in_channels, small.dw.groups, small.dw.out_channels) == (4, 4, 8)
    assert small.bn_dw.num_features == 8 and small.pw.in_channels == 8
    assert small.head.in_features == 6 * 16


def test_channel_scores_come_from_the_registered_criteria():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randn(8, 20)
    with torch.no_grad():
        model[0].weight[:15] *= 10  # rows 0..14 carry the weight mass
    masks = sparsekit.prune(model, 0.5, pattern="channel", method="magnitude")
    assert masks.masks["0.weight"][:15].all() and not masks.masks["0.weight"][15:].any()
    assert not masks.masks["2.weight"][:, 15:].any()  # reader columns go with them
    labels = torch.randint(0, 4, (8,))
    for method, data in [("wanda", x), ("snip", (x, labels)), ("taylor", (x, labels))]:
        m = _mlp()
        masks = sparsekit.prune(m, 0.5, pattern="channel", method=method, data=data)
        assert int(masks.masks["0.weight"].all(1).sum()) == 15
        assert set(masks.masks) == {"0.weight", "2.weight", "4.weight"}  # the targets only


def test_channel_magnitude_counts_the_batchnorm_scale_of_each_channel():
    # Torch-Pruning's group magnitude: γ is one more member of the group. By hand, mean
    # |entry| per channel over writer row, γ and reader column:
    #   channel 0: (3 + 0 + 0.5 + 1) / 4 = 1.125    without γ: (3 + 0 + 1) / 3 = 1.33
    #   channel 1: (1 + 1 + 4.0 + 1) / 4 = 1.75                (1 + 1 + 1) / 3 = 1.0
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2), nn.ReLU(),
                          nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 0.0], [1.0, 1.0]]))
        model[1].weight.copy_(torch.tensor([0.5, 4.0]))
        model[3].weight.copy_(torch.tensor([[1.0, 1.0]]))
    group = dependency_groups(model)[0]
    ctx = ScoreContext(model, resolve_targets(model), scales=batchnorm_scales(model))
    torch.testing.assert_close(group_importance(group, CRITERIA.get("magnitude")(ctx)),
                               torch.tensor([1.125, 1.75]))
    gamma = model[1].weight.detach().clone()
    masks = sparsekit.prune(model, 0.5, pattern="channel", method="magnitude")
    assert masks.masks["0.weight"].tolist() == [[False, False], [True, True]]  # γ decides
    assert masks.masks["3.weight"].tolist() == [[False, True]]
    assert torch.equal(model[1].weight, gamma)  # scored, never masked
    # the unstructured pattern scores the targets alone, as before
    masks = sparsekit.prune(_mlp(), 0.5, method="magnitude")
    assert set(masks.masks) == {"0.weight", "2.weight", "4.weight"}


def test_group_keeps_at_least_one_channel():
    model = _mlp()
    masks = sparsekit.prune(model, 0.99, pattern="channel")
    small = shrink(model, masks)
    assert [small[i].out_features for i in (0, 2)] == [1, 1]


def test_groups_with_an_excluded_layer_keep_their_width():
    model = _mlp()
    masks = sparsekit.prune(model, 0.5, pattern="channel", exclude=["4"])
    small = shrink(model, masks)
    assert [small[i].out_features for i in (0, 2)] == [15, 16]  # "4" reads the second group


class GroupNormed(nn.Module):
    """A conv whose channels a GroupNorm mixes: the model has no removable group."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(F.relu(self.gn(self.a(x))))


@pytest.mark.parametrize("make, kwargs, match", [
    (GroupNormed, {}, "the model has no dependency group whose channels can be removed"),
    (_mlp, {"exclude": ["2"]}, "none of the model's 2 dependency group"),
    (_mlp, {"targets": ["0"]}, "targets and exclude must take each group's layers all or none"),
    (_mlp, {"sparsity": 0.01}, "kept count rounds to all of its channels; use a larger sparsity"),
    (_mlp, {"sparsity": 0.05, "pattern": "channel:8"}, "rounds to all of its channels with "
                                                        "round_to=8; .* or a smaller round_to"),
])
def test_a_channel_prune_that_removes_nothing_is_refused(make, kwargs, match):
    """A sparsity above 0 that removes no channel is a ValueError saying why, the model
    untouched: a dense MaskSet came back, silently (sparsity 0)."""
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = {"sparsity": 0.5, "pattern": "channel", **kwargs}
    with pytest.raises(ValueError, match=rf"sparsity={args['sparsity']} removes no channel of "
                                         rf"any group: .*{match}.*the model was not changed"):
        sparsekit.prune(model, **args)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    masks = sparsekit.prune(model, 0.0, pattern="channel")  # sparsity 0 asks for nothing
    assert masks.sparsity() == 0


def test_channel_pattern_runs_under_a_gradual_schedule():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = sparsekit.GradualPruner(model, 0.5, start_step=0, end_step=4, every=1,
                                     pattern="channel", optimizer=opt)
    x = torch.randn(4, 20)
    for _ in range(5):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        pruner.step()
    small = shrink(model, pruner.masks)
    assert [small[i].out_features for i in (0, 2)] == [15, 8]
    torch.testing.assert_close(small(x), model(x))


def test_shrink_removes_groups_that_reached_zero():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[:, :10] = 0  # readers of hidden units 0..9 are zero
    small = shrink(model)
    assert small[0].out_features == 20 and small[2].in_features == 20
    x = torch.randn(3, 20)
    torch.testing.assert_close(small(x), model(x))


def test_shrink_rejects_masks_that_do_not_fit():
    model = _mlp()
    with pytest.raises(ValueError, match="not a parameter"):
        shrink(model, {"nope.weight": torch.ones(3)})
    with pytest.raises(ValueError, match=r"masks\['0.weight'\] has shape \(2,\)"):
        shrink(model, {"0.weight": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(TypeError, match="masks must be a MaskSet"):
        shrink(model, [1, 2])


def test_channel_pattern_is_registered():
    assert str(sparsekit.parse_pattern("channel")) == "channel"
    with pytest.raises(ValueError, match="masks whole groups across layers"):
        sparsekit.parse_pattern("channel").mask(torch.ones(2, 2), 2)


def test_report_compares_the_shrunk_model_with_the_original():
    torch.manual_seed(0)
    x = torch.randn(2, 1, 28, 28)
    model = _settle(ResNetSmall(width=8), x)
    small = shrink(model, sparsekit.prune(model, 0.5, pattern="channel"))
    before, after = sparsekit.report(model, x), sparsekit.report(small, x)
    ratio = after.relative_to(before)
    assert ratio["params"] == after.totals["params"] / before.totals["params"]
    assert 0.2 < ratio["params"] < 0.35 and 0.2 < ratio["dense_flops"] < 0.35  # ~ (1/2)²
    with pytest.raises(TypeError, match="before must be a Report"):
        after.relative_to(model)


def test_benchmark_quick_run(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "structured.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--no-check", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "structured_quick.json").read_text())
    assert [r["model"] for r in data["rows"]][:1] == ["dense"]
    assert all(c["ok"] for c in data["checks"] if "shrunk == masked" in c["claim"])
    # the latency claim: both layouts, on the trained net and on the wider, larger one
    claims = [c["claim"] for c in data["checks"] if "latency cut" in c["claim"]]
    assert any(c.endswith("channels_last") for c in claims)
    assert any("inputs)" in c for c in claims)
    assert [r["model"] for r in data["scale_rows"]][:1] == ["dense"]
    assert all(r["batch64_cl_speedup"] > 0 for r in data["rows"] + data["scale_rows"])
    # as deployed with a compiler: a column and a check beside the eager ones
    assert any(c.endswith("torch.compile") for c in claims)
    assert all(r["batch64_compiled_speedup"] > 0 and r["compile_s"] > 0
               for r in data["rows"] + data["scale_rows"])
    # accuracy over fine-tuning seeds: every pruned row fine-tuned once per seed
    seeds = data["setup"]["seeds"]
    assert seeds >= 2
    assert all(len(r["accuracies"]) == seeds for r in data["rows"][1:])
    assert all(r["accuracy"] == pytest.approx(sum(r["accuracies"]) / seeds)
               for r in data["rows"][1:])


def test_benchmark_accuracy_only_run_times_nothing(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "structured.py"
    result = subprocess.run([sys.executable, str(script), "--quick", "--no-latency", "--no-check",
                             "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "structured_quick_accuracy.json").read_text())
    assert not (tmp_path / "structured_quick.json").exists()
    assert data["scale_rows"] == []
    assert not any("latency" in c["claim"] for c in data["checks"])
    peers = importlib.util.find_spec("torch_pruning") is not None  # the bench extra
    assert any("mean accuracy" in c["claim"] for c in data["checks"]) == peers
    assert all(len(r["accuracies"]) == data["setup"]["seeds"] for r in data["rows"][1:])
    assert not any(k.endswith(("_ms", "_speedup")) for r in data["rows"] for k in r)
    text = (tmp_path / "structured_quick_accuracy.md").read_text()
    assert "accuracy only" in text and "speed-up" not in text
    rejected = subprocess.run([sys.executable, str(script), "--llm", "--no-latency"],
                              capture_output=True, text=True, timeout=300)
    assert rejected.returncode == 2 and "--no-latency" in rejected.stderr


def test_benchmark_accuracy_check_compares_means_over_seeds():
    # in a subprocess: importing the benchmark registers its criterion in CRITERIA
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    code = """
import json, sys
sys.path.insert(0, sys.argv[1])
from structured import accuracy_checks, seed_spread
row = {"library": "sparsekit", "macs_vs_dense": 0.5}
peer = {"library": "torch-pruning", "macs_vs_dense": 0.5}
rows = [  # seed 2 alone would miss by 1.0 point; the means are 0.1 apart
    {**row, "model": "sparsekit taylor -50%", **seed_spread([88.0, 90.0, 89.0])},
    {**peer, "model": "torch-pruning taylor -50%", **seed_spread([89.0, 89.0, 89.3])},
    {**row, "model": "sparsekit magnitude -50%", **seed_spread([88.0, 88.2, 88.1])},
    {**peer, "model": "torch-pruning magnitude -50%", **seed_spread([89.0, 88.0, 89.0])},
    {**row, "model": "sparsekit taylor -70%", **seed_spread([80.0])},  # no peer
    # as accurate, but at 6 % fewer MACs than its peer: no comparison, a miss
    {**row, "model": "sparsekit magnitude -70%", **seed_spread([88.0]), "macs_vs_dense": 0.301},
    {**peer, "model": "torch-pruning magnitude -70%", **seed_spread([88.0]),
     "macs_vs_dense": 0.321},
]
print(json.dumps({"checks": accuracy_checks(rows), "one": seed_spread([80.0])}))
"""
    result = subprocess.run([sys.executable, "-c", code, str(bench)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    checks = out["checks"]
    assert [c["ok"] for c in checks] == [True, False, False]
    assert [c["value"] for c in checks] == [-0.1, -0.57, 0.0]
    assert "over 3 seeds" in checks[0]["claim"] and "at MACs within 1% of its" in checks[0]["claim"]
    assert "MACs 0.301 vs 0.321 of dense" in checks[2]["claim"]
    assert "89.00 ± 1.00 vs 89.10 ± 0.17" in checks[0]["claim"]
    assert out["one"] == {"accuracy": 80.0, "accuracy_std": 0.0, "accuracies": [80.0]}


def test_benchmark_exits_nonzero_on_a_miss(tmp_path):
    # one subprocess (importing the benchmark registers its criterion) for the three cases
    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    code = """
import contextlib, io, json, sys
sys.path.insert(0, sys.argv[1])
import structured
out = []
for ok, no_check in (("miss", "check"), ("miss", "no-check"), ("ok", "check")):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = structured.conclude(structured.Path(sys.argv[2]), [], [
            {"claim": "c", "ok": ok == "ok", "value": 0}], no_check == "no-check")
    out.append([status, "MISS: c" in printed.getvalue()])
print(json.dumps(out))
"""
    result = subprocess.run([sys.executable, "-c", code, str(bench), str(tmp_path / "out.md")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # a miss exits 1 and is printed; --no-check prints it and exits 0
    assert json.loads(result.stdout.splitlines()[-1]) == [[1, True], [0, True], [0, False]]


def test_interleaved_speedup_is_the_median_of_per_round_ratios():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_timing.py"
    spec = importlib.util.spec_from_file_location("_bench_timing", path)
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    # a load spike in round 2 slows both sides alike: the ratio stays 2
    rounds = {"dense": [2.0, 2.0, 20.0, 2.0], "small": [1.0, 1.0, 10.0, 1.0]}
    assert timing.median_ratios(rounds, "dense") == {"dense": 1.0, "small": 2.0}
    calls = []
    got = timing.time_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                             0.0, block_s=0.0, min_rounds=3)
    assert [len(v) for v in got.values()] == [3, 3]
    assert calls[4:] == ["a", "b"] * 3  # two warm-up calls each, then turns
    assert timing.time_ms({"a": lambda: None}, 0.0, min_rounds=2)["a"] >= 0
    # a block is at most a quarter of the budget: no budget, one call per block
    calls.clear()
    timing.time_rounds({"a": lambda: calls.append("a")}, 0.0, min_rounds=2)
    assert len(calls) == 2 + 2
