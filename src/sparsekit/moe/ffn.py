"""The feed-forward networks of a Hugging Face transformer, and where a replacement goes.

An FFN neuron is a row of each writer (LLaMA's ``gate_proj`` and ``up_proj``, BERT's
``intermediate.dense``) and a column of the reader (``down_proj``, ``output.dense``); the
layout comes from :func:`sparsekit.structured.transformer.block_group`, the same one
structured pruning removes neurons by. :func:`find_ffns` lists them with their activation
function (:func:`set_activation` swaps it: ReLU-fication); :func:`install` puts a module
computing the whole FFN (reader bias included) in its place: the module holding writers
and reader (LLaMA's ``mlp``), or, where they live in different modules (BERT's
``intermediate`` and ``output``), the writers' module, with the reader replaced by
``nn.Identity`` so that what follows it (BERT's residual and LayerNorm) still runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sparsekit.structured.transformer import block_group, transformer_blocks

__all__ = ["FFN", "find_ffns", "install", "set_activation"]

_ACTIVATIONS = ("act_fn", "intermediate_act_fn")  # LLaMA/Mistral/Qwen2, BERT


@dataclass(frozen=True)
class FFN:
    """One block's feed-forward network: ``reader(act(gate(x)) * up(x))`` when gated
    (``writers == (gate, up)``), else ``reader(act(up(x)))``."""

    name: str  # the block, e.g. "model.layers.0"
    writers: tuple[str, ...]  # qualified module names
    reader: str
    act: Callable[[torch.Tensor], torch.Tensor]

    @property
    def gated(self) -> bool:
        return len(self.writers) == 2


# how block_group's errors start: they name prune_structured's argument, which moefy has not
_UNIT_PREFIX = "unit 'ffn': "


def find_ffns(model: nn.Module) -> list[FFN]:
    """The FFN of every transformer block of ``model``, in order.

    ``ValueError`` for a model without transformer blocks, or with blocks whose FFN is not
    LLaMA- or BERT-shaped ``nn.Linear`` layers.
    """
    prefix, blocks = transformer_blocks(model)
    ffns = []
    for i, block in enumerate(blocks):
        name = f"{prefix}.{i}"
        try:
            group = block_group(name, block, "ffn")
        except ValueError as err:  # it named prune_structured's unit= argument
            raise ValueError(f"model: {str(err).removeprefix(_UNIT_PREFIX)}") from None
        writers = tuple(s.name.removesuffix(".weight") for s in group.slices
                        if s.role == "out" and s.name.endswith(".weight"))
        reader = next(s.name.removesuffix(".weight") for s in group.slices if s.role == "in")
        layers = [model.get_submodule(n) for n in (*writers, reader)]
        if not all(type(m) is nn.Linear for m in layers):
            raise ValueError(f"model: the FFN of {name!r} is not made of nn.Linear layers")
        holder, attr = _activation(model, name, writers)
        ffns.append(FFN(name, writers, reader, getattr(holder, attr)))
    return ffns


def _activation(model: nn.Module, name: str, writers: tuple[str, ...]) -> tuple[nn.Module, str]:
    """The module holding the activation of block ``name``'s FFN, and its attribute."""
    holder = model.get_submodule(writers[-1].rpartition(".")[0])
    attr = next((a for a in _ACTIVATIONS if callable(getattr(holder, a, None))), None)
    if attr is None:
        raise ValueError(f"model: found no activation ({' or '.join(_ACTIVATIONS)}) next "
                         f"to the FFN writers of {name!r}")
    return holder, attr


def set_activation(model: nn.Module, ffn: FFN, act: nn.Module) -> None:
    """Make ``act`` the activation of ``ffn`` in ``model`` (a model with ``ffn``'s layout),
    in the train/eval mode of the module holding it."""
    holder, attr = _activation(model, ffn.name, ffn.writers)
    setattr(holder, attr, act.train(holder.training))


def weights(model: nn.Module, ffn: FFN) -> tuple[torch.Tensor, torch.Tensor | None,
                                               torch.Tensor, torch.Tensor | None]:
    """``w_in`` (n, writers, d), its bias (n, writers) or None, the reader's weight
    (d_out, n) and bias, detached."""
    writers = [model.get_submodule(n) for n in ffn.writers]
    reader = model.get_submodule(ffn.reader)
    w_in = torch.stack([w.weight.detach() for w in writers], dim=1)
    biases = [w.bias for w in writers]
    b_in = None if all(b is None for b in biases) else torch.stack(
        [torch.zeros(w.out_features, dtype=w.weight.dtype) if b is None else b.detach()
         for w, b in zip(writers, biases, strict=True)], dim=1)
    bias = None if reader.bias is None else reader.bias.detach()
    return w_in, b_in, reader.weight.detach(), bias


def hidden(ffn: FFN, x: torch.Tensor, w_in: torch.Tensor,
           b_in: torch.Tensor | None) -> torch.Tensor:
    """The FFN's neuron activations (the reader's input) for rows ``x`` (T, d)."""
    n, g, d = w_in.shape
    z = torch.nn.functional.linear(x, w_in.reshape(n * g, d),
                                   None if b_in is None else b_in.reshape(-1)).view(-1, n, g)
    return activate(ffn.act, z)


def activate(act: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """Neuron values from writer outputs ``z`` (..., n, writers): ``act(gate) * up`` or
    ``act(up)``."""
    return act(z[..., 0]) * z[..., 1] if z.shape[-1] == 2 else act(z[..., 0])


def install(model: nn.Module, ffn: FFN, module: nn.Module) -> None:
    """Put ``module`` (computing the whole FFN, reader bias included) in ``ffn``'s place."""
    writers = ffn.writers[0].rpartition(".")[0]
    reader_parent, _, reader_attr = ffn.reader.rpartition(".")
    _set(model, writers, module)
    if reader_parent != writers:
        setattr(model.get_submodule(reader_parent), reader_attr, nn.Identity())


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)
