"""Smoke runs of the benchmark scripts in their --quick mode (they must run, and write)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


def _run(script: str, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args, "--no-check"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_kernels_small_shape():
    _run("kernels.py", "--quick", "--shapes", "128x256", "--budget", "0.02", "--wait", "0")
    data = json.loads((ROOT / "benchmarks" / "results" / "kernels_quick.json").read_text())
    patterns = {(r["pattern"], r["sparsity"]) for r in data["rows"]}
    assert {("unstructured", 0.9), ("2:4", 0.5), ("block16", 0.9), ("fanin", 0.9)} <= patterns
    for r in data["rows"]:
        assert r["chosen_format"] in r["autotune_ms"] and r["ms"]["chosen"] > 0


def test_end_to_end_quick():
    _run("end_to_end.py", "--quick", "--budget", "0.05")
    data = json.loads((ROOT / "benchmarks" / "results" / "end_to_end_quick.json").read_text())
    assert {r["model"] for r in data["rows"]} == {"lenet_300_100", "lenet5", "transformer_2x512"}
    assert all(r["speedup"] > 0 and 0 < r["memory_ratio"] <= 1.0 for r in data["rows"])


def test_llm_decode_small_shape(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "llm_decode.py"), "--quick", "--shape",
         "128x256x1", "--only", "decode", "--no-check", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (model,) = json.loads((tmp_path / "llm_decode_quick.json").read_text())["models"]
    configs = set(model["rows"]) | set(model["skipped"])
    assert {"dense fp32", "dense bf16", "torch int8 dynamic", "int8pack"} <= set(model["rows"])
    sparse = {c for c in configs if c.startswith("sparsekit")}
    assert len(sparse) == 18 + 3  # {50 %, 2:4, 70 %} x ({fp32, bf16, int8} x {-, TEAL 50 %}
    #                                                  + int8 W8A8)
    assert {c for c in sparse if c.endswith("W8A8")} == {
        f"sparsekit {s} int8 W8A8" for s in ("50%", "2:4", "70%")}
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in model["rows"].values())
    claims = [c["claim"] for c in model["checks"]]
    assert any("70% int8 vs dense fp32" in c for c in claims)
    assert any("70% W8A8 vs dense fp32" in c for c in claims)
    assert sum(not c["met"] for c in model["checks"]) >= len(model["skipped"])
    assert "ISA" in (tmp_path / "llm_decode_quick.md").read_text()
