"""Old engine module paths that keep working, with a ``DeprecationWarning``."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable


def moved(old: str, names: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``old`` that resolves each of ``names`` (name → new
    module path) from its new module, warning that the old path is deprecated."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old}.{name} moved to {names[name]}.{name}; the old path will be removed",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(names[name]), name)

    return __getattr__
