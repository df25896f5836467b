"""Distributed training with masks: FSDP2, DDP on SparseLinear, ranks that disagree.

Multi-process cases run a worker from ``tests/ddp`` under ``torchrun`` with 2 gloo CPU
processes (a few seconds each, most of it start-up); the helpers of
:mod:`sparsekit.distributed` are also tested in one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _torchrun
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

import sparsekit
from sparsekit import MaskSet, distributed
from sparsekit.prune import compute_masks
from sparsekit.schedules import dynamic

DST_METHODS = sorted(dynamic.METHODS.names())  # every registered method, under FSDP2 too


def torchrun(worker: str, stem: Path, *args: str, ranks: int = 2) -> list[dict]:
    """:func:`_torchrun.torchrun` on the PyTorch fallback (the cases here test the
    distributed logic, not the kernels)."""
    return _torchrun.torchrun(worker, stem, *args, ranks=ranks, kernels=False)


# -- FSDP2 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One torchrun for every FSDP2 case (start-up dominates): a MaskSet run and, per DST
    method, a straight run and one stopped at step 17 and resumed from state dicts."""
    stem = tmp_path_factory.mktemp("fsdp") / "out"
    return torchrun("fsdp_worker.py", stem, str(stem), *DST_METHODS)


@pytest.mark.parametrize("run", ["maskset", *DST_METHODS])
def test_fsdp2_masks_hold_on_every_shard(fsdp_runs: list[dict], run: str) -> None:
    # The worker asserts after every step that each rank's weight shard and optimizer
    # state are zero where the mask is False (uneven shards: 31 and 9 rows on 2 ranks).
    r0, r1 = fsdp_runs
    for n, mask in r0[run]["masks"].items():
        assert torch.equal(mask, r1[run]["masks"][n])
        assert not r0[run]["weights"][n][~mask].any(), n


def test_fsdp2_gradual_and_one_shot_pruning_hold_on_every_shard(fsdp_runs: list[dict]) -> None:
    r0, r1 = fsdp_runs
    runs = [(r0["gradual"], r1["gradual"], 0.8),  # GradualPruner's final sparsity
            (r0["gradual"]["prune"], r1["gradual"]["prune"], 0.5)]  # sparsekit.prune's
    for run, other, sparsity in runs:
        kept = sum(int(m.sum()) for m in run["masks"].values())
        total = sum(m.numel() for m in run["masks"].values())
        assert 1 - kept / total == pytest.approx(sparsity, abs=0.01)
        for n, mask in run["masks"].items():
            assert torch.equal(mask, other["masks"][n])
            assert not run["weights"][n][~mask].any(), n


@pytest.mark.parametrize("method", DST_METHODS)
def test_fsdp2_dst_decisions_identical_on_every_rank(fsdp_runs: list[dict], method: str) -> None:
    r0, r1 = fsdp_runs
    h0, h1 = r0[method]["history"], r1[method]["history"]
    assert len(h0) == 6  # updates at steps 5, 10, …, 30
    assert any(not torch.equal(h0[0][n], h0[-1][n]) for n in h0[0])  # the masks moved
    for a, b in zip(h0, h1, strict=True):
        for n in a:
            assert torch.equal(a[n], b[n]), n


@pytest.mark.parametrize("method", DST_METHODS)
def test_fsdp2_dst_resumes_exactly(fsdp_runs: list[dict], method: str) -> None:
    for r in fsdp_runs:
        straight, resumed = r[method], r[method + "/resumed"]
        for n in straight["masks"]:
            assert torch.equal(straight["masks"][n], resumed["masks"][n]), n
        for n in straight["weights"]:
            assert torch.equal(straight["weights"][n], resumed["weights"][n]), n


# -- FSDP2 on SparseLinear ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_sparse_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    stem = tmp_path_factory.mktemp("fsdp_sparse") / "out"
    return torchrun("fsdp_sparse_worker.py", stem, str(stem))


