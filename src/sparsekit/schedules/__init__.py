"""When the pipeline runs again: gradual, iterative and dynamic sparsity schedules.

Each implements the :class:`Schedule` protocol.
"""

from sparsekit.schedules.base import Schedule
from sparsekit.schedules.dynamic import METHODS, DynamicSparsity
from sparsekit.schedules.gradual import GradualPruner, cubic_sparsity
from sparsekit.schedules.iterative import IterativePruning
from sparsekit.schedules.soup import soup

__all__ = [
    "METHODS",
    "DynamicSparsity",
    "GradualPruner",
    "IterativePruning",
    "Schedule",
    "cubic_sparsity",
    "soup",
]
