"""profile(): how sparse the inputs of each ``nn.Linear`` already are, and could be.

ReLU transformers show "lazy neurons" (Li et al. 2023): only a few percent of MLP
activations are nonzero, and some features are never active at all. SiLU/GELU models have
almost no exact zeros but many tiny values, which is what thresholding exploits.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsekit._atomic import atomic_write
from sparsekit._checks import ArgumentTypeError, check_module, check_seed, seeded
from sparsekit.activation.layers import find_layers
from sparsekit.activation.sparsity import ActivationSparsity
from sparsekit.engine.activation_linear import thresholded_layers
from sparsekit.observe import check_layer_inputs_materialized, run, watch

__all__ = ["LayerProfile", "profile"]

_PLOT_VALUES = 20_000  # |x| samples per layer kept for the histogram


@dataclass(frozen=True)
class LayerProfile:
    """Input statistics of one layer over the profiled data."""

    zeros: float  # fraction of exactly zero inputs
    below_threshold: float | None  # fraction with |x| under the calibrated threshold
    dead: int  # input features that were zero on every row
    features: int


def profile(
    model: nn.Module,
    data: Any,
    *,
    sparsity: ActivationSparsity | None = None,
    plot: str | PathLike[str] | None = None,
    seed: int = 0,
) -> dict[str, LayerProfile]:
    """Profile the inputs of every ``nn.Linear`` but the output heads of ``model`` on ``data``
    (the default layers of :func:`~sparsekit.activation.layers.find_layers`).

    With ``sparsity`` the layers are those it was calibrated for and ``below_threshold`` is
    filled in. With ``plot`` a histogram of ``log10 |x|`` per layer type (the last part of
    the module name, e.g. ``down_proj``) is saved there. ``seed`` (an int in
    [0, 2**63 - 1]) draws the values the histograms sample. Every argument is checked
    before the model runs; data whose layer inputs hold NaN or infinite values is refused
    (as by :func:`~sparsekit.activation.calibrate`), and no plot is written then.
    """
    check_module("model", model)
    check_seed("seed", seed)
    if plot is not None:  # checked now, not after the whole run
        if not isinstance(plot, (str, PathLike)):
            raise ArgumentTypeError(f"plot must be a path (a str or an os.PathLike) or None, "
                                    f"got {plot!r}")
        plot_file = _plot_file(plot)
    if sparsity is None:
        layers = find_layers(model, "teal")
        widths = {n: m.in_features for n, m in layers.items()}
        thresholds: dict[str, torch.Tensor] = {}
    else:
        if not hasattr(sparsity, "thresholds"):
            raise ArgumentTypeError(
                "sparsity must be calibrated input thresholds (an ActivationSparsity from "
                f"sparsekit.activation.calibrate) or None, got {type(sparsity).__name__}"
            )
        # names the model lacks were a KeyError, thresholds of the wrong width an error from
        # inside the forward pass that blamed the data
        layers = thresholded_layers(sparsity.thresholds, model, "sparsity.thresholds")
        thresholds = {n: t.detach().cpu() for n, t in sparsity.thresholds.items()}
        widths = {n: t.numel() for n, t in thresholds.items()}
    counts = {n: torch.zeros(3, dtype=torch.long) for n in layers}  # zeros, below, rows
    alive = {n: torch.zeros(w, dtype=torch.bool) for n, w in widths.items()}
    samples: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    generator = seeded(seed)
    infinite: set[str] = set()  # layers that saw a NaN or infinite input
    meta: set[str] = set()  # layers whose inputs were on the meta device (no values)

    def see(name: str, x: torch.Tensor, _out: Any) -> None:
        if x.is_meta:  # refused after the run; copying it out failed, blaming the data
            meta.add(name)
            return
        # rows spelled out: -1 is ambiguous for the no-feature input of an nn.Linear(0, n)
        x = x.detach().reshape(math.prod(x.shape[:-1]), x.shape[-1]).float().cpu()
        if not bool(x.isfinite().all()):
            infinite.add(name)
        counts[name][0] += int((x == 0).sum())
        if sparsity is not None:
            counts[name][1] += int((x.abs() < thresholds[name]).sum())
        counts[name][2] += x.shape[0]
        alive[name] |= (x != 0).any(0)
        flat = x.abs().flatten()
        if not flat.numel():  # a call with no rows (an MoE expert no token reached)
            return
        pick = torch.randint(flat.numel(), (_PLOT_VALUES,), generator=generator)
        samples[name].append(flat[pick])

    with watch(layers, see):
        run(model, data)
    check_layer_inputs_materialized([n for n in layers if n in meta])
    if infinite:  # NaN counts as a live input: a dense-looking profile of garbage
        raise ValueError(f"data: the inputs of layers {[n for n in layers if n in infinite]} "
                         "hold NaN or infinite values; profile data the model computes finite "
                         "activations for")
    result = {}
    for n, (zeros, below, rows) in ((n, c.tolist()) for n, c in counts.items()):
        total = max(rows * alive[n].numel(), 1)
        result[n] = LayerProfile(
            zeros=zeros / total,
            below_threshold=None if sparsity is None else below / total,
            dead=int((~alive[n]).sum()),
            features=alive[n].numel(),
        )
    if plot is not None:
        _plot(samples, *plot_file)
    return result


def _plot_file(plot: str | PathLike[str]) -> tuple[str, str]:
    """The file ``plot`` names and its image format, as ``savefig`` reads them (a path
    without a suffix gets matplotlib's default format's), once matplotlib can write it
    there: an error after the whole run (no matplotlib, an unknown format, a directory in
    the way) lost the profile."""
    try:
        import matplotlib
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as e:
        raise ValueError(f"plot needs matplotlib, which is not installed ({e}); "
                         "install it or pass plot=None") from e
    name = os.fspath(plot)
    if not name or name.endswith((os.sep, "/")):  # savefig wrote a hidden ".png" there
        raise ValueError(f"plot must name a file, got {name!r}; accepted: a file path in an "
                         "existing directory")
    path = Path(plot)
    if not path.parent.is_dir():
        raise ValueError(f"plot: directory '{path.parent}' does not exist; accepted: a path in "
                         "an existing directory")
    fmt = path.suffix[1:].lower() or matplotlib.rcParams["savefig.format"]
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        raise ValueError(f"plot: matplotlib cannot write format {fmt!r} (the suffix of "
                         f"'{plot}'); accepted suffixes: {sorted(formats)}")
    file = name if path.suffix else f"{name}.{fmt}"
    if Path(file).is_dir():
        raise ValueError(f"plot: '{file}' is a directory; accepted: a file path in an "
                         "existing directory")
    return file, fmt


def _plot(samples: dict[str, list[torch.Tensor]], path: str, fmt: str) -> None:
    """Histograms of ``samples`` by layer type, written whole to ``path`` in ``fmt`` (or
    not at all: an interrupted save left a truncated image, one over a symbolic link to
    nothing failed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_type: dict[str, list[torch.Tensor]] = {}
    for name, values in samples.items():
        by_type.setdefault(name.rsplit(".", 1)[-1], []).extend(values)
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, values in by_type.items():
        v = torch.cat(values)
        zeros = float((v == 0).float().mean())
        ax.hist(torch.log10(v[v > 0]).numpy(), bins=100, histtype="step", density=True,
                label=f"{kind} ({zeros:.0%} exact zeros)")
    ax.set_xlabel("log10 |x| (nonzero inputs)")
    ax.set_ylabel("density")
    ax.set_title("Linear-layer input magnitudes by layer type")
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=120, format=fmt)
    finally:
        plt.close(fig)
