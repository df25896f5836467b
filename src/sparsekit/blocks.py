"""Transformer blocks: find them, capture the calls they receive, replay those calls.

Block-wise algorithms (pruning an LLM one block at a time, TEAL's greedy allocation of
activation sparsity) need three things from an architecture: its repeated blocks
(``model.layers`` in LLaMA/Mistral/Qwen2, ``decoder.layers`` in OPT, ``transformer.h`` in
GPT-2, ``encoder.layer`` in BERT), the arguments a block is called with, and a way to call
a block again on chosen hidden states. :func:`find_blocks` finds them,
:func:`capture_inputs` records the calls with a forward pre-hook (stopping the forward
pass as soon as every block was reached), :class:`BlockCall` replays one call on any block
and :class:`BlockReplay` keeps one call per block to re-run on demand.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_device,
    check_module,
    check_not_compiled,
    model_errors,
)
from sparsekit.observe import batches, check_inputs_materialized, preserved
from sparsekit.targets import linear_types as layer_types  # nn.Linear and GPT-2's Conv1D

__all__ = ["BlockCall", "BlockReplay", "capture_inputs", "check_runs_once", "find_blocks",
           "home_device", "layer_types", "to_device"]

_HIDDEN = "hidden_states"
# A replayed call must not grow a key-value cache: every replay would attend to the last.
_NO_CACHE = {"past_key_values": None, "past_key_value": None, "cache": None, "use_cache": False}


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks: its largest ``nn.ModuleList`` of same-type blocks
    holding linear layers. An encoder-decoder model (T5, BART: its config's
    ``is_encoder_decoder``) is refused by name: its decoder's blocks were found, and
    calibrating them on token ids alone failed with transformers' "You must specify
    exactly one of input_ids or inputs_embeds", as if the data were wrong."""
    _check_model(model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) is True:
        raise ValueError(
            f"model: {type(model).__name__} is an encoder-decoder model, whose two stacks of "
            "blocks (the decoder's calibrated on the encoder's outputs) are not supported; "
            "accepted: decoder and encoder models such as LLaMA, Mistral, Qwen2, GPT-2, OPT "
            "and BERT")
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
        check_not_compiled("model", model, "pruning")
        raise ValueError(
            f"model: {type(model).__name__} has no list of transformer blocks (an nn.ModuleList "
            "of identical blocks with Linear layers); accepted: decoder and encoder models such "
            "as LLaMA, Mistral, Qwen2, GPT-2, OPT and BERT"
        )
    return best[1]


@dataclass(frozen=True)
class BlockCall:
    """The arguments of one call to a block, without its hidden states, to replay on any
    block of the same kind. Key-value caches are dropped (``use_cache=False``)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_key: str | None  # None: the hidden states were the first positional argument

    def __call__(self, block: nn.Module, hidden: Any) -> torch.Tensor:
        """Run ``block`` on ``hidden`` and return its output hidden states (or logits): the
        output itself, the first item of a tuple or list, or the ``logits`` (else the first
        value) of a dict or Hugging Face ``ModelOutput`` (a whole ``BertModel`` replayed as
        a block returns ``last_hidden_state`` and ``pooler_output``)."""
        if self.hidden_key is None:
            out = block(hidden, *self.args, **self.kwargs)
        else:
            out = block(*self.args, **{self.hidden_key: hidden}, **self.kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        elif isinstance(out, Mapping):  # was an AttributeError on .float() of the output
            out = out["logits"] if "logits" in out else next(iter(out.values()), None)
        else:
            out = getattr(out, "logits", out)
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"{type(block).__name__} returned no hidden states (got "
                             f"{type(out).__name__}); accepted: blocks whose output is a tensor, "
                             "a tuple or a dict whose first item is one")
        return out


class _Captured(Exception):
    """Raised by the last block's pre-hook to stop the forward pass once all are captured."""


