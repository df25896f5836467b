"""CLI smoke tests, run through a real subprocess like a user would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import sparsekit
from sparsekit.checkpoint import read
from sparsekit.models import lenet_300_100


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsekit.cli.main", *args],
        capture_output=True, text=True, cwd=cwd, timeout=900,
    )


@pytest.fixture
def dense_ckpt(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "dense.safetensors"
    sparsekit.save(lenet_300_100(), path)
    return path


@pytest.mark.parametrize("command", [[], ["prune"], ["report"], ["demo"]])
def test_help_everywhere(command):
    result = cli(*command, "--help")
    assert result.returncode == 0
    assert "usage: sparsekit" in result.stdout


def test_prune_then_report(dense_ckpt, tmp_path):
    out = tmp_path / "pruned.safetensors"
    result = cli("prune", str(dense_ckpt), "--out", str(out), "--sparsity", "0.9",
                 "--criterion", "magnitude", "--allocation", "global", "--markdown")
    assert result.returncode == 0, result.stderr
    assert "| **total** |" in result.stdout and "90.0%" in result.stdout
    ckpt = read(out)
    assert json.loads(ckpt.meta["model"])["name"] == "lenet_300_100"
    kept = sum(int(m.sum()) for m in ckpt.kept.values())
    assert kept == round(0.1 * (784 * 300 + 300 * 100 + 100 * 10))

    result = cli("report", str(out), "--markdown")
    assert result.returncode == 0, result.stderr
    assert "fc1" in result.stdout and "90.0%" in result.stdout


def test_prune_with_pattern_and_data_driven_criterion(dense_ckpt, tmp_path):
    out = tmp_path / "nm.safetensors"
    result = cli("prune", str(dense_ckpt), "--out", str(out), "--sparsity", "0.5",
                 "--pattern", "2:4", "--criterion", "wanda", "--calib-batches", "1",
                 "--exclude", "fc3")
    assert result.returncode == 0, result.stderr
    model = lenet_300_100()
    masks = sparsekit.load(model, out)
    assert masks.pattern == "2:4"
    assert set(masks.masks) == {"fc1.weight", "fc2.weight"}
    assert (masks.masks["fc1.weight"].reshape(-1, 4).sum(1) <= 2).all()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--sparsity", "1.5"], "sparsity must be in [0, 1)"),
        (["--criterion", "nope"], "graph:watts_strogatz, grasp, magnitude"),
        (["--allocation", "nope"], "accepted: er, erk, global, lamp, owl, uniform"),
        (["--pattern", "5:4"], "0 < N < M"),
        (["--exclude", "nothing*"], "exclude entry 'nothing*'"),
    ],
)
def test_user_errors_are_one_line_exit_2(dense_ckpt, tmp_path, args, needle):
    result = cli("prune", str(dense_ckpt), "--out", str(tmp_path / "x.safetensors"),
                 *(["--sparsity", "0.5"] if "--sparsity" not in args else []), *args)
    assert result.returncode == 2
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_and_corrupt_checkpoints(tmp_path):
    result = cli("report", str(tmp_path / "missing.safetensors"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    result = cli("report", str(bad), "--model", "lenet_300_100")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_demo_quick_run(tmp_path):
    result = cli("demo", "--out", str(tmp_path / "out"), "--epochs", "1",
                 "--finetune-epochs", "1", "--sparsities", "0.5,0.9", "--train-limit", "2000")
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(data["runs"]) == 6
    assert (tmp_path / "out" / "accuracy_vs_sparsity.png").stat().st_size > 1000
    for run in data["runs"]:
        expected = 1 - run["sparsity"]
        assert run["nonzeros"] == pytest.approx(expected * 266_200, abs=3)
        assert run["size_ratio"] < expected + 0.05
        assert abs(run["acc_compiled"] - run["acc_after"]) <= 0.001 and run["speedup"] > 0
