"""Smoke runs of the hidden-structure experiments in --quick mode (each < 60 s; 240 s cap)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, out: Path) -> dict:
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / script), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    stem = script.removesuffix(".py")
    assert (out / f"{stem}.png").stat().st_size > 0
    assert (out / f"{stem}.md").read_text().startswith("# ")
    return json.loads((out / f"{stem}.json").read_text())


def test_pruning_study_quick(tmp_path):
    data = run_quick("pruning_study.py", tmp_path)
    assert data["quick"] and [r["sparsity"] for r in data["rows"]] == [0.5, 0.9]
    for row in data["rows"]:
        for method in ("class-blinded", "class-uniform", "random"):
            assert 0.0 <= row[method]["mean"] <= 1.0


def test_structure_prediction_quick(tmp_path):
    data = run_quick("structure_prediction.py", tmp_path)
    assert len(data["runs"]) == 20
    assert {r["cell"] for r in data["runs"]} == {"rnn", "gru", "lstm"}
    assert "parameter count / linear" in data["scores"]
    assert all("r2_mean" in v for v in data["scores"].values())