def _no_cache(model: nn.Module) -> dict[str, bool]:
    """``use_cache=False`` where ``model.forward`` takes it: a whole forward pass for its
    blocks' inputs keeps no key-value cache."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters \
        else {}


def capture_inputs(
    model: nn.Module,
    blocks: Sequence[nn.Module],
    inputs: Iterable[Any],
    device: torch.device | None = None,
    param: str = "inputs",
) -> list[tuple[list[Any], list[BlockCall]]]:
    """For each block, its hidden states and call arguments on each of ``inputs``.

    ``model(x)`` runs on each ``x`` of ``inputs`` (moved to the device of the model's first
    parameter, with ``use_cache=False`` where ``model.forward`` takes it), in eval mode
    without autograd, and stops as soon as every block has been called; a block called
    several times keeps its first call. With ``device`` the captured tensors are moved
    there. Raises ``ValueError`` if an input never reaches a block; errors about the
    inputs (on the meta device, or ones the model cannot take) name ``param``, the
    caller's argument they came from.
    """
    _check_model(model)
    device = check_device(device)  # an unknown name was blamed on the inputs
    if not isinstance(blocks, (Sequence, nn.ModuleList)) or isinstance(blocks, str) \
            or not all(isinstance(b, nn.Module) for b in blocks):
        raise ArgumentTypeError(f"blocks must be a sequence of modules of the model (an "
                                f"nn.ModuleList), got {_kind(blocks)}")
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, Iterable):
        raise ArgumentTypeError(f"inputs must be an iterable (a list) of model inputs, got "
                                f"{type(inputs).__name__}")
    captured: list[tuple[list[Any], list[BlockCall]]] = [([], []) for _ in blocks]
    pending: set[int] = set()

    def hook(i: int):
        def fn(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if i not in pending:
                return
            pending.discard(i)
            kwargs = {k: _NO_CACHE.get(k, v) for k, v in kwargs.items()}
            if args:
                key, hidden = None, args[0]
            elif _HIDDEN in kwargs:
                key, hidden = _HIDDEN, kwargs.pop(_HIDDEN)
            else:
                raise ValueError(f"blocks[{i}] was called without a positional input or "
                                 f"{_HIDDEN}=; got keyword arguments {sorted(kwargs)}")
            captured[i][0].append(to_device(hidden, device))
            captured[i][1].append(BlockCall(to_device(args[1:], device),
                                            to_device(kwargs, device), key))
            if not pending:
                raise _Captured

        return fn

    extra = _no_cache(model)
    home = home_device(model)
    handles = [b.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, b in enumerate(blocks)]
    try:
        with preserved(model, train=False), torch.no_grad():
            for x in inputs:
                check_inputs_materialized(param, x)
                pending.update(range(len(blocks)))
                # an input the model cannot take was a raw RuntimeError from deep inside
                with contextlib.suppress(_Captured), model_errors(param):
                    model(to_device(x, home), **extra)
                if pending:
                    raise ValueError(f"{param}: the forward pass never reached blocks "
                                     f"{sorted(pending)}")
    finally:
        for h in handles:
            h.remove()
    return captured


def check_runs_once(model: nn.Module, blocks: Sequence[nn.Module], x: Any,
                    param: str = "inputs") -> None:
    """``ValueError`` naming a block of ``blocks`` that ``model(x)`` runs more than once
    (ALBERT's one block, shared by every depth): a caller that replays each block once on
    its captured inputs (:func:`capture_inputs`) would see one depth of it only. ``x`` is
    one input, run as :func:`capture_inputs` runs them; errors about it name ``param``."""
    check_inputs_materialized(param, x)
    calls = [0] * len(blocks)

    def count(i: int) -> Callable[..., None]:
        def fn(*_: Any) -> None:
            calls[i] += 1
        return fn

    extra = _no_cache(model)
    handles = [b.register_forward_pre_hook(count(i)) for i, b in enumerate(blocks)]
    try:
        with preserved(model, train=False), torch.no_grad(), model_errors(param):
            model(to_device(x, home_device(model)), **extra)
    finally:
        for h in handles:
            h.remove()
    again = {i: n for i, n in enumerate(calls) if n > 1}
    if again:
        i, n = next(iter(again.items()))
        raise ValueError(
            f"model: block {i} ({type(blocks[i]).__name__}) runs {n} times in one forward "
            "pass (a block shared by several depths, as ALBERT's): calibrated once, it would "
            "see the inputs of one depth only; accepted: models whose blocks each run once; "
            "the model was not changed")


class BlockReplay:
    """One recorded call of each named block, re-run on demand.

    The calls are captured on the first non-empty batch of ``data`` (any form accepted by
    :func:`sparsekit.observe.batches`). Calling the replay runs the block again on its
    recorded inputs, so forward hooks installed in between (thresholds, masks) show in the
    output while the rest of the model does not run.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[str], data: Any,
                 param: str = "data") -> None:
        _check_model(model)
        if isinstance(blocks, str) or not isinstance(blocks, Sequence) \
                or not all(isinstance(b, str) for b in blocks):
            # a str was taken letter by letter
            raise ArgumentTypeError(f"blocks must be a list of module names (str), got "
                                    f"{_kind(blocks)}")
        modules = dict(model.named_modules())
        unknown = [b for b in blocks if b not in modules]
        if unknown:
            raise ValueError(f"blocks: {unknown} are not modules of the model")
        first = next((x for x, _ in batches(data, param)
                      if not (isinstance(x, torch.Tensor) and x.numel() == 0)), None)
        if first is None:
            raise ValueError(f"{param} holds no (non-empty) batches; pass a tensor of inputs "
                             "or a list of them")
        self.modules = {b: modules[b] for b in blocks}
        captured = capture_inputs(model, list(self.modules.values()), [first], param=param)
        self.calls = {b: (hidden[0], call[0]) for b, (hidden, call) in zip(blocks, captured)}

    def __call__(self, block: str) -> torch.Tensor:
        """``block``'s output (float32) on its recorded input, without autograd."""
        if not isinstance(block, str) or block not in self.calls:  # was a raw KeyError
            raise ValueError(f"block {block!r} was not recorded; accepted: "
                             f"{', '.join(map(repr, self.calls)) or 'none'}")
        hidden, call = self.calls[block]
        with torch.no_grad():
            return call(self.modules[block], hidden).float()


def _check_model(model: Any) -> None:
    """Raise unless ``model`` is an ``nn.Module`` (anything else was a raw AttributeError)."""
    check_module("model", model)


def _kind(value: Any) -> str:
    """The type of ``value``, and of its items where it has any."""
    if isinstance(value, (list, tuple)):
        return f"{type(value).__name__} of {sorted({type(v).__name__ for v in value})}"
    return type(value).__name__


def home_device(model: nn.Module) -> torch.device | None:
    """The device of ``model``'s first parameter (``None`` without parameters): where its
    inputs go, as calibration tokens made on the CPU (from texts, say) must for a model on
    a GPU."""
    _check_model(model)
    first = next(model.parameters(), None)
    return first.device if first is not None else None


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
