"""How a benchmark with targets ends, written once.

Every benchmark that states targets ends the same way: one ``PASS``/``MISS`` line per check on
the console, its Markdown and JSON results written to ``benchmarks/results/``, and exit status 1
when a target was missed (0 under ``--no-check``, which only reports). :func:`conclude` does
those steps in that order; :func:`checklist` renders the same verdicts for the Markdown, so the
console and the results file say the same thing in the same words.

A check is a ``(claim, met)`` pair: the claim a sentence that names what was measured and
against which target, ``met`` whether the measurement reached it.

:func:`suffix_arg` and :func:`stem` name the results files of a run given ``--suffix``
(``<name>_<suffix>.{json,md}``), so that a run on another CPU or of another subset does not
overwrite a committed file.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

Check = tuple[str, bool]


def suffix_arg(text: str) -> str:
    """``argparse`` type of a ``--suffix``: letters, digits, ``-`` and ``_`` only (it becomes
    part of a file name; no separators, no ``..``). The empty default means no suffix
    (argparse passes a string default through the type too)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise argparse.ArgumentTypeError(
            f"must be letters, digits, '-' and '_', got {text!r}")
    return text


def stem(*parts: str) -> str:
    """The non-empty ``parts`` joined by ``_``: ``stem("llm_decode", "", "zen4")`` is
    ``"llm_decode_zen4"``."""
    return "_".join(p for p in parts if p)


def verdict(met: bool) -> str:
    """``"PASS"`` for a met target, ``"MISS"`` for a missed one."""
    return "PASS" if met else "MISS"


def checklist(checks: Iterable[Check]) -> list[str]:
    """One Markdown list item per check: ``- PASS: claim`` or ``- MISS: claim``."""
    return [f"- {verdict(met)}: {claim}" for claim, met in checks]


def conclude(checks: Iterable[Check], files: Mapping[Path, str | Any], *,
             no_check: bool) -> int:
    """Print a verdict line per check, write ``files``, and return the exit status.

    ``files`` maps each output path to its content: text is written as it is, anything else as
    indented JSON. Parent folders are created. The status is 1 when a check missed, unless
    ``no_check`` (a report-only run, or a smoke setting whose targets do not apply).
    """
    checks = list(checks)
    for claim, met in checks:
        print(f"{verdict(met)}: {claim}")
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        text = content if isinstance(content, str) else json.dumps(content, indent=2) + "\n"
        path.write_text(text)
        print(f"wrote {path}")
    missed = any(not met for _, met in checks)
    return 1 if missed and not no_check else 0
