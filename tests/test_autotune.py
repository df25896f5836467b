"""compile()'s autotuning: row counts, the noise margin, forced formats, the decision cache.

No assertion here depends on the speed of this machine: the clock of
:mod:`sparsekit.engine.autotune` is replaced by scripted times.
"""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch
from _kernels import needs_kernels
from torch import nn

from sparsekit.engine import autotune, compile, decisions
from sparsekit.engine.compile import streams_weights

# Per-round noise, the same cycle for every format (median 1.0); the candidate's has one
# lucky block at 0.75, the kind of outlier that fooled a best-of-blocks timing.
DENSE_NOISE = (1.0, 1.06, 0.96, 1.03, 0.98)
SPARSE_NOISE = (0.99, 1.04, 0.75, 1.0, 1.02)


class ScriptedClock:
    """Stands in for ``autotune._time_block``: seconds per call from ``base[format]`` (a
    number, or a function of the row count) times the format's noise cycle."""

    def __init__(self, base: dict[str, object]) -> None:
        self.base = base
        self.calls = 0
        self.rows: set[int] = set()
        self.noise = {"dense": itertools.cycle(DENSE_NOISE)}

    def __call__(self, module: nn.Module, x: torch.Tensor, reps: int) -> float:
        self.calls += 1
        self.rows.add(x.shape[0])
        name = module.format.name
        base = self.base[name]
        ms = base(x.shape[0]) if callable(base) else base
        noise = self.noise.setdefault(name, itertools.cycle(SPARSE_NOISE))
        return ms * next(noise) * 1e-3


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch: pytest.MonkeyPatch):
    """A fresh decision cache for every test."""
    monkeypatch.setattr(decisions, "directory", lambda: tmp_path / "decisions")
    return tmp_path / "decisions"


def _clock(monkeypatch: pytest.MonkeyPatch, **base: object) -> ScriptedClock:
    clock = ScriptedClock(base)
    monkeypatch.setattr(autotune, "_time_block", clock)
    return clock


def _model(seed: int = 0, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(width, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand(layer.weight.shape) > 0.8)
    return model


REAL_DIRECTORY = decisions.directory  # taken at import, before any fixture replaces it
CANDIDATES = ["dense", "torch_csr"]  # held by any fp32 CPU weight, kernels or not


def test_a_noisy_three_percent_win_keeps_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch, dense=1.0, torch_csr=0.97)
    compiled = compile(_model(), torch.randn(4, 32), formats=CANDIDATES, cache=False)
    for choice in compiled.sparsekit_choices.values():
        assert choice["format"] == "dense"  # its one lucky block looked like a 25 % win
        times = choice["times_ms"]
        assert all(times["torch_csr"][r] / times["dense"][r] == pytest.approx(0.97, abs=0.01)
                   for r in choice["rows"])


def test_a_consistent_thirty_percent_win_replaces_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch, dense=1.0, torch_csr=0.7)
    compiled = compile(_model(), torch.randn(4, 32), formats=CANDIDATES, cache=False)
    for name, choice in compiled.sparsekit_choices.items():
        assert choice["format"] == "torch_csr" == compiled.get_submodule(name).format.name
        assert choice["speedup"] == pytest.approx(1 / 0.7)


def test_a_win_in_the_median_but_not_in_most_rounds_keeps_dense() -> None:
    # dense got two lucky rounds; the candidate's median is 10 % better, its rounds mostly not
    samples = {1: {"dense": [1.0, 1.0, 1.0, 0.5, 0.5], "torch_csr": [0.9, 0.9, 1.2, 0.6, 0.6]}}
    assert autotune.choose(samples, CANDIDATES)[0] == "dense"
    samples[1]["torch_csr"] = [0.9, 0.9, 0.9, 0.45, 0.6]  # three rounds of five: a majority
    assert autotune.choose(samples, CANDIDATES)[0] == "torch_csr"


