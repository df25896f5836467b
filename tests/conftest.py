"""Shared fixtures."""

import pytest
import torch
from _torchrun import torchrun

from sparsekit.engine import kernels
from sparsekit.engine import sparse_linear as st


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build (or load) the native kernels once, before any test: the first build takes
    minutes on a busy machine and must not count against a subprocess test's timeout."""
    kernels.load()


@pytest.fixture(autouse=True, scope="session")
def _decision_cache(tmp_path_factory: pytest.TempPathFactory):
    """compile() keeps its timing decisions in a directory of this test session, not in
    the user's cache: every session times afresh and leaves nothing behind."""
    from sparsekit.engine import decisions

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decisions, "directory", lambda: tmp_path_factory.getbasetemp() / "decisions")
        yield


# DynamicSparsity under DDP on 2 ranks: every method on dense layers, the resizing ones
# (and RigL) on SparseLinear layers.
DDP_DST_RUNS = ["set", "rigl", "snfs", "granet", "srigl", "rigl:sparse", "snfs:sparse",
                "srigl:sparse"]


@pytest.fixture(scope="session")
def ddp_dst_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """One torchrun for every DynamicSparsity-under-DDP case (start-up dominates: a launch
    per case cost 7-13 s): what each rank saved, per run of ``DDP_DST_RUNS``."""
    stem = tmp_path_factory.mktemp("ddp_dst") / "out"
    return torchrun("dst_worker.py", stem, str(stem), *DDP_DST_RUNS)


@pytest.fixture(scope="session")
def lenet_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """A dense lenet_300_100 checkpoint (it records its architecture); tests only read it."""
    import sparsekit
    from sparsekit.models import create_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lenet") / "dense.safetensors"
    sparsekit.save(create_model("lenet_300_100"), path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["kernels", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test on the compiled kernels and on the PyTorch fallback."""
    if request.param == "kernels":
        if not kernels.available():
            pytest.skip(f"compiled kernels unavailable: {kernels.unavailable_reason()}")
    else:
        monkeypatch.setattr(st, "_use_kernels", lambda t: False)
    return request.param
