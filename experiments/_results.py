"""What every experiment does at the end: write Markdown, JSON and a plot to results/."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

RESULTS = Path(__file__).parent / "results"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def write_results(
    out: Path, stem: str, markdown: str, data: dict[str, Any], fig: plt.Figure
) -> list[Path]:
    """Write ``stem``.md, .json (NaN as null) and .png under ``out``; return the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.{ext}" for ext in ("md", "json", "png")]
    paths[0].write_text(markdown)
    paths[1].write_text(json.dumps(_no_nan(data), indent=2) + "\n")
    fig.tight_layout()
    fig.savefig(paths[2], dpi=120)
    plt.close(fig)
    return paths


def _no_nan(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x
