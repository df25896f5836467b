"""Smoke runs of the benchmark scripts in their --quick mode (they must run, and write)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_sparse_training_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sparse_training.py"), "--quick",
         "--no-check", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "sparse_training.json").read_text())
    methods = {r["method"] for r in data["rows"]}
    assert methods == {"dense", "static", "one-shot", "gradual", "set", "rigl", "snfs",
                       "granet", "srigl"}
    assert all(0.0 <= r["acc_mean"] <= 1.0 for r in data["rows"])
    assert {c["claim"].split(": ")[1] for c in data["checks"]} == {
        "RigL ≥ SET ≥ static", "gradual ≥ one-shot"}
    assert (tmp_path / "sparse_training.md").read_text().count("\n| ") > 9
    assert (tmp_path / "sparse_training.png").exists()


def test_every_benchmark_prints_its_help():
    """``--help`` of every benchmark script exits 0 (argparse formats help strings with %,
    so a literal "50% bf16" in one broke it), all scripts in one interpreter."""
    code = """
import runpy, sys
from pathlib import Path
failed = []
for script in sorted(Path(".").glob("[!_]*.py")):
    sys.argv = [str(script), "--help"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:
        if stop.code not in (0, None):
            failed.append(f"{script}: exit {stop.code}")
    except Exception as error:
        failed.append(f"{script}: {error!r}")
    else:
        failed.append(f"{script}: --help did not exit")
print(failed or "OK")
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.splitlines()[-1:] == ["OK"], (
        result.stdout[-2000:] + result.stderr[-2000:])


def _run(script: str, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--no-check"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_kernels_small_shape(tmp_path):
    _run("sparse_kernels.py", "--quick", "--shapes", "128x256", "--budget", "0.02", "--wait", "0",
         "--out", str(tmp_path))
    data = json.loads((tmp_path / "kernels_quick.json").read_text())
    patterns = {(r["pattern"], r["sparsity"]) for r in data["rows"]}
    assert {("unstructured", 0.9), ("2:4", 0.5), ("block16", 0.9), ("fanin", 0.9)} <= patterns
    for r in data["rows"]:
        assert r["chosen_format"] in r["autotune_ms"] and r["ms"]["chosen"] > 0


def test_end_to_end_quick(tmp_path):
    _run("end_to_end.py", "--quick", "--budget", "0.05", "--out", str(tmp_path))
    data = json.loads((tmp_path / "end_to_end_quick.json").read_text())
    assert {r["model"] for r in data["rows"]} == {"lenet_300_100", "lenet5", "transformer_2x512"}
    assert all(r["speedup"] > 0 and 0 < r["memory_ratio"] <= 1.0 for r in data["rows"])


def test_llm_decode_small_shape(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "llm_decode.py"), "--quick", "--shape",
         "128x256x1", "--only", "decode", "--no-check", "--profile", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (model,) = json.loads((tmp_path / "llm_decode_quick.json").read_text())["models"]
    configs = set(model["rows"]) | set(model["skipped"])
    assert {"dense fp32", "dense bf16", "torch int8 dynamic", "int8pack"} <= set(model["rows"])
    sparse = {c for c in configs if c.startswith("sparsekit")}
    assert len(sparse) == 18 + 6  # {50 %, 2:4, 70 %} x {fp32, bf16, int8, int8 W8A8}
    #                                                  x {-, TEAL 50 %}
    assert {c for c in sparse if "W8A8" in c} == {
        f"sparsekit {s} int8 W8A8{teal}" for s in ("50%", "2:4", "70%")
        for teal in ("", " + TEAL 50%")}
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in model["rows"].values())
    claims = [c["claim"] for c in model["checks"]]
    assert any("70% int8 vs dense fp32" in c for c in claims)
    assert any("70% W8A8 vs dense fp32" in c for c in claims)
    assert any("TEAL 50% on top of 70% int8 W8A8" in c for c in claims)
    assert sum(not c["met"] for c in model["checks"]) >= len(model["skipped"])
    # --profile splits the int8 rows and their peer too, beside the floor without linears
    profile = model["profile"]
    assert {"torch int8 dynamic", "sparsekit 50% int8 W8A8", "no linear layers (floor)"} <= set(
        profile)
    assert profile["no linear layers (floor)"]["matmul"] == 0
    assert all(p["step_ms"] > 0 and p["warm_step_ms"] > 0 for p in profile.values())
    for p in profile.values():  # the split is of the step run back to back, as profiled
        parts = p["matmul"] + p["attention"] + p["other ops"] + p["python"]
        assert parts == pytest.approx(p["warm_step_ms"]) or p["python"] == 0
    assert "ISA" in (tmp_path / "llm_decode_quick.md").read_text()
    assert "| step in turns | step alone |" in (tmp_path / "llm_decode_quick.md").read_text()


def test_llm_decode_runs_as_on_an_avx2_only_cpu(tmp_path):
    """``--isa avx2`` holds sparsekit's kernels and the peers' libraries (ATen, oneDNN, MKL,
    FBGEMM) to AVX2, names that in its results and writes them with an ``_avx2`` suffix."""
    from sparsekit.engine import kernels

    if "avx2" not in kernels.isas():
        pytest.skip("the kernels do not run AVX2 here")
    _run("llm_decode.py", "--quick", "--shape", "128x256x1", "--only", "decode", "--isa",
         "avx2", "--configs", "50% int8 W8A8", "--out", str(tmp_path))
    data = json.loads((tmp_path / "llm_decode_quick_avx2.json").read_text())
    assert data["cpu"]["isa"] == "avx2" and "ATen AVX2" in data["cpu"]["limited to"]
    (model,) = data["models"]
    assert "sparsekit 50% int8 W8A8" in model["rows"] and "int8pack" in model["rows"]
    assert "limited to avx2" in (tmp_path / "llm_decode_quick_avx2.md").read_text()


def test_kernels_value_rows_on_a_chosen_isa(tmp_path):
    out = tmp_path / "kernels_values_scalar"
    _run("sparse_kernels.py", "--tables", "values", "--shapes", "64x128", "--dtypes", "int8",
         "--isa", "scalar", "--budget", "0.01", "--wait", "0", "--out", str(tmp_path))
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["env"]["asserted_isas"] == ["scalar"]
    cells = [k for r in data["value_rows"] for k in r["pct_of_floor"]]
    assert cells and all(k.endswith("@scalar") for k in cells)
    # every cell below the floor target is a miss, none is only reported
    below = sum(pct < 75 for r in data["value_rows"] for pct in r["pct_of_floor"].values())
    assert len(data["misses"]) == below
    assert "scalar (asserted)" in out.with_suffix(".md").read_text()


def test_benchmarks_reject_an_isa_this_cpu_cannot_run():
    for script in ("sparse_kernels.py", "sparse_linear_training.py", "llm_decode.py"):
        result = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script), "--isa", "neon"],
            capture_output=True, text=True, timeout=900,
        )
        assert result.returncode == 2 and "--isa must" in result.stderr, result.stderr[-2000:]


