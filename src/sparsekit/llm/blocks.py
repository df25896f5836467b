"""Transformer blocks: find them, list their prunable layers, capture and replay their inputs.

Pruning runs block by block, so all this module needs from an architecture is the list of
its repeated blocks (``model.layers`` in LLaMA/Mistral/Qwen2, ``decoder.layers`` in OPT,
``transformer.h`` in GPT-2, ``encoder.layer`` in BERT) and the arguments block 0 is called
with, which are the same for every block and are replayed on new hidden states.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsekit.targets import TargetSpec, resolve_targets

DEFAULT_EXCLUDE = ("lm_head",)


def layer_types() -> tuple[type[nn.Module], ...]:
    """``nn.Linear``, plus GPT-2's ``Conv1D`` (a linear layer storing its weight as (in, out))."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


@dataclass(frozen=True)
class Layer:
    """One prunable linear layer, seen through its weight in ``(out, in)`` layout."""

    name: str  # parameter name, e.g. "model.layers.0.mlp.up_proj.weight"
    module: nn.Module

    @property
    def transposed(self) -> bool:
        """Whether the stored weight is ``(in, out)`` (GPT-2's ``Conv1D``)."""
        return not isinstance(self.module, nn.Linear)

    @property
    def shape(self) -> torch.Size:
        w = self.module.weight
        return w.t().shape if self.transposed else w.shape

    def weight(self) -> torch.Tensor:
        """A float32 copy of the weight in ``(out, in)`` layout."""
        w = self.module.weight.detach()
        w = w.t() if self.transposed else w
        return w.float().clone(memory_format=torch.contiguous_format)

    def to_storage(self, t: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` tensor in the stored weight's layout."""
        return t.t() if self.transposed else t

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor) -> None:
        self.module.weight.copy_(self.to_storage(w))


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks: its largest ``nn.ModuleList`` of same-type blocks
    holding linear layers."""
    types = layer_types()
    best: tuple[int, nn.ModuleList] | None = None
    for module in model.modules():
        if (
            isinstance(module, nn.ModuleList) and len(module) > 0
            and len({type(b) for b in module}) == 1
            and any(isinstance(m, types) for m in module[0].modules())
        ):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, module)
    if best is None:
        raise ValueError(
            f"model: {type(model).__name__} has no list of transformer blocks (an nn.ModuleList "
            "of identical blocks with Linear layers); accepted: decoder and encoder models such "
            "as LLaMA, Mistral, Qwen2, GPT-2, OPT and BERT"
        )
    return best[1]


def block_layers(
    model: nn.Module,
    blocks: nn.ModuleList,
    targets: TargetSpec | Sequence[TargetSpec] | None,
    exclude: Iterable[str],
) -> list[list[Layer]]:
    """The targeted linear layers of each block (layers outside the blocks stay dense).

    The default exclusion ``"lm_head"`` is dropped for models that have no such module;
    any other ``exclude`` entry must match a targeted layer.
    """
    explicit = targets is not None
    module_names = [n for n, _ in model.named_modules()]
    exclude = [
        e for e in exclude
        if e not in DEFAULT_EXCLUDE or any(fnmatch.fnmatchcase(n, e) for n in module_names)
    ]
    if targets is None:
        targets = [t for t in layer_types() if any(isinstance(m, t) for m in model.modules())]
        if not targets:
            raise ValueError(f"model: {type(model).__name__} has no Linear layers to prune")
    chosen = resolve_targets(model, targets, exclude)
    owner = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    per_block: list[list[Layer]] = [[] for _ in blocks]
    outside = []
    for t in chosen:
        if t.param is not getattr(t.module, "weight", None) or not isinstance(
            t.module, layer_types()
        ):
            raise ValueError(f"targets: {t.name!r} is not the weight of a Linear layer")
        if id(t.module) in owner:
            per_block[owner[id(t.module)]].append(Layer(t.name, t.module))
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


class _Captured(Exception):
    """Raised by the block-0 hook to stop the forward pass once the inputs are captured."""


@dataclass(frozen=True)
class BlockCall:
    """The arguments of one call to block 0, without its hidden states, to replay on any block."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_key: str | None  # None: the hidden states were the first positional argument

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Run ``block`` on ``hidden`` and return its output hidden states."""
        if self.hidden_key is None:
            out = block(hidden, *self.args, **self.kwargs)
        else:
            out = block(*self.args, **{self.hidden_key: hidden}, **self.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


def capture_inputs(
    model: nn.Module,
    first_block: nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device | None,
) -> tuple[list[torch.Tensor], list[BlockCall]]:
    """Hidden states and call arguments of ``first_block`` for each batch of token ids.

    Runs only the embeddings: a hook on block 0 records its inputs and raises to stop.
    """
    hidden: list[torch.Tensor] = []
    calls: list[BlockCall] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        key = None if args else "hidden_states"
        kwargs = dict(kwargs)
        h = args[0] if key is None else kwargs.pop(key)
        hidden.append(to_device(h.detach(), device))
        calls.append(BlockCall(to_device(args[1:], device), to_device(kwargs, device), key))
        raise _Captured

    takes_cache = "use_cache" in inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if takes_cache else {}
    embed_device = next(model.parameters()).device
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for tokens in batches:
            with contextlib.suppress(_Captured):
                model(tokens.to(embed_device), **extra)
    finally:
        handle.remove()
    return hidden, calls


def to_device(obj: Any, device: torch.device | None) -> Any:
    """Move the tensors in nested tuples, lists and dicts to ``device`` (None: leave them)."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj
