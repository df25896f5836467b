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
        capture_output=True, text=True, timeout=300,
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