def test_fsdp2_trains_sparse_layers_as_one_process(fsdp_sparse_runs: list[dict]) -> None:
    r0, r1 = fsdp_sparse_runs
    assert r0["sharded"].keys() == {f"{i}.{p}" for i in (0, 2, 4) for p in ("values", "bias")}
    for n, p in r0["sharded"].items():
        assert torch.equal(p, r1["sharded"][n]), n
        # the gradients are summed in another order than in one process
        torch.testing.assert_close(p, r0["one_process"][n], rtol=1e-5, atol=1e-6)
    for n, mask in r0["masks"].items():  # the zeros hold: only the kept weights exist
        assert not r0["dense"][n][~mask].any() and r0["dense"][n][mask].all(), n


def test_fsdp2_sparse_layers_resume_exactly(fsdp_sparse_runs: list[dict]) -> None:
    for r in fsdp_sparse_runs:
        for n, p in r["sharded"].items():
            assert torch.equal(p, r["resumed"][n]), n


def test_fsdp2_refuses_to_change_a_sparse_structure(fsdp_sparse_runs: list[dict]) -> None:
    for r in fsdp_sparse_runs:
        assert r["set_structure"].startswith(
            "SparseLinear: set_structure changes the number of stored weights, which FSDP2 "
            "cannot follow")
        assert "change structures before fully_shard" in r["set_structure"]
        assert "SparseLinear: loading a state with another structure changes" in r["load_other"]


# -- DDP on SparseLinear -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["snfs", "srigl"])
def test_ddp_resizing_methods_on_sparse_layers_stay_identical(ddp_dst_runs: list[dict],
                                                             method: str) -> None:
    r0, r1 = (r[f"{method}:sparse"] for r in ddp_dst_runs)
    assert len(r0["history"]) == 17
    for h0, h1 in zip(r0["history"], r1["history"], strict=True):
        for n in h0:
            assert torch.equal(h0[n], h1[n])
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    if method == "snfs":  # layers trade weights: DDP followed the new sizes
        sizes = {tuple(int(m.sum()) for m in h.values()) for h in r0["history"]}
        assert len(sizes) > 1


# -- ranks that disagree -------------------------------------------------------------------


def test_wrapped_models_with_masks_that_differ_between_ranks_are_refused(tmp_path) -> None:
    runs = torchrun("mismatch_worker.py", tmp_path / "out", str(tmp_path / "out"))
    for r in runs:
        assert r["ddp"].startswith("masks differ between the 2 ranks, first at 'module.0.weight'")
        assert r["fsdp"].startswith("masks differ between the 2 ranks, first at '0.weight'")
        assert r["fsdp_same"] == "no error"
        assert r["sparse_ddp"].startswith("SparseLinear structures differ between the 2 ranks")
        # masks made from each rank's own weights before DDP gave them rank 0's: the replicas
        # drifted apart without a word; a load of another state on each rank, too
        assert r["prune_then_wrap"].startswith("masks differ between the 2 ranks, first at "
                                               "'0.weight'")
        assert r["load_differs"].startswith("masks differ between the 2 ranks")
    # clipping measured the dense gradients under DDP and FSDP2 (0.79 against 0.55 in one
    # process): each rank's gradient is masked before it is averaged now
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))
    masks, _ = compute_masks(model, 0.7, method="random", seed=0)
    masked = MaskSet(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    masked.attach(opt)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(x), x[:, :4].argmax(1)).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01))
    opt.step()
    for r in runs:
        for wrapped in ("clip_ddp", "clip_fsdp"):
            assert r[wrapped]["norm"] == pytest.approx(norm, rel=1e-6), wrapped
            for n, p in model.named_parameters():
                assert torch.allclose(r[wrapped]["weights"][n], p, atol=1e-7), (wrapped, n)


# -- the helpers, in one process -----------------------------------------------------------


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_helpers_are_the_identity_without_a_process_group() -> None:
    t = torch.arange(6.0)
    assert distributed.world_size() == 1 and distributed.rank() == 0
    distributed.all_reduce_sum(t)
    assert torch.equal(t, torch.arange(6.0))
    assert distributed.full(t) is t and distributed.local(t) is t
    assert distributed.shard_like(t, t) is t
    distributed.check_same_on_ranks({"w": t > 2})
    model = nn.Linear(3, 2)
    assert not distributed.is_sharded(model)
    with distributed.unsharded(model):
        assert isinstance(model.weight, nn.Parameter)


