"""The prunable linear layers of each transformer block, seen in ``(out, in)`` layout.

Finding the blocks, capturing their inputs and replaying them is :mod:`sparsekit.blocks`;
this module adds what LLM pruning needs on top: which linear layers of each block are
targeted, and a view of each weight that hides GPT-2's transposed ``Conv1D`` storage.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from sparsekit.blocks import layer_types
from sparsekit.targets import Target, TargetSpec, _as_list, resolve_targets, stores_transposed

DEFAULT_EXCLUDE = ("lm_head",)


@dataclass(frozen=True)
class Layer:
    """One prunable linear layer, seen through its weight in ``(out, in)`` layout."""

    name: str  # parameter name, e.g. "model.layers.0.mlp.up_proj.weight"
    module: nn.Module

    @property
    def transposed(self) -> bool:
        """Whether the stored weight is ``(in, out)`` (GPT-2's ``Conv1D``)."""
        return stores_transposed(self.module)

    @property
    def shape(self) -> torch.Size:
        w = self.module.weight
        return w.t().shape if self.transposed else w.shape

    def weight(self) -> torch.Tensor:
        """A float32 copy of the weight in ``(out, in)`` layout; a float64 weight's copy
        stays float64, so that a method which only masks writes its kept weights back
        exactly (they were rounded to float32)."""
        w = self.module.weight.detach()
        w = w.t() if self.transposed else w
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        return w.to(dtype).clone(memory_format=torch.contiguous_format)

    def to_storage(self, t: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` tensor in the stored weight's layout."""
        return t.t() if self.transposed else t

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        self.module.weight.copy_(self.to_storage(w))


def block_layers(
    model: nn.Module,
    blocks: nn.ModuleList,
    targets: TargetSpec | Sequence[TargetSpec] | None,
    exclude: str | Iterable[str],
) -> list[list[Layer]]:
    """The targeted linear layers of each block (layers outside the blocks stay dense).

    ``targets`` and ``exclude`` are read as :func:`~sparsekit.targets.resolve_targets`
    reads them (a single string is one entry). The default exclusion ``"lm_head"`` is
    dropped when it matches no targeted layer (the model has none, or ``targets`` names
    other layers); any other ``exclude`` entry must match a targeted layer.
    """
    explicit = targets is not None
    if targets is None:
        targets = [t for t in layer_types() if any(isinstance(m, t) for m in model.modules())]
        if not targets:
            raise ValueError(f"model: {type(model).__name__} has no Linear layers to prune")
    elif not _as_list(targets, "targets"):
        raise ValueError(f"targets={targets!r} matches no layer; accepted: None (every Linear "
                         "layer of the blocks), or module types, names or globs")
    owners: dict[int, list[int]] = {}
    for i, block in enumerate(blocks):
        for m in block.modules():
            owners.setdefault(id(m), []).append(i)
    if not explicit:
        _check_matrices(model, blocks)
    found = resolve_targets(model, targets)

    def linear_outside(chosen: list[Target]) -> list[str]:
        """The Linear weights among ``chosen`` when none lies inside the blocks (other
        parameters are named as no Linear weight below)."""
        linear = [t for t in chosen if isinstance(t.module, layer_types())
                  and t.param is getattr(t.module, "weight", None)]
        # by the layer's own name: a tied lm_head's weight is first named after the embedding
        return [] if any(id(t.module) in owners for t in chosen) else [
            f"{t.module_name}.weight" for t in linear]

    # said before the exclusions: targets="lm_head" was "no parameters left to sparsify"
    # (the default exclude dropped it), as if a typo, not a layer llm.prune never prunes;
    # beside a layer of the blocks it was dropped without a word
    named = [e for e in _as_list(targets, "targets") or [] if isinstance(e, str)]
    outside = [n for e in named for n in linear_outside(resolve_targets(model, [e]))]
    if explicit and not outside:
        outside = linear_outside(found)
    if outside:
        raise ValueError(
            f"targets: {outside[:3]} lie outside the transformer blocks, and "
            "llm.prune prunes only the Linear layers inside them, block by block; accepted: "
            "targets inside the blocks (None: all of their Linear layers), or "
            "sparsekit.prune for layers outside them"
        )
    targeted = [t.module_name for t in found]
    exclude = [
        e for e in _as_list(exclude, "exclude") or []
        if e not in DEFAULT_EXCLUDE or any(fnmatch.fnmatchcase(n, e) for n in targeted)
    ]
    chosen = resolve_targets(model, targets, exclude)
    per_block: list[list[Layer]] = [[] for _ in blocks]
    outside = []
    for t in chosen:
        if t.param is not getattr(t.module, "weight", None) or not isinstance(
            t.module, layer_types()
        ):
            raise ValueError(f"targets: {t.name!r} is not the weight of a Linear layer")
        where = owners.get(id(t.module), [])
        if len(where) > 1:  # pruned as the last block's, on its inputs alone, without a word
            raise ValueError(
                f"targets: {t.name!r} is one layer shared by blocks {where}, which are pruned "
                "one at a time, each calibrated on its own inputs; accepted: blocks with "
                "layers of their own (untie them first, e.g. with copy.deepcopy), or leave it "
                f"out with exclude={t.module_name!r}"
            )
        if where:
            per_block[where[0]].append(Layer(t.name, t.module))
        else:
            outside.append(t.name)
    if outside and explicit:
        raise ValueError(
            f"targets: {outside} lie outside the transformer blocks; only layers inside the "
            "blocks can be pruned block by block"
        )
    if not any(per_block):
        raise ValueError(
            "targets: the model's transformer blocks hold no matching Linear layers "
            f"(targets={targets!r}, exclude={list(exclude)!r})"
        )
    return per_block


def _check_matrices(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Raise ``ValueError`` if the blocks hold weight matrices that are no layer llm.prune
    prunes (:func:`layer_types`): the experts of a mixture-of-experts block stored as 3-D
    tensors (transformers' Mixtral, Qwen2-MoE). Left dense without a word, they were 94 % of
    a tiny Mixtral's block weights while the masks reported the sparsity asked for."""
    layers = {id(m.weight) for m in blocks.modules() if isinstance(m, layer_types())}
    names = {id(p): n for n, p in model.named_parameters()}
    other = [(names.get(id(p), n), p) for n, p in blocks.named_parameters()
             if p.dim() >= 2 and id(p) not in layers]
    if not other:
        return
    total = sum(p.numel() for p in blocks.parameters() if p.dim() >= 2)
    share = sum(p.numel() for _, p in other) / total
    listed = ", ".join(f"{n} {tuple(p.shape)}" for n, p in other[:4])
    more = f" and {len(other) - 4} more" if len(other) > 4 else ""
    raise ValueError(
        f"model: its transformer blocks hold weights that are no Linear layer ({listed}{more}: "
        f"{share:.1%} of the blocks' weight matrices), which llm.prune cannot prune; "
        "mixture-of-experts blocks that store their experts as 3-D tensors are not "
        "supported. Accepted: blocks whose weight matrices are Linear (or GPT-2 Conv1D) "
        "layers, or targets= naming the layers to prune (the others stay dense)"
    )