def test_the_format_must_hold_at_every_row_count_it_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # twice as fast for decoding, 10 % slower for the prompt: sparse for 1 row, dense above
    _clock(monkeypatch, dense=1.0, torch_csr=lambda rows: 0.5 if rows == 1 else 1.1)
    model, x = _model(), torch.randn(2, 64, 32)
    # by default two formats may not hold more bytes than dense: torch CSR + dense do
    compiled = compile(model, x, formats=CANDIDATES, cache=False)
    assert {(c["format"], c["format_large"]) for c in compiled.sparsekit_choices.values()} == {
        ("dense", None)}
    compiled = compile(model, x, formats=CANDIDATES, cache=False, grow=True)
    for name, choice in compiled.sparsekit_choices.items():
        assert (choice["format"], choice["format_large"], choice["split"]) == (
            "torch_csr", "dense", 1)
        assert {r: e["format"] for r, e in choice["evidence"].items()} == {
            1: "torch_csr", 128: "dense"}
        assert choice["evidence"][128]["ratio"] == pytest.approx(1.0)
        assert choice["evidence"][1]["ratio"] == pytest.approx(0.5, abs=0.02)
        layer = compiled.get_submodule(name)
        assert (layer.format.name, layer.format_large.name, layer.split) == (
            "torch_csr", "dense", 1)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        torch.testing.assert_close(compiled(x[:1, :1]), model(x[:1, :1]))
    # served only at one row, it wins alone
    compiled = compile(_model(), torch.randn(2, 64, 32), formats=CANDIDATES, rows=1, cache=False)
    assert {c["format"] for c in compiled.sparsekit_choices.values()} == {"torch_csr"}
    assert {c["format_large"] for c in compiled.sparsekit_choices.values()} == {None}
    # 5 % faster for decoding is noise, 10 % slower for the prompt: dense everywhere
    _clock(monkeypatch, dense=1.0, torch_csr=lambda rows: 0.97 if rows == 1 else 1.1)
    compiled = compile(_model(), torch.randn(2, 64, 32), formats=CANDIDATES, cache=False,
                       grow=True)
    assert {(c["format"], c["format_large"]) for c in compiled.sparsekit_choices.values()} == {
        ("dense", None)}
    with pytest.raises(TypeError, match=r"grow must be a bool \(True or False\), got 1"):
        compile(_model(), grow=1)


def test_a_split_must_beat_every_single_format() -> None:
    # csr wins everywhere; bitmap is a little faster at 64 rows, but not by the margin
    samples = {
        1: {"dense": [1.0] * 5, "csr": [0.5] * 5, "bitmap": [0.9] * 5},
        64: {"dense": [1.0] * 5, "csr": [0.8] * 5, "bitmap": [0.78] * 5},
    }
    best, record = autotune.choose(samples, ["dense", "csr", "bitmap"], split=True)
    assert best == "csr" and record["format_large"] == "bitmap" and record["split"] == 1
    samples[64]["bitmap"] = [0.8] * 5  # equal: the single format is kept
    best, record = autotune.choose(samples, ["dense", "csr", "bitmap"], split=True)
    assert (best, record["format_large"], record["split"]) == ("csr", None, None)
    # without split, the one format that holds everywhere
    samples[1]["bitmap"], samples[64]["bitmap"] = [0.4] * 5, [1.2] * 5
    assert autotune.choose(samples, ["dense", "csr", "bitmap"])[0] == "csr"
    best, record = autotune.choose(samples, ["dense", "csr", "bitmap"], split=True)
    assert (best, record["format_large"]) == ("bitmap", "csr")


def test_the_reference_need_not_be_dense() -> None:
    samples = {1: {"separate": [1.0] * 5, "fused": [0.97] * 5}}
    assert autotune.choose(samples, ["separate", "fused"], reference="separate")[0] == "separate"
    samples[1]["fused"] = [0.7] * 5
    best, record = autotune.choose(samples, ["separate", "fused"], reference="separate")
    assert best == "fused" and record["reference"] == "separate"
    assert record["evidence"][1]["ms_dense"] == 1.0


def test_tolerant_only_a_reference_that_wins_by_the_margin_vetoes() -> None:
    # fused wins one row by 20 %; at 128 rows it is 2 % slower (noise between equal work)
    samples = {1: {"separate": [1.0] * 5, "fused": [0.8] * 5},
               128: {"separate": [10.0] * 5, "fused": [10.2] * 5}}
    assert autotune.choose(samples, ["separate", "fused"], reference="separate")[0] == "separate"
    assert autotune.choose(samples, ["separate", "fused"], reference="separate",
                           tolerant=True)[0] == "fused"
    samples[128]["fused"] = [11.0] * 5  # 10 % slower: the separate layers win there
    assert autotune.choose(samples, ["separate", "fused"], reference="separate",
                           tolerant=True)[0] == "separate"
    samples[128]["fused"] = [11.0, 11.0, 9.0, 9.0, 9.0]  # slower in the median, not in most rounds
    assert autotune.choose(samples, ["separate", "fused"], reference="separate",
                           tolerant=True)[0] == "fused"
    samples[1]["fused"], samples[128]["fused"] = [0.97] * 5, [10.2] * 5  # no win anywhere
    assert autotune.choose(samples, ["separate", "fused"], reference="separate",
                           tolerant=True)[0] == "separate"
    with pytest.raises(TypeError, match=r"tolerant must be a bool \(True or False\), got 1"):
        autotune.choose(samples, ["separate", "fused"], reference="separate", tolerant=1)


def test_rows_come_from_the_example_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _clock(monkeypatch, dense=1.0, torch_csr=1.0)
    compiled = compile(_model(), torch.randn(2, 64, 32), formats=CANDIDATES, cache=False)
    assert clock.rows == {1, 128}  # batch × sequence, and one row for decoding
    for choice in compiled.sparsekit_choices.values():
        assert choice["rows"] == [1, 128]
        assert set(choice["evidence"]) == {1, 128}
    clock.rows.clear()
    compile(_model(), torch.randn(2, 64, 32), formats=CANDIDATES, rows=(4, 16), cache=False)
    assert clock.rows == {4, 16}
    clock.rows.clear()
    compile(_model(), formats=CANDIDATES, cache=False)  # nothing observed: decoding
    assert clock.rows == {1}