def test_import_sparsekit_leaves_dynamo_and_dtensor_unimported() -> None:
    # each takes about a second to import; sparsekit needs neither until a DTensor or a
    # torch.compile exists (distributed.is_dtensor, kernels.num_threads' constant mark)
    code = ("import sys, sparsekit, sparsekit.engine, sparsekit.llm, sparsekit.distributed; "
            "print(sorted(m for m in ('torch._dynamo', 'torch.distributed.tensor') "
            "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_helpers_on_a_one_rank_mesh(one_rank) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    whole = torch.arange(12.0).reshape(4, 3)
    d = distribute_tensor(whole, mesh, [Shard(0)])
    assert isinstance(d, DTensor) and distributed.is_dtensor(d)
    assert not distributed.is_dtensor(whole) and not distributed.is_dtensor("d")
    assert torch.equal(distributed.full(d), whole)
    distributed.local(d).zero_()  # the shard itself: writes reach the DTensor
    assert not distributed.full(d).any()
    mask = whole > 5
    laid = distributed.shard_like(mask, d)
    assert isinstance(laid, DTensor) and torch.equal(distributed.local(laid), mask)
    with pytest.raises(ValueError, match=r"shape \(3, 4\) cannot be laid out like a DTensor"):
        distributed.shard_like(mask.t(), d)
    t = torch.ones(3)
    distributed.all_reduce_sum(t)
    assert torch.equal(t, torch.ones(3))


def test_rebuild_reducer_follows_a_resized_parameter(one_rank) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    g = torch.Generator().manual_seed(0)
    layer = sparsekit.SparseLinear(6, 5, torch.rand(5, 6, generator=g) < 0.3)
    model = DDP(nn.Sequential(layer))
    model(torch.randn(2, 6)).sum().backward()
    layer.set_structure(torch.rand(5, 6, generator=g) < 0.7)
    distributed.rebuild_reducer(model)
    model(torch.randn(2, 6)).sum().backward()
    assert layer.values.grad.shape == (layer.nnz,)


# -- sparsekit.llm.prune under torchrun ------------------------------------------------------


def _llm_worker():
    return _torchrun.worker_module("llm_prune_worker.py")


LLM_METHODS = ["magnitude", "wanda", "sparsegpt"]


@pytest.fixture(scope="module")
def llm_prune_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One torchrun for every llm.prune case: each method on 8 windows, Wanda on 7 windows
    (which 2 ranks cannot share) and on a model that differs between the ranks."""
    pytest.importorskip("transformers")
    stem = tmp_path_factory.mktemp("llm_prune") / "out"
    return torchrun("llm_prune_worker.py", stem, str(stem),
                    *(f"{m}@8" for m in LLM_METHODS), "wanda@7", "perturbed@8")


def test_llm_prune_under_torchrun_matches_one_process(llm_prune_runs: list[dict]) -> None:
    worker = _llm_worker()
    for method in LLM_METHODS:
        one = worker.pruned(method, 8)  # one process, all 8 windows
        r0, r1 = (r[f"{method}@8"] for r in llm_prune_runs)
        assert set(r0["masks"]) == set(one["masks"]) and len(one["masks"]) == 14
        for n in one["masks"]:
            assert torch.equal(r0["masks"][n], r1["masks"][n]), (method, n)
            assert torch.equal(r0["weights"][n], r1["weights"][n]), (method, n)
            assert torch.equal(r0["masks"][n], one["masks"][n]), (method, n)
            # SparseGPT's updates see XᵀX summed in another order: equal up to rounding
            torch.testing.assert_close(r0["weights"][n], one["weights"][n], rtol=1e-4,
                                       atol=1e-5)


def test_llm_prune_refuses_windows_that_ranks_cannot_share(llm_prune_runs: list[dict]) -> None:
    for r in llm_prune_runs:
        assert r["wanda@7"]["error"] == (
            "calibration: 7 windows cannot be shared evenly by 2 ranks; accepted: a multiple "
            "of 2 windows (nsamples=6 or 8)"
        )


def test_llm_prune_refuses_models_that_differ_between_ranks(llm_prune_runs: list[dict]) -> None:
    for r in llm_prune_runs:
        assert r["perturbed@8"]["error"].startswith(
            "the blocks' weights differ between the 2 ranks, first at "
            "'model.layers.1.mlp.up_proj.weight' (1 of 18 differ); load the same model"
        )


def test_rank_share_and_stats_in_one_process(one_rank) -> None:
    from sparsekit.llm.calibration import rank_share
    from sparsekit.observe import InputStats

    tokens = torch.arange(12).reshape(4, 3)
    assert rank_share(tokens) is tokens
    stats = InputStats(3, gram=True)
    stats.add(torch.ones(2, 3))
    assert stats.all_reduce() is stats
    assert stats.rows == 2 and torch.equal(stats.sq, torch.full((3,), 2.0))
    assert torch.equal(stats.gram, torch.full((3, 3), 2.0))


def test_distributed_prune_benchmark_quick(tmp_path) -> None:
    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "distributed_prune.py"), "--quick",
         "--methods", "wanda", "--repeats", "1", "--cores", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-5000:]
    data = json.loads((tmp_path / "distributed_prune_quick.json").read_text())
    (row,) = data["rows"]
    assert row["method"] == "wanda" and row["mask_agreement"] == 1.0
    assert [(r["processes"], r["best"] > 0) for r in row["runs"]] == [(1, True)] * 2 + [(2, True)]
    assert "| wanda |" in (tmp_path / "distributed_prune_quick.md").read_text()


def test_distributed_prune_benchmark_refuses_a_single_core() -> None:
    # one core cannot give two processes half of it each: the runs would compare one
    # process on one core with two on two (and time the one-core setting twice)
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "distributed_prune.py"), "--cores", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2 and "--cores must be at least 2" in result.stderr
    assert "got 1" in result.stderr


# -- sparsekit.prune with data under torchrun ------------------------------------------------

DATA_METHODS = ["wanda", "flap", "gradient", "snip", "taylor", "grasp"]


def _prune_worker():
    return _torchrun.worker_module("prune_worker.py")


@pytest.fixture(scope="module")
def prune_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One torchrun for every sparsekit.prune-with-data case: each criterion on 4 batches,
    Taylor on 3 (which 2 ranks cannot share) and Wanda on a model that differs between the
    ranks."""
    stem = tmp_path_factory.mktemp("prune") / "out"
    return torchrun("prune_worker.py", stem, str(stem), *(f"{m}@4" for m in DATA_METHODS),
                    "taylor@3", "perturbed@3")


def test_prune_with_data_under_torchrun_matches_one_process(prune_runs: list[dict]) -> None:
    worker = _prune_worker()
    for method in DATA_METHODS:
        one = worker.pruned(method, 4)  # one process, all 4 batches
        r0, r1 = (r[f"{method}@4"] for r in prune_runs)
        assert set(r0["masks"]) == set(one["masks"]) == {"0.weight", "2.weight", "4.weight"}
        for n, mask in one["masks"].items():
            assert torch.equal(r0["masks"][n], r1["masks"][n]), (method, n)
            assert torch.equal(r0["masks"][n], mask), (method, n)
            assert torch.equal(r0["scores"][n], r1["scores"][n]), (method, n)
            # each rank summed over its 2 batches, then the ranks were summed
            torch.testing.assert_close(r0["scores"][n], one["scores"][n], rtol=1e-5,
                                       atol=1e-8)


def test_prune_with_data_under_torchrun_refuses_what_ranks_cannot_share(
        prune_runs: list[dict]) -> None:
    for r in prune_runs:
        assert r["taylor@3"]["error"] == (
            "data: 3 batches cannot be shared evenly by 2 ranks; accepted: a multiple of 2 "
            "batches (len(data)=2 or 4)"
        )
        assert r["perturbed@3"]["error"].startswith(
            "the targets' weights differ between the 2 ranks, first at '2.weight' (1 of 3 "
            "differ); load the same model on every rank"
        )


def test_rank_slice_in_one_process_and_on_one_rank(one_rank) -> None:
    assert distributed.rank_slice(5, "data", "batches", "len(data)") == slice(0, 5)
