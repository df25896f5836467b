"""Run a worker of ``tests/ddp`` under ``torchrun`` and collect what each rank saved.

One launcher for every multi-process test: 2 gloo CPU processes by default, one intra-op
thread each, a few retries (a gloo rendezvous or connection race on a busy machine is not
what these tests test), and the results each rank wrote to ``<stem>.rank<r>.pt``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

WORKERS = Path(__file__).parent / "ddp"
ATTEMPTS = 3


def torchrun(worker: str, stem: Path, *args: str, ranks: int = 2,
             kernels: bool = True) -> list[dict]:
    """Run ``tests/ddp/<worker> *args`` on ``ranks`` gloo processes; return what each rank
    saved to ``<stem>.rank<r>.pt``. ``kernels=False`` runs the workers on the PyTorch
    fallback (``SPARSEKIT_NO_KERNELS``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not kernels:
        env["SPARSEKIT_NO_KERNELS"] = "1"
    for _attempt in range(ATTEMPTS):
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
             "--standalone", str(WORKERS / worker), *args],
            capture_output=True, text=True, timeout=900, env=env,
        )
        if result.returncode == 0:
            break
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(f"{stem}.rank{r}.pt", weights_only=False) for r in range(ranks)]


def worker_module(worker: str) -> ModuleType:
    """``tests/ddp/<worker>`` imported in this process (its single-process reference code)."""
    if str(WORKERS) not in sys.path:  # the workers import their siblings (``_leave``)
        sys.path.insert(0, str(WORKERS))
    spec = importlib.util.spec_from_file_location(Path(worker).stem, WORKERS / worker)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