def test_llm_decode_int8pack_peer_takes_misaligned_bf16_inputs():
    """``_weight_int8pack_mm`` reads activations with 32-byte aligned loads and crashed the
    process on a view at an odd offset; the peer copies such inputs and runs in bfloat16, its
    vectorised path, matching the float32 product to int8 rounding."""
    code = """if True:
        import torch, llm_decode
        lin = torch.nn.Linear(128, 64)
        contiguous = torch.randn(3 * 128 + 8, dtype=torch.bfloat16)[8:].view(1, 3, 128)
        strided = torch.randn(1, 3, 136, dtype=torch.bfloat16)[..., 8:]
        for x in (contiguous, strided):
            assert x.data_ptr() % 32
            y = llm_decode.Int8PackLinear(lin)(x)
            ref = lin(x.float())
            assert y.dtype == torch.bfloat16 and y.shape == (1, 3, 64)
            assert float((y.float() - ref).norm() / ref.norm()) < 0.02
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def llm_decode() -> Iterator[ModuleType]:
    """``benchmarks/llm_decode.py`` imported in this process for its helpers (a subprocess
    per test spent ~5 s importing it); the benchmark modules leave ``sys.modules`` after."""
    path = str(ROOT / "benchmarks")
    before = set(sys.modules)
    sys.path.insert(0, path)
    try:
        yield importlib.import_module("llm_decode")
    finally:
        sys.path.remove(path)
        for name in set(sys.modules) - before:
            if (getattr(sys.modules[name], "__file__", None) or "").startswith(path):
                del sys.modules[name]


def test_llm_decode_torch_compile_rows_are_held_to_the_int8_target(llm_decode):
    """With --torch-compile the compiled 50 % int8 rows face the best torch int8 peer, eager or
    compiled (quantize_dynamic graph-breaks at every linear layer, so its eager row may win)."""
    tc = llm_decode.TORCH_COMPILED
    speeds = {"dense fp32": 10.0, "torch int8 dynamic": 40.0, "int8pack": 30.0,
              "torch int8 dynamic" + tc: 35.0, "sparsekit 50% int8" + tc: 50.0,
              "sparsekit 50% int8 W8A8" + tc: 61.0}
    rows = {n: {"decode_tok_s": v, "prefill_tok_s": 1.0, "prefill_vs_dense": 1.0}
            for n, v in speeds.items()}
    verdicts = {c.split(":")[0]: ok for c, ok in llm_decode.checks(rows, {})}
    assert verdicts["50% int8 + torch.compile vs best torch int8 peer (eager or compiled)"] \
        is False  # 50 / 40 = 1.25x
    assert verdicts["50% W8A8 + torch.compile vs best torch int8 peer (eager or compiled)"]
    assert "70% W8A8 + torch.compile vs dense fp32 (eager or compiled)" not in verdicts
    rows["sparsekit 70% int8 W8A8" + tc] = {"decode_tok_s": 49.0, "prefill_tok_s": 1.0,
                                             "prefill_vs_dense": 1.0}
    rows["dense fp32" + tc] = {"decode_tok_s": 9.0, "prefill_tok_s": 1.0}
    verdicts = {c.split(":")[0]: ok for c, ok in llm_decode.checks(rows, {})}
    assert verdicts["70% W8A8 + torch.compile vs dense fp32 (eager or compiled)"] is False  # 4.9x
    eager = {n: r for n, r in rows.items() if not n.endswith(tc)}
    assert not any("torch.compile" in c for c, _ in llm_decode.checks(eager, {}))


def test_llm_decode_ratios_never_round_across_their_target(llm_decode):
    """A ratio that two decimals would round onto the other side of its target is printed
    with more (134.80 / 89.87 tok/s = 1.49994x, a miss, once read "1.50x (target 1.5x)")."""
    assert llm_decode.times(134.80 / 89.87, 1.5) == "1.4999x"
    assert llm_decode.times(0.9496, 0.95) == "0.9496x"
    assert llm_decode.times(1.504, 1.5) == "1.50x" and llm_decode.times(1.2, 1.3) == "1.20x"
    rows = {"dense fp32": {"decode_tok_s": 10.0, "prefill_tok_s": 100.0},
            "sparsekit 50% int8": {"decode_tok_s": 29.9996, "prefill_tok_s": 94.96,
                                   "prefill_vs_dense": 0.9496}}
    verdicts = dict(llm_decode.checks(rows, {}))
    assert verdicts["50% int8 vs dense fp32: 2.99996x (target 3.0x)"] is False
    assert verdicts["prefill 50% int8 vs dense fp32: 0.9496x (target >= 0.95x)"] is False


def test_llm_decode_prefill_is_held_to_its_dense_model_by_paired_rounds(llm_decode):
    """The prefill check reads the median over rounds of the dense model's time over the
    configuration's in the same round (``median_ratios``), not the ratio of two bests: in
    these rounds the best times say 0.90x, yet the configuration ran as fast as its dense
    model in four of five rounds; bf16 rows face dense bf16, compiled rows compiled dense
    where it ran (else eager dense)."""
    tc = llm_decode.TORCH_COMPILED
    names = ["dense fp32", "dense bf16", "dense fp32" + tc, "torch int8 dynamic",
             "sparsekit 2:4 bf16", "sparsekit 50% int8", "sparsekit 50% int8" + tc]
    assert [llm_decode.prefill_dense(n, names) for n in names] == [
        None, None, None, None, "dense bf16", "dense fp32", "dense fp32" + tc]
    assert llm_decode.prefill_dense("sparsekit 50% int8" + tc, names[:2]) == "dense fp32"
    assert llm_decode.prefill_dense("sparsekit 2:4 bf16", names[:1]) is None
    rounds = {"dense bf16": [90.0, 100.0, 100.0, 100.0, 100.0],
              "sparsekit 2:4 bf16": [100.0, 100.0, 100.0, 100.0, 150.0]}
    ratio = llm_decode.median_ratios(rounds, "dense bf16")["sparsekit 2:4 bf16"]
    assert ratio == 1.0 and min(rounds["dense bf16"]) / min(rounds["sparsekit 2:4 bf16"]) == 0.9
    rows = {"dense bf16": {"decode_tok_s": 10.0, "prefill_tok_s": 1 / 90},
            "sparsekit 2:4 bf16": {"decode_tok_s": 20.0, "prefill_tok_s": 1 / 100,
                                   "prefill_vs_dense": ratio}}
    verdicts = dict(llm_decode.checks(rows, {}))
    assert verdicts["prefill 2:4 bf16 vs dense bf16: 1.00x (target >= 0.95x)"] is True
    rows["sparsekit 2:4 bf16"]["prefill_vs_dense"] = 0.94
    assert dict(llm_decode.checks(rows, {}))[
        "prefill 2:4 bf16 vs dense bf16: 0.94x (target >= 0.95x)"] is False


def test_llm_decode_configs_filter_builds_and_checks_only_the_selected(llm_decode, monkeypatch):
    """``--configs``: only the sparsekit configurations containing one of the texts are
    built (the dense ones and the peers always are) and only their targets are checked; a
    selected configuration that was skipped still counts as a miss."""
    def keep(name):
        return llm_decode.selected(("50% int8",), name)

    assert keep("sparsekit 50% int8 + TEAL 50%") and keep("sparsekit 50% int8 W8A8")
    assert not keep("sparsekit 50% bf16") and llm_decode.selected((), "sparsekit 70% fp32")
    built, pruned = [], []

    def compile_(source, prompt, **kw):
        built.append(kw)
        return source

    monkeypatch.setattr(llm_decode.sparsekit, "compile", compile_)
    monkeypatch.setattr(llm_decode, "pruned_sources", lambda m, c, pattern, s: (
        pruned.append(pattern) or ({d: m for d in llm_decode.DTYPES}, object())))
    model = llm_decode.build(128, 256, 1, 1)
    models, _ = llm_decode.configurations(model, torch.zeros(1, 4, dtype=torch.long), None,
                                          {}, keep)
    assert {n for n in models if n.startswith("sparsekit")} == {
        "sparsekit 50% int8", "sparsekit 50% int8 + TEAL 50%", "sparsekit 50% int8 W8A8",
        "sparsekit 50% int8 W8A8 + TEAL 50%"}
    assert {"dense fp32", "dense bf16", *llm_decode.PEERS} <= set(models)
    assert pruned == ["unstructured"] and len(built) == 4
    assert [kw.get("activation_dtype") for kw in built[2:]] == ["int8", "int8"]
    assert built[3]["activation_sparsity"] is not None
    rows = {n: {"decode_tok_s": 10.0, "prefill_tok_s": 1.0, "prefill_vs_dense": 1.0}
            for n in models}
    claims = [c for c, _ in llm_decode.checks(rows, {})]
    assert any(c.startswith("50% int8 vs dense fp32") for c in claims)
    assert any(c.startswith("TEAL 50% on top of 50% int8 W8A8") for c in claims)
    assert not any("bf16 vs" in c or "70%" in c or "2:4" in c for c in claims), claims
    del rows["sparsekit 50% int8 W8A8"]
    verdicts = dict(llm_decode.checks(rows, {"sparsekit 50% int8 W8A8": "refused"}))
    assert not verdicts["50% W8A8 vs dense fp32: sparsekit 50% int8 W8A8 was skipped"]


def test_kernels_w8a8_rows_fail_where_a_sparse_format_does_not_beat_torch_int8():
    """``--tables q`` can fail: a sparse W8A8 format at or below torch's dynamic int8 is a
    miss; dense W8A8 and the float-input modes are reported only."""
    code = """if True:
        import sparse_kernels
        row = {"shape": "8x8", "batch": 1, "quiet": True, "vs_torch_dynamic_int8": {
            "torch_dynamic_int8": 1.0, "dense int8 q": 0.9, "bitmap 50% int8 q": 1.0,
            "bitmap 50% int8 f32 FMA": 0.5, "2:4 nm int8 q": 1.2}}
        misses = sparse_kernels.w8a8_misses([row])
        assert len(misses) == 1 and "bitmap 50% int8 q 1.00x" in misses[0], misses
    """
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "benchmarks",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]


def _helper(name: str):
    """A benchmark helper module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_concludes_every_benchmark_alike(tmp_path, capsys):
    """``_report.conclude``: a PASS/MISS line per check, the files written (text as is,
    anything else as JSON), exit 1 on a miss unless ``no_check``."""
    report = _helper("_report")
    checks = [("fast enough", True), ("small enough", False)]
    assert report.checklist(checks) == ["- PASS: fast enough", "- MISS: small enough"]
    files = {tmp_path / "new" / "r.md": "# r\n", tmp_path / "r.json": {"rows": [1]}}
    assert report.conclude(checks, files, no_check=False) == 1
    assert capsys.readouterr().out.splitlines()[:2] == ["PASS: fast enough",
                                                       "MISS: small enough"]
    assert (tmp_path / "new" / "r.md").read_text() == "# r\n"
    assert json.loads((tmp_path / "r.json").read_text()) == {"rows": [1]}
    assert report.conclude(checks, {}, no_check=True) == 0
    assert report.conclude(checks[:1], {}, no_check=False) == 0


