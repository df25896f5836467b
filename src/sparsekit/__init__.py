"""sparsekit: choose a mask, keep it through training, and make it real.

The pipeline and its state are imported here; the domain subpackages (``sparsekit.llm``,
``.activation``, ``.data``, ``.graph``, ``.models`` …) load on first attribute access
(PEP 562), so ``import sparsekit`` never imports ``transformers``, ``networkx`` or
``matplotlib``.
"""

import importlib
from typing import Any

from sparsekit.allocation import ALLOCATIONS
from sparsekit.checkpoint import load, save
from sparsekit.diff import diff
from sparsekit.engine import compile
from sparsekit.engine.sparse_linear import SparseLinear
from sparsekit.masks import MaskSet
from sparsekit.patterns import PATTERNS, parse_pattern
from sparsekit.pretrained import from_pretrained, save_pretrained
from sparsekit.prune import prune
from sparsekit.report import Report, report
from sparsekit.schedules import DynamicSparsity, GradualPruner, IterativePruning, soup
from sparsekit.scores import CRITERIA
from sparsekit.structured import shrink
from sparsekit.targets import resolve_targets

__version__ = "0.1.0"

__all__ = [
    "ALLOCATIONS",
    "CRITERIA",
    "PATTERNS",
    "DynamicSparsity",
    "GradualPruner",
    "IterativePruning",
    "MaskSet",
    "Report",
    "SparseLinear",
    "compile",
    "diff",
    "from_pretrained",
    "load",
    "parse_pattern",
    "prune",
    "report",
    "resolve_targets",
    "save",
    "save_pretrained",
    "shrink",
    "soup",
]

_SUBPACKAGES = frozenset({
    "activation", "allocation", "attention", "checkpoint", "cli", "data", "distributed", "engine",
    "finetune", "graph", "integrations", "llm", "masks", "models", "moe", "patterns", "pretrained",
    "registry", "regularize", "report", "sae", "schedules", "scores", "structured", "targets",
    "training",
})


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"sparsekit.{name}")
    raise AttributeError(f"module 'sparsekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBPACKAGES})