def test_convolution_rows_are_images(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _clock(monkeypatch, dense=1.0, torch_csr=1.0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    compiled = compile(model, torch.randn(3, 2, 8, 8), formats=CANDIDATES, cache=False)
    assert compiled.sparsekit_choices["0"]["rows"] == [1, 3]
    assert clock.rows == {1, 3}


def test_evidence_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch, dense=1.0, torch_csr=0.7)
    compiled = compile(_model(), torch.randn(2, 8, 32), formats=CANDIDATES, cache=False)
    choice = compiled.sparsekit_choices["0"]
    assert choice["margin"] == autotune.MARGIN and not choice["forced"] and not choice["cached"]
    assert set(choice["times_ms"]) == set(CANDIDATES)
    for rows, e in choice["evidence"].items():
        assert e["ms_dense"] == pytest.approx(1.0) and e["ms_chosen"] == pytest.approx(0.7)
        assert e["rounds"] >= 5 and e["wins"] == e["rounds"]
        assert choice["times_ms"]["torch_csr"][rows] == e["ms_chosen"]
    assert choice["ms_dense"] == pytest.approx(2.0) and choice["ms_chosen"] == pytest.approx(1.4)


def test_a_forced_format_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    _clock(monkeypatch, dense=1.0, torch_csr=2.0)  # twice as slow: auto would keep dense
    compiled = compile(_model(), torch.randn(4, 32), formats="torch_csr", cache=False)
    for name, choice in compiled.sparsekit_choices.items():
        assert choice["format"] == "torch_csr" == compiled.get_submodule(name).format.name
        assert choice["forced"] and set(choice["times_ms"]) == set(CANDIDATES)
    auto = compile(_model(), torch.randn(4, 32), formats=CANDIDATES, cache=False)
    assert {c["format"] for c in auto.sparsekit_choices.values()} == {"dense"}


def test_a_forced_format_that_cannot_hold_a_weight_is_refused() -> None:
    model = _model().to(torch.bfloat16)  # torch_csr holds no bf16 CPU weight
    with pytest.raises(ValueError, match=r"formats=\['torch_csr'\] cannot hold the weight of "
                                         r"any layer .*\['0', '2'\]"):
        compile(model, formats="torch_csr")
    model[2].float()  # the layers it can hold take it, the others stay dense
    with pytest.warns(RuntimeWarning, match=r"cannot hold the weights of layers \['0'\]; they "
                                            "stay dense"):
        compiled = compile(model, formats="torch_csr")
    assert compiled.sparsekit_choices["0"]["format"] == "dense"
    assert compiled.sparsekit_choices["2"]["format"] == "torch_csr"


def test_the_second_compile_reads_the_cache(monkeypatch: pytest.MonkeyPatch, cache_dir) -> None:
    clock = _clock(monkeypatch, dense=1.0, torch_csr=0.7)
    first = compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    assert clock.calls > 0 and len(list(cache_dir.glob("*.json"))) == 2
    clock.calls = 0
    # another model with the same shapes and patterns: no timing at all
    second = compile(_model(seed=0), torch.randn(4, 32), formats=CANDIDATES)
    assert clock.calls == 0
    for name, choice in second.sparsekit_choices.items():
        assert choice["cached"]
        assert choice["format"] == first.sparsekit_choices[name]["format"] == "torch_csr"
        assert {k: v for k, v in choice.items() if k != "cached"} == {
            k: v for k, v in first.sparsekit_choices[name].items() if k != "cached"
        }
    compile(_model(), torch.randn(4, 32), formats=CANDIDATES, cache=False)
    assert clock.calls > 0
    clock.calls = 0
    compile(_model(), torch.randn(4, 32), formats=CANDIDATES, rows=(1, 2))  # other rows: a miss
    assert clock.calls > 0


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"key": 1}', b"null", b"\xff\xfe\x00garbage", b"\x80{}",
     b"[" * 100_000 + b"]" * 100_000],
    ids=["malformed", "list", "wrong-key", "null", "utf16-garbage", "not-utf8", "deep"],
)
def test_a_corrupt_cache_file_is_ignored(
    monkeypatch: pytest.MonkeyPatch, cache_dir, content: bytes
) -> None:
    clock = _clock(monkeypatch, dense=1.0, torch_csr=0.7)
    compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    files = sorted(cache_dir.glob("*.json"))
    for path in files:
        path.write_bytes(content)
    clock.calls = 0
    with pytest.warns(RuntimeWarning, match="ignoring corrupt decision cache file"):
        compiled = compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    assert clock.calls > 0
    assert {c["format"] for c in compiled.sparsekit_choices.values()} == {"torch_csr"}
    assert all("choice" in json.loads(p.read_text()) for p in files)  # rewritten


