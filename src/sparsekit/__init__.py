"""sparsekit: choose a mask, keep it through training, and make it real."""

from sparsekit.allocation import ALLOCATIONS
from sparsekit.checkpoint import load, save
from sparsekit.engine import compile
from sparsekit.engine.sparse_linear import SparseLinear
from sparsekit.masks import MaskSet
from sparsekit.patterns import PATTERNS, parse_pattern
from sparsekit.prune import prune
from sparsekit.report import Report, report
from sparsekit.schedules import DynamicSparsity, GradualPruner, IterativePruning, soup
from sparsekit.scores import CRITERIA
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
    "load",
    "parse_pattern",
    "prune",
    "report",
    "resolve_targets",
    "save",
    "soup",
]
