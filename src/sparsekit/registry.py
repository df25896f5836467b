"""Name → entry tables shared by the Python API, the CLI and recipes.

Every pipeline stage (criteria, allocations, patterns, models …) registers its
implementations here, so ``"magnitude"``, ``"erk"`` or ``"lamp"`` resolve the same way
everywhere and an unknown name always produces the same helpful error.

A table declares the metadata its entries carry, with defaults, and every entry states
its own values when it registers (``CRITERIA.register("snip", data_driven=True,
labels=True)``), so facts about an algorithm live next to it rather than in a separate
list; ``CRITERIA.meta("snip")`` reads them and ``CRITERIA.names(data_driven=True)`` selects
by them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from sparsekit._checks import ArgumentTypeError

F = TypeVar("F")


class Registry(Generic[F]):
    """A named table of entries (functions, classes or specs) for one pipeline stage.

    ``param`` is the user-facing argument name the table resolves (``"criterion"``,
    ``"allocation"`` …); it appears in error messages. ``meta`` declares the metadata
    fields every entry has and their defaults; registering an undeclared field is a
    ``TypeError``, so a misspelt field cannot pass unnoticed. Names are listed sorted,
    or in registration order with ``ordered=True`` (for tables whose order means
    something, such as a preferred default first).
    """

    def __init__(
        self, param: str, *, meta: Mapping[str, Any] | None = None, ordered: bool = False
    ) -> None:
        self.param = param
        self._defaults = dict(meta or {})
        self._ordered = ordered
        self._table: dict[str, F] = {}
        self._meta: dict[str, Mapping[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[F], F]:
        """Decorator that adds an entry under ``name`` (a nonempty string, as every lookup
        takes: an int or ``None`` was registered, and every later error message of the table
        failed to list it) with metadata ``meta``."""
        if not isinstance(name, str):
            raise ArgumentTypeError(f"name of a {self.param} must be a nonempty string, got "
                                    f"{_short_repr(name)} ({type(name).__name__})")
        if not name:
            raise ValueError(f"name of a {self.param} must be a nonempty string, got ''")
        unknown = sorted(set(meta) - set(self._defaults))
        if unknown:
            accepted = ", ".join(sorted(self._defaults)) or "none"
            raise TypeError(
                f"unknown metadata {unknown} for {self.param} {name!r}; accepted: {accepted}"
            )

        def add(entry: F) -> F:
            if name in self._table:
                raise ValueError(f"{self.param} {name!r} is already registered")
            self._table[name] = entry
            self._meta[name] = MappingProxyType({**self._defaults, **meta})
            return entry

        return add

    def get(self, name: str) -> F:
        """Return the entry called ``name``, or raise a ``ValueError`` listing all names."""
        self._check(name)
        return self._table[name]

    def meta(self, name: str) -> Mapping[str, Any]:
        """The metadata of ``name`` (read-only; every declared field, defaults filled in)."""
        self._check(name)
        return self._meta[name]

    def names(self, **where: Any) -> list[str]:
        """All names, or those whose metadata equals every ``field=value`` in ``where``."""
        unknown = sorted(set(where) - set(self._defaults))
        if unknown:
            accepted = ", ".join(sorted(self._defaults)) or "none"
            raise TypeError(f"unknown metadata {unknown} of {self.param}; accepted: {accepted}")
        names = list(self._table) if self._ordered else sorted(self._table)
        return [n for n in names if all(self._meta[n][k] == v for k, v in where.items())]

    def _check(self, name: object) -> None:
        """Raise unless ``name`` names an entry: a name that is no string (``None``, an
        int, a list) is an :class:`~sparsekit._checks.ArgumentTypeError` (a ``TypeError``
        and a ``ValueError``), an unknown one a ``ValueError``; both name the parameter,
        the value and every accepted name."""
        if not isinstance(name, str):
            raise ArgumentTypeError(
                f"{self.param} must be a string, one of: {', '.join(self.names())}; got "
                f"{_short_repr(name)} ({type(name).__name__})"
            )
        if name not in self._table:
            raise ValueError(
                f"unknown {self.param} {name!r}; accepted: {', '.join(self.names())}"
            )

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is a registered name; ``False`` for anything else, unhashable
        values (a list, a dict) included, so that ``x not in TABLE`` guards any value."""
        return isinstance(name, str) and name in self._table

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"Registry({self.param!r}: {', '.join(self.names())})"


def _short_repr(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a huge list names itself briefly)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