def test_a_cache_file_with_a_wrong_choice_is_ignored(
    monkeypatch: pytest.MonkeyPatch, cache_dir
) -> None:
    _clock(monkeypatch, dense=1.0, torch_csr=0.7)
    compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    for path in cache_dir.glob("*.json"):
        data = json.loads(path.read_text())
        data["choice"]["format"] = "csr32"
        path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="ignoring corrupt"):
        compiled = compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    assert {c["format"] for c in compiled.sparsekit_choices.values()} == {"torch_csr"}


@pytest.mark.parametrize("edit", [
    lambda c: c["times_ms"].update(csr32=c["times_ms"]["dense"]),  # a format never timed
    lambda c: c.update(reference="csr32"),
])
def test_a_cache_file_timing_formats_it_could_not_is_ignored(
    monkeypatch: pytest.MonkeyPatch, cache_dir, edit
) -> None:
    _clock(monkeypatch, dense=1.0, torch_csr=0.7)
    compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    for path in cache_dir.glob("*.json"):
        data = json.loads(path.read_text())
        edit(data["choice"])
        path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="ignoring corrupt.*no timing of"):
        compiled = compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    assert {c["format"] for c in compiled.sparsekit_choices.values()} == {"torch_csr"}
    assert all("csr32" not in p.read_text() for p in cache_dir.glob("*.json"))


@pytest.mark.parametrize("where", ["ms_dense", "times_ms"])
def test_a_cache_file_with_a_time_too_large_for_a_float_is_ignored(
    monkeypatch: pytest.MonkeyPatch, cache_dir, where: str
) -> None:
    clock = _clock(monkeypatch, dense=1.0, torch_csr=0.7)
    compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    for path in cache_dir.glob("*.json"):
        data = json.loads(path.read_text())
        if where == "times_ms":
            data["choice"]["times_ms"]["dense"]["1"] = 10**400
        else:
            data["choice"]["ms_dense"] = 10**400
        path.write_text(json.dumps(data))
    clock.calls = 0
    with pytest.warns(RuntimeWarning, match="ignoring corrupt.*OverflowError"):
        compiled = compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    assert clock.calls > 0
    assert {c["format"] for c in compiled.sparsekit_choices.values()} == {"torch_csr"}


def test_an_unwritable_cache_only_warns(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    _clock(monkeypatch, dense=1.0, torch_csr=0.7)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(decisions, "directory", lambda: blocker / "decisions")
    with pytest.warns(RuntimeWarning, match="cannot write to the decision cache"):
        compiled = compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    assert {c["format"] for c in compiled.sparsekit_choices.values()} == {"torch_csr"}


def test_the_cache_lives_with_the_kernels(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("SPARSEKIT_CACHE_DIR", str(tmp_path))
    assert REAL_DIRECTORY() == tmp_path / "decisions"


def test_batch_sizes_is_the_deprecated_spelling_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _clock(monkeypatch, dense=1.0, torch_csr=1.0)
    with pytest.warns(DeprecationWarning, match="batch_sizes= is deprecated, use rows="):
        compiled = compile(_model(), formats=CANDIDATES, batch_sizes=(1, 8), cache=False)
    assert clock.rows == {1, 8} and compiled.sparsekit_choices["0"]["rows"] == [1, 8]
    with pytest.raises(TypeError, match="both"):
        compile(_model(), rows=1, batch_sizes=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rows": 0}, ValueError, "rows must be an int ≥ 1, got 0"),
        ({"rows": ()}, ValueError, "rows must be an int ≥ 1 or a non-empty sequence"),
        ({"rows": 1.5}, TypeError, "rows must be an int ≥ 1, got 1.5"),
        ({"rows": (1, True)}, TypeError, "rows must be an int ≥ 1, got True"),
        ({"cache": "yes"}, TypeError, r"cache must be a bool \(True or False\), got 'yes'"),
    ],
)
def test_bad_rows_and_cache_are_refused(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        compile(nn.Linear(3, 3), **kwargs)


def test_demo_speed_is_a_median_of_repeats_with_the_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    from sparsekit.cli import demo

    monkeypatch.setattr(autotune, "_time_block", lambda m, x, reps: 1e-3 * m.scale)
    dense, fast = nn.Linear(4, 2), nn.Linear(4, 2)
    dense.scale, fast.scale = 1.0, 0.5
    assert demo._speedup(dense, fast, torch.randn(64, 4)) == (2.0, 2.0, 2.0)
    row = demo.Row("m", 0.5, 0.9, 0.9, 10, 0.5, 0.9, speedup=2.0, speedup_range=(1.9, 2.1))
    assert "up to 1.11×, a quiet machine" in demo._noise([row])
    assert "(1.90–2.10)" in demo._speed(row)
    row.speedup_range = (0.5, 3.0)
    assert "very noisy" in demo._noise([row])


@pytest.mark.parametrize("seed", range(40))
def test_formats_equal_within_noise_never_replace_dense(seed: int) -> None:
    """±3 % noise and up to three lucky rounds of seven (at 0.6×, anywhere) for any format,
    dense included, at any row count: no format is taken, for either row range."""
    import random

    rng = random.Random(seed)

    def rounds() -> list[float]:
        times = [rng.uniform(0.97, 1.03) for _ in range(7)]
        for i in rng.sample(range(7), rng.randint(0, 3)):
            times[i] *= 0.6
        return times

    samples = {r: {n: rounds() for n in ("dense", "csr16", "bitmap")} for r in (1, 16, 128)}
    best, record = autotune.choose(samples, ["dense", "csr16", "bitmap"], split=True)
    assert (best, record["format_large"], record["split"]) == ("dense", None, None)


def test_a_layer_like_one_timed_in_this_compile_reuses_its_decision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = _clock(monkeypatch, dense=1.0, torch_csr=0.7)
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(32, 32) for _ in range(3))).eval()
    masks = [torch.randperm(1024).reshape(32, 32) < kept for kept in (512, 512, 100)]
    with torch.no_grad():
        for layer, mask in zip(model, masks, strict=True):
            layer.weight.mul_(mask)
    compiled = compile(model, torch.randn(4, 32), formats=CANDIDATES)
    assert clock.rows == {1, 4}
    choices = compiled.sparsekit_choices
    assert "reused" not in choices["0"] and "reused" not in choices["2"]  # 2: other density
    assert choices["1"]["reused"] == "0" and choices["1"]["format"] == "torch_csr"
    keys = [decisions.key(layer, (32,), CANDIDATES, [1, 4], None) for layer in model]
    assert keys[0] != keys[1]  # other nonzeros: the exact keys differ,
    assert decisions.similar(keys[0]) == decisions.similar(keys[1])  # the coarse ones not
    assert decisions.similar(keys[0]) != decisions.similar(keys[2])
    assert decisions.lookup(keys[1]) is not None  # the reused decision is stored for it
    clock.calls = 0
    compile(model, torch.randn(4, 32), formats=CANDIDATES, cache=False)
    assert clock.calls > 0 and "reused" not in compile(
        model, torch.randn(4, 32), formats=CANDIDATES, cache=False).sparsekit_choices["1"]


