"""Transformer blocks for TEAL's greedy allocation: which layers, and their output error.

A layer's block is the module named by its name up to the first numeric part
(``model.layers.3.mlp.up_proj`` -> ``model.layers.3``; the whole model when there is none).
Layers of one block that read the same input (Hugging Face ``q/k/v_proj``, ``gate/up_proj``,
BERT's ``query/key/value``, DistilBERT's ``q/k/v_lin``) share one sparsity level.
:class:`BlockError` re-runs one recorded call of each block
(:class:`sparsekit.blocks.BlockReplay`) with chosen layer thresholds to measure the block's
relative output error.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sparsekit.activation.sparsity import input_hook
from sparsekit.blocks import BlockReplay
from sparsekit.engine.activation_linear import sparsify_input

__all__ = ["BlockError", "block_groups"]

# The projections Hugging Face models feed one input (siblings under one parent): LLaMA,
# Mistral and Qwen's q/k/v_proj and gate/up_proj, BERT's and RoBERTa's query/key/value,
# DistilBERT's q/k/v_lin. Searched apart, BERT's query, key and value ended at 0.95 / 0.95
# / 0.60 of one input's features.
_SHARED_INPUT = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv",
                 "query": "qkv", "key": "qkv", "value": "qkv",
                 "q_lin": "qkv", "k_lin": "qkv", "v_lin": "qkv",
                 "gate_proj": "gate_up", "up_proj": "gate_up"}


def block_groups(names: list[str]) -> dict[str, list[list[str]]]:
    """Layer names by block, each block's layers grouped by shared input, in order."""
    blocks: dict[str, dict[str, list[str]]] = {}
    for name in names:
        parts = name.split(".")
        cut = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), 0)
        block, rest = ".".join(parts[:cut]), parts[cut:]
        parent, last = ".".join(rest[:-1]), rest[-1] if rest else name
        key = f"{parent}/{_SHARED_INPUT.get(last, last)}"
        blocks.setdefault(block, {}).setdefault(key, []).append(name)
    return {b: list(g.values()) for b, g in blocks.items()}


class BlockError:
    """Relative output error of each block when chosen layers' inputs are thresholded.

    Each block's call is recorded once (:class:`sparsekit.blocks.BlockReplay`) and its dense
    output kept as the reference.
    """

    def __init__(self, model: nn.Module, blocks: list[str], calibration: Any) -> None:
        self.modules = dict(model.named_modules())
        self.replay = BlockReplay(model, blocks, calibration, "calibration")
        self.reference = {b: self.replay(b) for b in blocks}
        infinite = [b for b, y in self.reference.items() if not bool(y.isfinite().all())]
        if infinite:  # every error was NaN then, and the search chose its levels blindly
            raise ValueError(f"calibration: the outputs of blocks {infinite} hold NaN or "
                             "infinite values, so their errors cannot rank the layers; "
                             "calibrate on data the model computes finite outputs for")

    def __call__(self, block: str, thresholds: dict[str, torch.Tensor]) -> float:
        """``||y_sparse - y||^2 / ||y||^2`` of ``block``'s output ``y``."""
        ref = self.reference[block]
        with _thresholded(self.modules, thresholds):
            out = self.replay(block)
        diff = torch.linalg.vector_norm(out - ref).square()
        return float(diff / torch.linalg.vector_norm(ref).square().clamp_min(1e-30))


@contextlib.contextmanager
def _thresholded(modules: dict[str, nn.Module], thresholds: dict[str, torch.Tensor]
                 ) -> Iterator[None]:
    """The inputs of the named layers thresholded while inside."""
    handles = [modules[n].register_forward_pre_hook(
        input_hook(functools.partial(sparsify_input, threshold=t)), with_kwargs=True)
        for n, t in thresholds.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
