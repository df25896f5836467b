"""Name → function tables shared by the Python API, the CLI and recipes.

Every pipeline stage (criteria, allocations, patterns, models …) registers its
implementations here, so ``"magnitude"``, ``"erk"`` or ``"lamp"`` resolve the same way
everywhere and an unknown name always produces the same helpful error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """A named table of functions for one pipeline stage.

    ``param`` is the user-facing argument name the table resolves (``"criterion"``,
    ``"allocation"`` …); it appears in error messages.
    """

    def __init__(self, param: str) -> None:
        self.param = param
        self._table: dict[str, F] = {}
        self._meta: dict[str, dict[str, object]] = {}

    def register(self, name: str, **meta: object) -> Callable[[F], F]:
        """Decorator that adds a function to the table under ``name``, with optional
        metadata ``meta`` (read back with :meth:`meta`)."""

        def add(fn: F) -> F:
            if name in self._table:
                raise ValueError(f"{self.param} {name!r} is already registered")
            self._table[name] = fn
            self._meta[name] = meta
            return fn

        return add

    def get(self, name: str) -> F:
        """Return the function called ``name``, or raise a ``ValueError`` listing all names."""
        if not isinstance(name, str):
            raise TypeError(f"{self.param} must be a string, got {type(name).__name__}")
        try:
            return self._table[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.param} {name!r}; accepted: {', '.join(self.names())}"
            ) from None

    def meta(self, name: str) -> dict[str, object]:
        """The metadata registered with ``name`` (a copy; empty if none was given)."""
        self.get(name)
        return dict(self._meta[name])

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