def _recorded(cache_dir, field: str) -> list:
    return [json.loads(p.read_text())[field] for p in sorted(cache_dir.glob("*.json"))]


def _compile_again(clock: ScriptedClock) -> tuple[bool, set[bool]]:
    """Whether compiling the model again timed anything, and its choices' ``cached``."""
    clock.calls = 0
    choices = compile(_model(), torch.randn(4, 32), formats=CANDIDATES).sparsekit_choices
    return clock.calls > 0, {c["cached"] for c in choices.values()}


def test_a_close_call_is_timed_again_once_then_stands(
    monkeypatch: pytest.MonkeyPatch, cache_dir
) -> None:
    """dense 1.0 against 0.97 with ±5 % noise and a lucky block: dense is chosen, but the
    3 % between them lie within the noise of the rounds. Kept forever, that coin toss would
    decide every later compile; it is timed once more when next read, and the second
    timing stands."""
    clock = _clock(monkeypatch, dense=1.0, torch_csr=0.97)
    first = compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    assert {c["format"] for c in first.sparsekit_choices.values()} == {"dense"}
    assert _recorded(cache_dir, "close_call") == [True, True]
    assert _recorded(cache_dir, "timings") == [1, 1]
    assert _compile_again(clock) == (True, {False})
    assert _recorded(cache_dir, "timings") == [2, 2]
    assert _compile_again(clock) == (False, {True})


def test_a_clear_decision_is_read_without_timing(
    monkeypatch: pytest.MonkeyPatch, cache_dir
) -> None:
    clock = _clock(monkeypatch, dense=1.0, torch_csr=0.5)
    compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    assert _recorded(cache_dir, "close_call") == [False, False]
    assert _compile_again(clock) == (False, {True})


def test_a_close_call_stored_before_timings_were_counted_is_timed_again(
    monkeypatch: pytest.MonkeyPatch, cache_dir
) -> None:
    clock = _clock(monkeypatch, dense=1.0, torch_csr=0.97)
    compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    for path in cache_dir.glob("*.json"):  # the layout of the files written until now
        data = json.loads(path.read_text())
        path.write_text(json.dumps({"key": data["key"], "choice": data["choice"]}))
    assert _compile_again(clock)[0]


def test_close_call_compares_the_medians_with_the_noise_of_the_rounds() -> None:
    def choice(csr_ms: float, spread: float) -> dict:
        return {"times_ms": {"dense": {1: 1.0}, "torch_csr": {1: csr_ms}},
                "evidence": {1: {"format": "dense", "spread": spread}}}

    assert decisions.close_call(choice(0.97, spread=0.10), CANDIDATES)
    assert not decisions.close_call(choice(0.97, spread=0.01), CANDIDATES)
    assert not decisions.close_call(choice(0.5, spread=0.3), CANDIDATES)
    assert not decisions.close_call(choice(0.97, spread=0.10), ["dense"])  # not a candidate


