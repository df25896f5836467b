"""The one table layout of ``report`` and ``diff``: rows of cells and a bold total row,
rendered as GitHub-flavoured Markdown, as a ``rich`` table or as that table's plain text."""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text


def markdown(headers: Sequence[str], right: Sequence[bool], body: Sequence[Sequence[str]],
             total: Sequence[str]) -> str:
    """A Markdown table; ``right`` says which columns are right-aligned (numbers)."""
    lines = [_line(headers), _line(["---:" if r else ":---" for r in right])]
    lines += [_line(cells) for cells in body]
    lines.append(_line([f"**{c}**" if c else "" for c in total]))
    return "\n".join(lines)


def rich_table(headers: Sequence[str], right: Sequence[bool], body: Sequence[Sequence[str]],
               total: Sequence[str]) -> Table:
    """The same content as a ``rich.table.Table``."""
    table = Table()
    for header, r in zip(headers, right, strict=True):
        table.add_column(header, justify="right" if r else "left")
    for cells in body:
        table.add_row(*map(Text, cells))  # Text, not str: names are not rich markup
    table.add_section()
    table.add_row(*map(Text, total), style="bold")
    return table


def text(table: Table, width: int = 120) -> str:
    """``table`` drawn as plain text, ``width`` columns wide (no colour, no terminal)."""
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(table)
    return out.getvalue().rstrip("\n")


def _line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
