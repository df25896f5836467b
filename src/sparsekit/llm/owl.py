"""Deprecated: OWL is an allocation; use :mod:`sparsekit.allocation`.

``outlier_ratio`` and ``owl_sparsities`` moved to :mod:`sparsekit.allocation`, where OWL is
registered as ``allocation="owl"`` for :func:`sparsekit.prune` too.
"""

from __future__ import annotations

import warnings
from typing import Any

from sparsekit import allocation

_MOVED = ("outlier_ratio", "owl_sparsities")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        warnings.warn(f"sparsekit.llm.owl.{name} is deprecated; use sparsekit.allocation.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(allocation, name)
    raise AttributeError(f"module 'sparsekit.llm.owl' has no attribute {name!r}")