@pytest.mark.parametrize("timings", [0, "2", 1.5])
def test_a_cache_file_with_a_bad_timing_count_is_ignored(
    monkeypatch: pytest.MonkeyPatch, cache_dir, timings: object
) -> None:
    _clock(monkeypatch, dense=1.0, torch_csr=0.7)
    compile(_model(), torch.randn(4, 32), formats=CANDIDATES)
    for path in cache_dir.glob("*.json"):
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "timings": timings}))
    with pytest.warns(RuntimeWarning, match="ignoring corrupt.*timings"):
        compile(_model(), torch.randn(4, 32), formats=CANDIDATES)


def test_cold_cache_flushes_before_every_timed_call_of_small_row_counts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside cold_cache, row counts up to COLD_ROWS are timed a few single calls at a time,
    each after a flush (as decode of a model larger than the cache reads its weights);
    larger row counts, and everything outside cold_cache, stay warm blocks."""
    events: list[str] = []
    monkeypatch.setattr(autotune, "_evict", lambda module: events.append("flush"))
    monkeypatch.setattr(autotune, "_time_block",
                        lambda m, x, reps: events.append(f"{x.shape[0]}x{reps}") or 1e-5)
    modules = {"dense": nn.Linear(4, 4), "other": nn.Linear(4, 4)}
    big = autotune.COLD_ROWS + 1
    autotune.measure(modules, (4,), [1, big], torch.float32, torch.device("cpu"))
    assert "flush" not in events
    events.clear()
    with autotune.cold_cache():
        assert autotune.cold()
        autotune.measure(modules, (4,), [1, big], torch.float32, torch.device("cpu"))
    assert not autotune.cold()
    one = events[: events.index(f"{big}x1")]  # the one-row part: calibration, then rounds
    rounds = one[2:]  # after each format's calibration call
    assert rounds and all(a == "flush" and b == "1x1" for a, b in zip(rounds[::2], rounds[1::2],
                                                                      strict=True))
    assert "flush" not in events[len(one):]


def test_a_cold_round_keeps_the_fastest_of_its_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stall (a descheduled thread on a busy machine) only adds time, and every cold call
    starts from the same flushed cache: each round keeps its fastest call, so one stalled
    call in a round does not make a fast format look slow."""
    monkeypatch.setattr(autotune, "_evict", lambda module: None)
    stalled = itertools.cycle([20e-3, 0.2e-3, 0.25e-3])  # one call in three stalls
    monkeypatch.setattr(autotune, "_time_block",
                        lambda m, x, reps: next(stalled) if m.tag == "sparse" else 1e-3)
    dense, sparse = nn.Linear(4, 4), nn.Linear(4, 4)
    dense.tag, sparse.tag = "dense", "sparse"
    with autotune.cold_cache():
        samples = autotune.measure({"dense": dense, "bitmap": sparse}, (4,), [1], torch.float32,
                                   torch.device("cpu"))
    assert max(samples[1]["bitmap"]) <= 0.25 and min(samples[1]["dense"]) == 1.0
    assert autotune.choose(samples, ["dense", "bitmap"])[0] == "bitmap"


