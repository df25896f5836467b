"""Hostile inputs, round 19: sparse attention patterns and activation-sparsity calibration."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from sparsekit.activation import ActivationSparsity, calibrate, profile
from sparsekit.activation.allocation import greedy
from sparsekit.attention import ATTENTION_PATTERNS, BreakEven, resolve_pattern


def qk(q_len: int = 32, kv_len: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 2, q_len, 8, generator=g), torch.randn(1, 2, kv_len, 8, generator=g)


class Block(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.drop = nn.Dropout(dropout)
        self.down_proj = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.drop(torch.relu(self.up(x))))


class Stack(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block(dropout), Block(dropout)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def data() -> torch.Tensor:
    return torch.randn(32, 8, generator=torch.Generator().manual_seed(1))


# -- attention ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ATTENTION_PATTERNS))
@pytest.mark.parametrize(("q_len", "kv_len"), [(0, 32), (32, 0)])
def test_patterns_of_an_empty_sequence_give_an_empty_mask(name, q_len, kv_len):
    # was "q_len must be an int ≥ 1", an argument no caller of block_mask passes
    q, k = qk(q_len, kv_len)
    options = {"mask": torch.ones(1, 1, 1, 1, dtype=torch.bool)} if name == "mask" else {}
    mask = ATTENTION_PATTERNS.get(name)(**options).block_mask(q, k, block_size=8)
    assert mask.dtype == torch.bool and not mask.any()
    assert mask.shape[2:] == (-(-q_len // 8), -(-kv_len // 8))


@pytest.mark.parametrize("name", ["dense", "exact", "top_k"])
def test_coverage_of_an_empty_sequence_names_q_and_k(name):
    q, k = qk(0, 32)
    with pytest.raises(ValueError, match=r"q and k must have seq ≥ 1 for a coverage"):
        ATTENTION_PATTERNS.get(name)().coverage(q, k, block_size=8)


@pytest.mark.parametrize("pattern", ["top_k", torch.ones(1, 1, 4, 4, dtype=torch.bool)])
def test_resolve_pattern_names_an_unknown_option_and_the_accepted_ones(pattern):
    # was "TopKBlocks.__init__() got an unexpected keyword argument 'desnity'"
    with pytest.raises(TypeError, match=r"options \['desnity'\] are not options of pattern "
                                        r"'(top_k|mask)'; accepted: \[('density')?\]"):
        resolve_pattern(pattern, desnity=0.2)


def test_resolve_pattern_still_takes_its_options():
    assert resolve_pattern("top_k", density=0.2).density == 0.2
    assert resolve_pattern("antidiagonal", stride=4, threshold=0.8).stride == 4


@pytest.mark.parametrize("reading", ["now", float("nan"), None, True])
def test_break_even_clock_readings_must_be_finite_numbers(reading):
    # a str was "unsupported operand type(s) for -"; NaN decided dense without a word
    readings = iter([0.0, reading, 2.0])
    be = BreakEven(clock=lambda: next(readings))
    with pytest.raises(TypeError, match=r"clock must return seconds as a finite real number"):
        be.run("call", lambda: "dense", lambda: "sparse")
    assert be.decisions == {}


def test_apply_of_a_meta_user_mask_is_refused_before_switching():
    transformers = pytest.importorskip("transformers")
    import sparsekit.attention as attention

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device="meta")
    # the switch succeeded and every forward then failed on the mask
    with pytest.raises(ValueError, match="pattern is on the meta device"):
        attention.apply(model, mask)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "sparse_attention") for m in model.modules())


# -- activation sparsity --------------------------------------------------------------------


def test_greedy_allocation_runs_blocks_in_eval_mode_and_keeps_the_mode():
    # in training mode dropout made every block error random: one seed, many allocations
    model = Stack(dropout=0.5).train()
    first = calibrate(model, data(), allocation="greedy", seed=0).sparsities
    second = calibrate(model, data(), allocation="greedy", seed=0).sparsities
    assert first == second
    assert first == calibrate(Stack(dropout=0.5).eval(), data(), allocation="greedy").sparsities
    assert all(m.training for m in model.modules())


def test_greedy_gives_layers_of_no_weights_the_target():
    # a layer of no outputs had weight 0: ZeroDivisionError landing the step on the target
    assert greedy([["a"]], {"a": 0}, 0.5, lambda levels: 0.0) == {"a": 0.5}
    levels = greedy([["a"], ["b"]], {"a": 0, "b": 4}, 0.5, lambda lv: lv["b"])
    assert levels["a"] == 0.5 and levels["b"] == pytest.approx(0.5)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 0))
    sparsity = calibrate(model, torch.randn(8, 4), allocation="greedy")
    assert sparsity.sparsities["1"] == 0.5
    assert sparsity.model_sparsity() == pytest.approx(0.5)


class Infinite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("inf")


class Overflow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), Infinite())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


def test_greedy_refuses_blocks_whose_outputs_are_not_finite():
    # every block error was NaN, and min() over NaN picked the levels blindly
    with pytest.raises(ValueError, match=r"outputs of blocks \['layers.0'\] hold NaN or "
                                         r"infinite values"):
        calibrate(Overflow(), torch.randn(8, 4), allocation="greedy")


def made(**overrides: object) -> ActivationSparsity:
    args: dict = {"method": "teal", "allocation": "uniform", "target": 0.5,
                  "sparsities": {"up": 0.5}, "thresholds": {"up": torch.zeros(8)},
                  "sizes": {"up": 128}}
    return ActivationSparsity(**(args | overrides))


@pytest.mark.parametrize(("overrides", "error", "match"), [
    ({"method": "topk"}, ValueError, r"method must be one of \['teal', 'wina', 'cats'\], "
                                     r"got 'topk'"),
    ({"method": 3}, TypeError, r"method must be one of .*got 3"),
    ({"allocation": None}, TypeError, r"allocation must be one of \['uniform', 'greedy'\], "
                                      r"got None"),
    ({"target": float("nan")}, ValueError, r"target must be in \[0, 1\), got nan"),
    ({"target": 1.5}, ValueError, r"target must be in \[0, 1\), got 1.5"),
    ({"target": "0.5"}, TypeError, r"target must be a float in \[0, 1\), got '0.5'"),
])
def test_activation_sparsity_checks_method_allocation_and_target(overrides, error, match):
    with pytest.raises(error, match=match):
        made(**overrides)


def test_apply_over_another_objects_thresholds_is_refused_and_changes_nothing():
    model = Stack().eval()
    x = data()
    first = calibrate(model, x, sparsity=0.3)
    second = calibrate(model, x, sparsity=0.7)
    first.apply(model)
    before = model(x)
    hooks = {n: len(m._forward_pre_hooks) for n, m in model.named_modules()}
    # the second set of hooks thresholded every input twice, and both counted it
    with pytest.raises(ValueError, match=r"already have activation thresholds applied by "
                                         r"another ActivationSparsity"):
        second.apply(model)
    assert {n: len(m._forward_pre_hooks) for n, m in model.named_modules()} == hooks
    assert torch.equal(model(x), before)
    first.remove()
    second.apply(model)  # once the first is removed, the second applies
    second.remove()


def test_profile_plot_into_a_directory_is_refused_before_running(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    ran = []
    model = Stack()
    model.register_forward_hook(lambda *a: ran.append(1))
    target = tmp_path / "plot.png"
    target.mkdir()
    # was an IsADirectoryError after the whole run
    with pytest.raises(ValueError, match=r"plot: '.*plot.png' is a directory"):
        profile(model, data(), plot=target)
    assert not ran


def test_profile_plot_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    path = tmp_path / "plot.png"
    path.write_bytes(b"old")

    def fail(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", fail)
    with pytest.raises(OSError, match="disk full"):
        profile(Stack(), data(), plot=path)
    assert path.read_bytes() == b"old"  # an interrupted save truncated the old plot
    assert os.listdir(tmp_path) == ["plot.png"]  # no temporary file left behind
    monkeypatch.undo()
    profile(Stack(), data(), plot=path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_profile_plot_keeps_savefig_naming_and_replaces_a_dangling_link(tmp_path):
    pytest.importorskip("matplotlib")
    profile(Stack(), data(), plot=tmp_path / "noext")
    assert (tmp_path / "noext.png").read_bytes()[:4] == b"\x89PNG"  # as savefig names it
    link = tmp_path / "link.png"
    link.symlink_to(tmp_path / "missing" / "x.png")  # was FileNotFoundError after the run
    profile(Stack(), data(), plot=link)
    assert link.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("name", "match"), [
    ("plot.xyz", r"plot: matplotlib cannot write format 'xyz' \(the suffix of '.*plot.xyz'\); "
                 r"accepted suffixes: \[.*'png'"),
    ("noext", r"plot: '.*noext.png' is a directory"),  # savefig writes noext.png
])
def test_profile_plot_format_and_file_are_checked_before_running(tmp_path, name, match):
    pytest.importorskip("matplotlib")
    (tmp_path / "noext.png").mkdir()
    ran = []
    model = Stack()
    model.register_forward_hook(lambda *a: ran.append(1))
    # both failed inside savefig, after the whole run
    with pytest.raises(ValueError, match=match):
        profile(model, data(), plot=tmp_path / name)
    assert not ran


def test_profile_plot_without_matplotlib_is_refused_before_running(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib" fails
    ran = []
    model = Stack()
    model.register_forward_hook(lambda *a: ran.append(1))
    with pytest.raises(ValueError, match=r"plot needs matplotlib, which is not installed"):
        profile(model, data(), plot=tmp_path / "plot.png")
    assert not ran


def test_resolve_pattern_by_the_name_mask_takes_the_mask_option():
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert resolve_pattern("mask", mask=mask).mask is mask
    with pytest.raises(TypeError, match=r"options \['threshold'\] are not options of pattern "
                                        r"'mask'; accepted: \['mask'\]"):
        resolve_pattern("mask", mask=mask, threshold=0.5)


def no_feature_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 4), nn.Linear(4, 4))


@pytest.mark.parametrize("allocation", ["uniform", "greedy"])
def test_calibrate_a_layer_of_no_input_features(allocation):
    # reshape(-1, 0) of its empty input was "cannot reshape tensor of 0 elements", blamed on
    # the calibration data; then the quantile of no scores an IndexError
    model = no_feature_model()
    x = torch.randn(8, 4)
    sparsity = calibrate(model, x, allocation=allocation)
    assert sparsity.thresholds["1"].shape == (0,)
    sparsity.apply(model)
    assert model(x).shape == (8, 4)
    sparsity.remove()


def test_profile_a_layer_of_no_input_features():
    result = profile(no_feature_model(), torch.randn(8, 4))
    assert result["1"].features == 0 and result["1"].dead == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_wina_refuses_non_finite_weights_before_running(bad):
    # a NaN column norm made a NaN threshold: "thresholds['0'] must hold thresholds ≥ 0"
    model = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight[:, 1] = bad
    ran = []
    model.register_forward_hook(lambda *a: ran.append(1))
    with pytest.raises(ValueError, match=r"model: the weights of layers \['0'\] hold NaN or "
                                         r"infinite values, and method='wina'"):
        calibrate(model, torch.randn(8, 4), method="wina")
    assert not ran
    assert calibrate(model, torch.randn(8, 4), method="teal").sparsities == {"0": 0.5}


def test_wina_scores_of_16_bit_inputs_do_not_overflow():
    from sparsekit.activation import score

    # the float16 column norm of 1e5-sized weights was inf, and every score of its column
    x = torch.tensor([[1.0, 0.5]], dtype=torch.float16)
    weight = torch.full((2, 2), 1e5)
    scores = score("wina", x, weight)
    assert scores.dtype == torch.float32 and bool(scores.isfinite().all())
    assert torch.allclose(scores, torch.tensor([[1.0, 0.5]]) * 1e5 * 2**0.5)
    assert score("teal", x.bfloat16(), weight).dtype == torch.float32
    assert score("teal", x.double(), weight).dtype == torch.float64


@pytest.mark.parametrize(("x_device", "w_device", "name"), [("cpu", "meta", "weight"),
                                                           ("meta", "cpu", "x")])
def test_wina_scores_name_a_meta_tensor(x_device, w_device, name):
    from sparsekit.activation import score

    # was "Tensor on device meta is not on the expected device cpu!"
    x = torch.ones(2, 4, device=x_device)
    with pytest.raises(ValueError, match=f"^{name} is on the meta device"):
        score("wina", x, torch.ones(3, 4, device=w_device))


@pytest.mark.parametrize("block_size", [2**62, 2**63 - 1])
def test_a_huge_block_size_is_one_tile_on_the_kernel_path_too(block_size):
    from sparsekit.attention import block_sparse_attention
    from sparsekit.attention.block_sparse import reference_attention

    # the kernel's ceil division of 2**63 - 1 overflowed: "block_mask must have shape
    # (1 or 1, 1 or 2, 0, 0)" for a mask of the one tile
    q, k = qk(16, 16)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    out = block_sparse_attention(q, k, k, mask, block_size=block_size)
    assert torch.allclose(out, reference_attention(q, k, k, mask, block_size=16), atol=1e-5)


@pytest.mark.parametrize("scale", [1e39, 1e300])
def test_a_scale_float32_cannot_hold_is_refused(scale):
    from sparsekit.attention import block_sparse_attention
    from sparsekit.attention.block_sparse import reference_attention

    q, k = qk(16, 16)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    # every output row was NaN from finite inputs, on the kernel as on the reference
    for fn in (block_sparse_attention, reference_attention):
        with pytest.raises(ValueError, match=r"scale must be at most 3.403e\+38 \(the largest "
                                             r"float32"):
            fn(q, k, k, mask, block_size=16, scale=scale)
    assert bool(block_sparse_attention(q, k, k, mask, block_size=16, scale=1e3).isfinite().all())


@pytest.mark.parametrize("plot", ["", "some/dir/"])
def test_profile_plot_must_name_a_file(plot, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some" / "dir").mkdir(parents=True)
    # a hidden ".png" was written into the folder named
    with pytest.raises(ValueError, match=f"plot must name a file, got {plot!r}"):
        profile(Stack(), data(), plot=plot)
    assert not (tmp_path / ".png").exists() and not (tmp_path / "some/dir/.png").exists()