CPUINFO = {
    "amd": "vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
           "model name\t: AMD EPYC\nflags\t\t: fpu avx2 fma avx512f avx512_vnni\n",
    "intel": "vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 167\n"
             "model name\t: Intel(R) Xeon(R) Processor\nflags\t\t: avx2 fma avx512f amx_int8\n",
}


def test_machine_names_the_cpu_generation(tmp_path, monkeypatch):
    """``_machine.cpu_info``: a virtual machine's generic name gains its family and model
    (and an AMD one its Zen generation), and the ISA flags are listed in a fixed order."""
    machine = _helper("_machine")
    real_open = open
    for vendor, text in CPUINFO.items():
        (tmp_path / vendor).write_text(text)
        monkeypatch.setattr(machine, "open", lambda path, *a, v=vendor: real_open(tmp_path / v),
                            raising=False)
        name, flags = machine.cpu_info()
        if vendor == "amd":
            assert name == "AMD EPYC (family 25, model 17, Zen 4)"
            assert flags == ["avx512f", "avx512_vnni", "avx2", "fma"]
        else:
            assert name == "Intel(R) Xeon(R) Processor (family 6, model 167)"
            assert flags == ["avx512f", "amx_int8", "avx2", "fma"]


def test_distributed_prune_retries_a_failed_launch_and_reports_the_workers_output(
        tmp_path, monkeypatch, capsys):
    """A torchrun launch that fails (a gloo rendezvous race on a busy machine failed one CI
    run, its output discarded) is retried; after the last attempt the error carries what
    the workers wrote."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    module = _helper("distributed_prune")
    out = tmp_path / "out.pt"
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if len(calls) < module.ATTEMPTS:
            return subprocess.CompletedProcess(command, 1, "", "trace\nConnection reset by peer")
        torch.save({"seconds": 1.5, "masks": {}}, out)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(module.subprocess, "run", run)
    assert module.launch("quick", "wanda", 2, 1, out)["seconds"] == 1.5
    assert len(calls) == module.ATTEMPTS
    assert capsys.readouterr().err.count("failed (exit 1): Connection reset by peer") == 2

    calls.clear()
    monkeypatch.setattr(module.subprocess, "run", lambda command, **kwargs: (
        calls.append(command), subprocess.CompletedProcess(command, 1, "", "rank 1: boom"))[1])
    with pytest.raises(RuntimeError, match="(?s)failed 3 times.*rank 1: boom"):
        module.launch("quick", "wanda", 2, 1, out)
    assert len(calls) == module.ATTEMPTS


def test_llm_decode_static_decode_matches_the_eager_model(llm_decode):
    """StaticDecode (torch.compile over a static KV cache) decodes the tokens the eager
    model with its growing cache does, round after round on one cache."""
    model = llm_decode.build(32, 64, 1, 2)
    static = llm_decode.StaticDecode(model)
    prompt = torch.randint(0, llm_decode.VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(2):  # the second round resets the cache
            eager, fast = model(prompt, use_cache=True), static(prompt, use_cache=True)
            for _ in range(6):
                token = eager.logits[:, -1:].argmax(-1)
                assert torch.equal(fast.logits[:, -1:].argmax(-1), token)
                torch.testing.assert_close(fast.logits[:, -1], eager.logits[:, -1], rtol=1e-4,
                                           atol=1e-4)
                eager = model(token, cache=eager.cache, use_cache=True)
                fast = static(token, cache=fast.cache, use_cache=True)
        assert torch.equal(static(prompt).logits, model(prompt).logits)  # prefill: eager