def test_a_warm_block_keeps_its_fastest_part() -> None:
    """The real clock times a block of calls in three parts and keeps the fastest part's
    seconds per call: a part that a stall hit (here a 50 ms sleep in the first call) does
    not count, while a block of fewer calls than parts is timed call by call."""

    class Stalls(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 1:
                time.sleep(0.05)
            return x

    stalls = Stalls()
    assert autotune._time_block(stalls, torch.zeros(1), 9) < 0.01 and stalls.calls == 9
    assert autotune._time_block(Stalls(), torch.zeros(1), 1) >= 0.05


def test_compile_times_cold_only_models_larger_than_the_cache(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """compile enters cold_cache when the weights outgrow the last-level cache or its caller
    entered it, and the decision key then says so, so warm and cold decisions never mix."""
    seen: list[bool] = []
    real = autotune.measure

    def spy(*args, **kwargs):
        seen.append(autotune.cold())
        return real(*args, **kwargs)

    _clock(monkeypatch, dense=1.0, csr16=0.5, bitmap=0.6, torch_csr=2.0, nm=2.0, bsr=2.0,
           fanin=2.0, dense_lowp=2.0)
    monkeypatch.setattr(autotune, "measure", spy)
    monkeypatch.setattr(autotune, "_evict", lambda module: None)
    model = _model()
    assert not streams_weights(model)
    compile(model, torch.randn(1, 32))
    assert seen and not any(seen)
    # inside cold_cache (a model that fits alone but decodes beside others): cold whatever
    # its size, and the caller's setting holds after it
    seen.clear()
    with autotune.cold_cache():
        compile(model, torch.randn(1, 32), cache=False)
        assert autotune.cold()
    assert seen and all(seen) and not autotune.cold()
    # weights of 7680 bytes in float32, 1920 as int8 codes
    monkeypatch.setattr(autotune, "last_level_cache_bytes", lambda: 4096)
    assert streams_weights(model) and not streams_weights(model, torch.int8)
    monkeypatch.setattr(autotune, "last_level_cache_bytes", lambda: 1024)
    seen.clear()
    compile(model, torch.randn(1, 32))
    assert seen and all(seen)
    # a model within the reported cache but beyond what a working set keeps: cold too
    monkeypatch.setattr(autotune, "last_level_cache_bytes", lambda: 1 << 30)
    monkeypatch.setattr(autotune, "effective_cache_bytes", lambda: 1024)
    seen.clear()
    compile(_model(), torch.randn(1, 32), cache=False)  # not the decision just stored
    assert seen and all(seen)
    layer = model[0]
    warm = decisions.key(layer, (32,), ["dense"], [1], 1)
    with autotune.cold_cache():
        cold = decisions.key(layer, (32,), ["dense"], [1], 1)
    assert "cold_rows" not in warm and cold == warm | {"cold_rows": autotune.COLD_ROWS}


def test_a_decision_is_keyed_by_the_code_path_timed() -> None:
    """A choice timed on the AVX2 kernels (``kernels.use_isa``, as ``llm_decode.py --isa
    avx2`` runs) is no evidence for the AVX-512 ones of the same CPU, nor the reverse."""
    from sparsekit.engine import kernels

    paths = kernels.isas()
    if len(paths) < 2:
        pytest.skip("the kernels run one instruction set here")
    layer = _model()[0]
    keys = {}
    for isa in paths:
        with kernels.use_isa(isa):
            keys[isa] = decisions.key(layer, (32,), ["dense"], [1], 1)
    assert len({json.dumps(k, sort_keys=True) for k in keys.values()}) == len(paths)
    assert keys[paths[0]]["isa"][0] == paths[0]
    assert keys[paths[0]]["isa"][1] == torch.backends.cpu.get_cpu_capability()


def test_cold_cache_releases_its_flush_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffer a cold call reads first lives only while timing cold: TOUCH_BYTES where
    the timed layer can be flushed, FLUSH_FACTOR times the cache a working set keeps where
    it cannot."""
    monkeypatch.setattr(autotune, "effective_cache_bytes", lambda: 4096)
    for flushes, size in ((False, autotune.FLUSH_FACTOR * 4096), (True, autotune.TOUCH_BYTES)):
        monkeypatch.setattr(autotune.kernels, "flush_cache", lambda ts, f=flushes: f)
        with autotune.cold_cache():
            autotune._evict(nn.Linear(4, 4))
            assert autotune._flush is not None
            assert autotune._flush.numel() * 4 == size
            with autotune.cold_cache():
                autotune._evict(nn.Linear(4, 4))
            assert autotune._flush is not None  # an inner block leaves the outer one's buffer
        assert autotune._flush is None


def test_a_cold_call_flushes_the_timed_module_s_own_tensors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each eviction flushes the timed module's parameters and buffers (a large last-level
    cache kept them past the read of other data), and only its CPU tensors."""
    flushed: list[list[torch.Tensor]] = []
    monkeypatch.setattr(autotune.kernels, "flush_cache",
                        lambda ts: flushed.append(list(ts)) or True)
    monkeypatch.setattr(autotune, "effective_cache_bytes", lambda: 4096)
    layer = nn.BatchNorm1d(4)  # two parameters and three buffers
    with autotune.cold_cache():
        autotune._evict(layer)
    flushed = [ts for ts in flushed if ts]  # (the first call asks with no tensors)
    assert len(flushed) == 1
    assert {id(t) for t in flushed[0]} == {id(t) for t in (*layer.parameters(),
                                                           *layer.buffers())}


@needs_kernels
def test_flush_cache_keeps_values_and_refuses_what_it_cannot_flush() -> None:
    """kernels.flush_cache evicts tensors' memory and changes no value (views, empty and
    int8 tensors too); anything but strided CPU tensors is refused before any is flushed."""
    from sparsekit.engine import kernels

    tensors = [torch.randn(300, 7), torch.randint(-127, 128, (1000,), dtype=torch.int8),
               torch.empty(0), torch.randn(64, 64)[1::3, 5:]]
    before = [t.clone() for t in tensors]
    assert kernels.flush_cache(tensors) in (True, False)  # False: no such instruction here
    assert kernels.flush_cache(tensors[0]) in (True, False)  # one tensor
    assert kernels.flush_cache([]) == kernels.flush_cache(tensors)  # none: whether it can
    assert all(torch.equal(a, b) for a, b in zip(tensors, before, strict=True))
    with pytest.raises(TypeError, match="torch.Tensors, got list at position 1"):
        kernels.flush_cache([tensors[0], [1.0]])
    for bad in (3, "weights", None):
        with pytest.raises(TypeError, match="a torch.Tensor or an iterable of them, got"):
            kernels.flush_cache(bad)
    with pytest.raises(RuntimeError, match=r"strided CPU tensors, got tensors\[1\]"):
        kernels.flush_cache([tensors[0], torch.empty(3, device="meta")])
    with pytest.raises(RuntimeError, match=r"tensors\[0\]"):
        kernels.flush_cache([torch.eye(3).to_sparse()])


def test_effective_cache_is_where_reading_slows_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache a working set keeps: the largest size (doubling from the smallest) read at
    least 1 / CACHE_SPEEDUP as fast as the smallest; the reported size when reading never
    slows down, or when the smallest size already reaches it."""
    mib = 1 << 20

    def rates(knee: int):
        return lambda size: 30e9 if size <= knee else 8e9

    autotune._measured_cache.cache_clear()
    try:
        monkeypatch.setattr(autotune, "_read_rate", rates(32 * mib))
        assert autotune._measured_cache(480 * mib, 4 * mib) == 32 * mib
        monkeypatch.setattr(autotune, "_read_rate", rates(1 << 40))
        assert autotune._measured_cache(480 * mib, 2 * mib) == 480 * mib
        assert autotune._measured_cache(480 * mib, 480 * mib) == 480 * mib
        slowing = iter([30e9, 25e9, 19e9])  # 19 < 30 / 1.5: the third size is not cached
        monkeypatch.setattr(autotune, "_read_rate", lambda size: next(slowing))
        assert autotune._measured_cache(64 * mib, 1 * mib) == 2 * mib
    finally:
        autotune._measured_cache.cache_clear()


def test_effective_cache_measures_this_machine() -> None:
    """Measured for real: within [smallest size, reported size], one thread, and torch's
    thread count restored."""
    threads = torch.get_num_threads()
    size = autotune.effective_cache_bytes()
    assert min(1 << 20, autotune.last_level_cache_bytes()) <= size
    assert size <= autotune.last_level_cache_bytes()
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize(("sparse_ms", "rounds"), [
    ([0.5, 0.52, 0.49], 5),    # wins every round by far: settled after the fewest rounds
    ([0.99, 1.01, 0.98], 5),   # never 5 % faster (nor slower): settled as well
    ([0.5, 0.99, 0.98], 15),   # wins one round in three: every round is run
    ([1.5, 0.99, 1.0], 15),    # loses by the margin in one round in three: likewise
])
def test_measure_stops_once_every_round_agrees_against_the_reference(
    monkeypatch: pytest.MonkeyPatch, sparse_ms: list[float], rounds: int
) -> None:
    # a third format always at 0.5 splits its rounds against csr16's 0.5-0.52 but not against
    # the reference: only the pairs with the reference decide whether a format may replace it
    dense, sparse, other = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    cycles = {id(dense): itertools.cycle([1.0]), id(sparse): itertools.cycle(sparse_ms),
              id(other): itertools.cycle([0.5])}
    monkeypatch.setattr(autotune, "_time_block", lambda m, x, reps: next(cycles[id(m)]) * 1e-6)
    samples = autotune.measure({"dense": dense, "csr16": sparse, "bitmap": other}, (4,), [1, 3],
                               torch.float32, torch.device("cpu"))
    assert {r: {n: len(t) for n, t in s.items()} for r, s in samples.items()} == {
        r: dict.fromkeys(("dense", "csr16", "bitmap"), rounds) for r in (1, 3)}
    fused = autotune.measure({"separate": dense, "fused": other}, (4,), [1], torch.float32,
                             torch.device("cpu"), reference="separate")
    assert len(fused[1]["fused"]) == 5
    # every_round: a close comparison runs every round, settled or not, at every row count
    close = autotune.measure({"dense": dense, "csr16": sparse}, (4,), [1, 3], torch.float32,
                             torch.device("cpu"), every_round=True)
    assert {r: {n: len(t) for n, t in s.items()} for r, s in close.items()} == {
        r: dict.fromkeys(("dense", "csr16"), 15) for r in (1, 3)}


def test_measure_needs_its_reference_among_the_modules() -> None:
    with pytest.raises(ValueError, match="reference must be one of the modules.*'dense'"):
        autotune.measure({"separate": nn.Linear(4, 4)}, (4,), [1], torch.float32,
                         torch.device("cpu"))


def test_available_cpus_is_the_affinity_mask():
    import os
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert autotune.available_cpus() == expected >= 1


def test_compile_warns_when_its_threads_exceed_the_cpus(monkeypatch):
    # oversubscribed OpenMP kernels timed 10-40x slower, in erratic order: choices from noise
    monkeypatch.setattr(autotune, "available_cpus", lambda: 2)
    model = nn.Sequential(nn.Linear(64, 64))
    with pytest.warns(UserWarning, match=r"threads=3 exceed the 2 CPU\(s\).*pass threads=2") as w:
        compile(model, torch.randn(1, 64), threads=3, cache=False)
    assert w[0].filename == __file__  # attributed to the caller of compile
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile(model, torch.randn(1, 64), threads=2, cache=False)
        autotune.warn_oversubscribed(None) if torch.get_num_threads() <= 2 else None
