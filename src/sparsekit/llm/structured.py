"""Structured pruning of Hugging Face transformers: FFN neurons, attention heads, layers.

The result is a smaller *dense* model, not a masked one:

* ``unit="ffn"`` removes intermediate neurons of every block's feed-forward network (the
  rows of ``gate_proj``/``up_proj`` — or BERT's ``intermediate.dense`` — and the columns
  of ``down_proj``/``output.dense``);
* ``unit="heads"`` removes attention heads. With grouped-query attention the unit is a
  key/value head together with the query heads that read it, so every block keeps the
  model's query-per-key ratio;
* ``unit="layers"`` removes whole blocks, those that change their hidden states least
  (ShortGPT's block influence, 1 − mean cosine similarity of a block's input and output).

FFN neurons and heads are :class:`~sparsekit.structured.Group` s — the same vocabulary as
CNN channels — ranked by ``"magnitude"`` (mean |W| over the group), ``"wanda"`` (mean
|W|·‖X‖ over calibration data: Wanda-SP) or ``"flap"`` (FLAP's fluctuation of the output
projection's input channels, Var(x_j)·‖W[:, j]‖², see :mod:`sparsekit.scores.flap`;
squared for heads, :data:`FLAP_POWERS`) and
cut with :func:`~sparsekit.structured.shrink.remove_channels`; ``allocation`` is
``"uniform"`` (the same fraction in every block), ``"global"`` (one ranking over all
blocks) or ``"adaptive"`` (FLAP's structure search, :mod:`sparsekit.structured.adaptive`:
scores standardised per block and unit, one ranking over all blocks and, with
``unit=("ffn", "heads")``, both units, weighted by the parameters each unit takes along).
FLAP as published is ``unit=("ffn", "heads"), method="flap", allocation="adaptive"``.
``"flap"`` also applies FLAP's bias compensation: the removed units' mean
contribution goes into the bias of ``down_proj`` / ``o_proj`` (added where the model has
none — so the model reloads with :func:`load_pretrained`, never plain ``from_pretrained``).
``round_to`` keeps neuron (and head-width) counts at multiples the dense kernels like.

The pruned model's ``config`` follows its new sizes, so ``save_pretrained`` then plain
``AutoModel*.from_pretrained`` works whenever the widths are uniform (and always after
removing layers). When blocks differ (``allocation="global"``, or BERT heads, whose size
the config derives from the head count), or FLAP added biases the architecture lacks,
the config records every parameter shape the standard config would get wrong (or not
have) under ``sparsekit_shapes``, and :func:`load_pretrained` rebuilds the model from
them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_fraction,
    check_int,
    check_materialized,
    check_module,
    check_seed,
)
from sparsekit.allocation import ALLOCATIONS
from sparsekit.blocks import home_device, to_device
from sparsekit.llm.calibration import Calibration, calibration_tokens, check_token_ids
from sparsekit.llm.prune import check_seqlen, check_writable_module
from sparsekit.observe import input_stats, run
from sparsekit.pretrained import check_config_class, config_errors
from sparsekit.quantize import (
    SCALE_NAME,
    attach_scales,
    guard_loading,
)
from sparsekit.scores.flap import fluctuation_scores, input_moments
from sparsekit.scores.wanda import wanda_scores
from sparsekit.select import top_k
from sparsekit.structured.adaptive import adaptive_counts, channel_cost, standardized_importance
from sparsekit.structured.compensate import fold_means
from sparsekit.structured.dependency import Group
from sparsekit.structured.importance import check_round_to, group_importance, round_count
from sparsekit.structured.shrink import check_removal, cut, remove_channels
from sparsekit.structured.transformer import transformer_blocks, transformer_groups

__all__ = ["FLAP_POWERS", "UNITS", "block_influence", "load_pretrained", "prune_structured"]

UNITS = {"ffn": ("wanda", "magnitude", "flap"), "heads": ("wanda", "magnitude", "flap"),
         "layers": ("block_influence",)}
"""Each unit and the methods that rank it (the first is the default)."""
_ALLOCATIONS = ("uniform", "global", "adaptive")

SHAPES_KEY = "sparsekit_shapes"

FLAP_POWERS = {"heads": 2.0}
"""FLAP ranks attention heads by the *square* of its fluctuation metric per column of
``o_proj`` (the authors' implementation squares it before standardising; FFN neurons
keep the plain metric). Measured on the benchmark LLaMA (4 × 256, 20 % of FFN + heads,
adaptive): perplexity 7.167 with the square against 7.547 without it (Wanda-SP: 7.279)."""


def prune_structured(
    model: nn.Module,
    calibration: Calibration | None = None,
    amount: float = 0.2,
    *,
    unit: str | Sequence[str] = "ffn",
    method: str | None = None,
    allocation: str = "uniform",
    round_to: int = 1,
    tokenizer: Any = None,
    nsamples: int = 32,
    seqlen: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Remove ``amount`` of ``model``'s FFN neurons, attention heads or layers, in place.

    ``unit`` is ``"ffn"``, ``"heads"``, ``"layers"`` or a pair such as ``("ffn", "heads")``
    pruned in one pass (one calibration run; ``amount`` is then the share of the units'
    parameters that goes); ``method`` ranks the units (see :data:`UNITS`; ``"magnitude"``
    needs no ``calibration``); ``allocation`` is ``"uniform"`` (every block loses
    ``amount`` of each unit), ``"global"`` (one ranking over all blocks, per unit) or
    ``"adaptive"`` (FLAP's structure search: scores standardised per block and unit, one
    ranking over all of them weighted by the parameters each unit takes along; see
    :mod:`sparsekit.structured.adaptive`). ``round_to`` rounds every block's kept count
    so its widths are multiples of it (see
    :func:`~sparsekit.structured.importance.round_count`; a head is ``head_dim`` wide).
    ``method="flap"`` folds the removed units' mean contribution into the output
    projections' biases (FLAP's compensation). ``calibration`` takes the forms of
    :func:`~sparsekit.llm.calibration.calibration_tokens`; ``seqlen`` defaults to the
    model's context length (at most 2048) and may not exceed it, as in
    :func:`~sparsekit.llm.prune` (a stream longer than the context was one window of the
    whole stream, run past the positions the model was built for). Every argument, and
    whether the model has the unit, is checked before anything changes; an ``amount`` that
    would remove all of a block's neurons or heads, or every layer, is a ``ValueError``, as
    is a block influence that is not finite (NaN or inf hidden states would rank the
    layers arbitrarily).
    Returns ``model`` (smaller, its ``config`` updated; see the module notes on saving). In
    a wrapper (a module holding a transformers model), the config updated is the inner
    model's, whose ``save_pretrained`` writes the blocks.
    """
    check_module("model", model)
    units = _check_units(unit)
    method = UNITS[units[0]][0] if method is None else method
    for name, value, known in (("method", method, UNITS[units[0]]),
                               ("allocation", allocation, _ALLOCATIONS)):
        if not isinstance(value, str):  # a list was a plain ValueError, as if misspelt
            raise ArgumentTypeError(f"unknown {name} {value!r} (a {type(value).__name__}, "
                                    f"not a name); accepted: {', '.join(map(repr, known))}")
    if method not in UNITS[units[0]]:
        raise ValueError(f"unknown method {method!r} for unit {units[0]!r}; accepted: "
                         f"{', '.join(map(repr, UNITS[units[0]]))}")
    if allocation not in _ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; accepted: "
                         f"{', '.join(map(repr, _ALLOCATIONS))}")
    check_fraction("amount", amount, zero=False)
    check_round_to(round_to)
    for name, value, default in (("allocation", allocation, "uniform"), ("round_to", round_to, 1)):
        if units == ("layers",) and value != default:  # ignored, silently
            raise ValueError(f"{name}={value!r} does not apply to unit='layers' (whole blocks "
                             f"go by one ranking of their influence); accepted: {default!r}, "
                             "the default")
    check_int("nsamples", nsamples, minimum=1)  # read only with calibration: 0 went unseen
    check_seed("seed", seed)
    for name, param in model.named_parameters():  # every method reads the weights
        check_materialized(f"model's parameter {name!r}", param)
    check_writable_module(model)
    _, blocks = transformer_blocks(model)
    owner = _config_owner(model, blocks)
    described = model if owner is None else owner  # a wrapper's context and vocabulary
    seqlen = check_seqlen(described, seqlen)
    if units == ("layers",):
        _layers_to_remove(amount, len(blocks))  # before any calibration run
    tokens = None
    if method != "magnitude":
        if calibration is None:
            hint = "" if units == ("layers",) else \
                "; use method='magnitude' to prune without data"
            raise ValueError(f"method {method!r} needs calibration data (token ids or texts)"
                             + hint)
        tokens = calibration_tokens(calibration, tokenizer=tokenizer, nsamples=nsamples,
                                    seqlen=seqlen, seed=seed)
        check_token_ids(tokens, described)
        tokens = to_device(tokens, home_device(model))  # a model on a GPU, tokens made here
    if units == ("layers",):
        _remove_layers(blocks, block_influence(model, tokens), amount, owner)
    else:
        groups = {u: transformer_groups(model, u) for u in units}
        everything = [g for u in units for g in groups[u]]
        scores, means = _scores(model, everything, tokens, method)
        removed = _select(model, groups, scores, amount, allocation, round_to,
                          readers_only=method == "flap",
                          powers=FLAP_POWERS if method == "flap" else {})
        # checked before fold_means changes the biases: a refused cut changes nothing
        removal = check_removal(model, [r for u in units for r in removed[u]])
        fold_means(model, removal, means)
        remove_channels(model, removal)
        _sync_heads(model)
        if owner is not None:
            for u in units:
                _update_config(owner, u, removed[u])
    if owner is not None:
        _record_shapes(owner)
    return model


def block_influence(model: nn.Module, tokens: torch.Tensor) -> list[float]:
    """ShortGPT's block influence of every block on ``tokens``: 1 − the mean cosine
    similarity of each token's hidden state before and after the block (low: the block
    barely changes its input, and removing it costs little)."""
    _, blocks = transformer_blocks(model)
    sums = [0.0] * len(blocks)
    counts = [0] * len(blocks)

    def hook(i: int):
        def fn(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            y = output[0] if isinstance(output, (tuple, list)) else output
            cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            sums[i] += float(cos.sum())
            counts[i] += cos.numel()
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        run(model, tokens, "calibration")
    finally:
        for h in handles:
            h.remove()
    return [1.0 - s / max(c, 1) for s, c in zip(sums, counts)]


def load_pretrained(path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`prune_structured`.

    Without recorded per-layer shapes this is ``from_pretrained`` of the class the config
    names. With them, the model is built from the config (in its ``dtype``, as
    ``from_pretrained`` builds it: a bfloat16 model came back float32), its tensors are cut
    to the recorded shapes and the saved weights (``*.safetensors``) are loaded into it.
    ``kwargs`` go to ``from_pretrained`` (the first case only: with recorded shapes they
    are a ``ValueError``, not silently ignored — a ``torch_dtype`` gave a float32 model).
    In both cases the int8 scales (``weight_scale``) of a model quantized by
    :func:`~sparsekit.llm.prune` are attached to their layers again, as
    :func:`sparsekit.from_pretrained` attaches them. The weights are the safetensors files
    the directory's ``model.safetensors.index.json`` lists (a listed file that is missing
    is a ``ValueError``), or without one every ``*.safetensors`` (a tensor held by two of
    them is a ``ValueError``). A ``path`` that is empty or no directory is one too.

    A config.json changed after saving is a ``ValueError`` naming what does not fit:
    ``architectures`` that name no model class for the config, sizes no model can have,
    recorded shapes that are not lists of positive ints no larger than the config's, or
    that differ from the saved tensors' (checked before any weight is loaded).
    """
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"path must be a directory written by save_pretrained (a str or "
                        f"os.PathLike), got {type(path).__name__}")
    if os.fspath(path) == "":  # Path("") is ".", but from_pretrained read it as a hub id
        raise ValueError("path is empty; accepted: a directory written by save_pretrained "
                         "(use '.' for the working directory)")
    if os.path.lexists(path) and not Path(path).is_dir():
        # a config.json was read as the config, then "holds no weights" named the file
        raise ValueError(f"path {str(path)!r} is not a directory (a file, or a link that "
                         "leads to none); accepted: a directory written by save_pretrained")
    if os.sep in str(path) and not Path(path).is_dir():  # a path, not a hub id
        raise FileNotFoundError(f"path: no such directory {str(path)!r}")
    where = f"path: the config in {str(path)!r}"
    try:
        with config_errors(where):
            config = transformers.AutoConfig.from_pretrained(path)
    except OSError as e:
        if Path(path).is_dir():
            raise
        # a bare name ("my_model") that is no directory was a hub id: a raw OSError about
        # connecting to huggingface.co, where "./my_model" named path
        raise FileNotFoundError(f"path: no such directory {str(path)!r}, nor a model id the "
                                f"hub or its cache has ({str(e).splitlines()[0]})") from e
    names = getattr(config, "architectures", None)
    name = names[0] if isinstance(names, list) and names else None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{where} names no transformers model class "
                         f"(architectures={names!r})")
    check_config_class(cls, config, where)
    if not hasattr(config, SHAPES_KEY):  # present but null is a config edited: checked below
        try:
            model = cls.from_pretrained(path, **kwargs)  # drops weight_scale (unexpected)
        except RuntimeError as e:
            if "ignore_mismatched_sizes" not in str(e):
                raise
            # a raw error after transformers' report: weights cut by sparsekit.shrink
            # under a config that still describes the full model
            raise ValueError(
                f"path: the weights in {str(path)!r} do not have the shapes its config.json "
                f"describes, and it records no per-layer shapes ({SHAPES_KEY}): a model cut "
                "by sparsekit.shrink keeps its config; prune with "
                "sparsekit.llm.prune_structured, which updates the config, or pass "
                "ignore_mismatched_sizes=True to load only what fits") from e
        _attach_saved_scales(model, _saved_scales(Path(path)), path)
        return model
    shapes = getattr(config, SHAPES_KEY)
    if kwargs:
        raise ValueError(f"{sorted(kwargs)}: from_pretrained's options do not apply to "
                         f"{str(path)!r}, whose config records per-layer shapes "
                         f"({SHAPES_KEY}); load it without them and convert the model "
                         "(e.g. model.to(torch.bfloat16))")
    with config_errors(where):  # in the config's dtype, as from_pretrained builds it
        model = cls._from_config(config)
    resize_to_recorded(model, shapes)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for f in _weight_files(Path(path)):
        if not f.is_file():  # load_file's raw OSError: "No such device", "No such file"
            raise ValueError(f"path: {str(f)!r} is not a weights file (a directory, a link "
                             "to one, or a link that leads nowhere or loops); accepted: a "
                             "directory whose *.safetensors are safetensors files")
        try:
            tensors = load_file(f)
        except SafetensorError as e:  # a truncated or overwritten file
            raise ValueError(f"path: {str(f)!r} is not a readable safetensors file "
                             f"({e})") from e
        if twice := sorted(set(tensors) & set(state)):  # the later file's won, silently
            raise ValueError(f"path: {twice[0]!r} is saved both in {str(origin[twice[0]])!r} "
                             f"and in {str(f)!r} ({len(twice)} tensor(s) twice); accepted: "
                             "a directory whose weight files hold each tensor once (remove "
                             "the stale files of an earlier save)")
        state.update(tensors)
        origin.update(dict.fromkeys(tensors, f))
    grids = {k: state.pop(k) for k in list(state) if _scale_owner(model, k) is not None}
    _check_saved_shapes(state, model.state_dict(), path)
    _check_saved_ties(state, model, path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for n, p in model.named_parameters() if n in state}
    untied = [n for n in missing if model.get_parameter(n).data_ptr() not in loaded] \
        if missing else []
    if unexpected or untied:
        raise ValueError(f"path: the weights in {str(path)!r} do not fit the recorded shapes "
                         f"(unexpected: {unexpected}, missing: {untied})")
    _attach_saved_scales(model, grids, path)
    return model.eval()


def _scale_owner(model: nn.Module, key: str) -> nn.Module | None:
    """The layer of ``model`` whose int8 scales the saved tensor ``key`` is (``<layer>.``
    :data:`~sparsekit.quantize.SCALE_NAME`, a layer with a weight and no ``weight_scale``
    of its architecture's own), else ``None``."""
    owner, _, leaf = key.rpartition(".")
    if leaf != SCALE_NAME:
        return None
    try:
        layer = model.get_submodule(owner)
    except AttributeError:
        return None  # not this model's: an unexpected key
    ours = not hasattr(layer, SCALE_NAME) or SCALE_NAME in layer._buffers  # not a native one
    return layer if ours and isinstance(getattr(layer, "weight", None), torch.Tensor) else None


def _saved_scales(path: Path) -> dict[str, torch.Tensor]:
    """The int8 scales (``*.weight_scale``) the safetensors weights of the directory
    ``path`` hold (none for a hub id or a directory of other weight files)."""
    from safetensors import safe_open

    if not (path.is_dir() and (any(path.glob("*.safetensors")) or (path / INDEX_NAME).is_file())):
        return {}
    found: dict[str, torch.Tensor] = {}
    for f in _weight_files(path):
        with safe_open(f, framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is no mapping: it has no __iter__
            found.update({k: handle.get_tensor(k) for k in names if k.endswith("." + SCALE_NAME)})
    return found


def _attach_saved_scales(model: nn.Module, grids: Mapping[str, torch.Tensor],
                         path: str | os.PathLike) -> None:
    """Attach the saved int8 scales ``grids`` (of ``llm.prune(..., quantize="int8")``) to
    their layers, as :func:`sparsekit.from_pretrained` does: ``from_pretrained`` dropped
    them as unexpected keys (the model no longer said its weights lie on an int8 grid), and
    a model with recorded shapes was refused for them. Scales that do not fit their layer
    are a ``ValueError`` naming them."""
    for key, scales in grids.items():
        layer = _scale_owner(model, key)
        if layer is None:
            continue  # another model's: from_pretrained reported it
        try:
            attach_scales(layer, scales.to(layer.weight.device))
        except ValueError as e:
            raise ValueError(f"path: {key!r} in {str(path)!r} is no int8 grid of its layer "
                             f"({e})") from e
    if grids:
        guard_loading(model)  # a bad weight_scale loaded later is refused before any tensor


# -- stages -------------------------------------------------------------------------------


def _scores(model: nn.Module, groups: list[Group], tokens: torch.Tensor | None, method: str
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-weight scores of every weight slice — |W|, |W|·‖X‖ (Wanda-SP) or, for the
    output projections only, Var(x)·W² (FLAP) — and, for FLAP, the mean of every input
    channel of the output projections (for the bias compensation)."""
    readers = method == "flap"
    names = {s.name for g in groups for s in g.slices
             if s.name.endswith(".weight") and (s.role == "in" or not readers)}
    weights = {n: model.get_parameter(n) for n in names}
    if method == "magnitude":
        return {n: w.detach().abs().float() for n, w in weights.items()}, {}
    layers = {n: model.get_submodule(n.rpartition(".")[0]) for n in names}
    if readers:
        moments = input_moments(model, layers, tokens)
        return ({n: fluctuation_scores(w, moments[n]) for n, w in weights.items()},
                {n: m.mean() for n, m in moments.items()})
    stats = input_stats(model, layers, tokens)
    return {n: wanda_scores(w, stats[n]) for n, w in weights.items()}, {}


def _select(model: nn.Module, groups: Mapping[str, list[Group]],
            scores: Mapping[str, torch.Tensor], amount: float, allocation: str,
            round_to: int, *, readers_only: bool, powers: Mapping[str, float]
            ) -> dict[str, list[tuple[Group, torch.Tensor]]]:
    """The units each group loses, per unit kind (each unit's entry scores raised to its
    ``powers`` value, 1 when absent); a group that would lose all of them is an error, and
    so is an ``amount`` that removes nothing at all (as for layers)."""
    if allocation == "adaptive":
        importance = {g.name: standardized_importance(g, scores, readers_only=readers_only,
                                                      power=powers.get(u, 1.0))
                      for u, gs in groups.items() for g in gs}
        every = [g for gs in groups.values() for g in gs]
        keep = adaptive_counts(importance, {g.name: channel_cost(model, g) for g in every},
                               float(amount))
    else:
        importance, keep = {}, {}
        for u, gs in groups.items():
            mine = {g.name: group_importance(g, scores, readers_only=readers_only,
                                             power=powers.get(u, 1.0)) for g in gs}
            importance.update(mine)
            keep.update(ALLOCATIONS.get(allocation)(mine, float(amount)))

    def single(units: Sequence[str]) -> bool:
        return all(g.channels == 1 for u in units for g in groups[u])

    def no_amount(units: Sequence[str]) -> ValueError:
        """Every block holds one unit (MQA's one key/value head), which it keeps: "use a
        larger amount" then "use a smaller one" sent the caller round in circles."""
        note = " (one key/value head: multi-query attention)" if "heads" in units else ""
        return ValueError(f"amount={amount} removes no {' or '.join(units)} unit: every block "
                          f"has a single one{note}, which it keeps, so no amount removes one; "
                          "prune another unit; the model was not changed")

    for u, gs in groups.items():
        empty = [g.name for g in gs if keep[g.name] < 1]
        if empty and single([u]):
            raise no_amount([u])
        if empty:
            raise ValueError(f"amount={amount} would remove every {u} unit of {empty}; use a "
                             "smaller amount (each block keeps at least one); the model was "
                             "not changed")
    # a uniform count stands for this unrounded one; round_count rounds it, not the count,
    # so groups of one width keep one count
    kept = 1 - float(amount) if allocation == "uniform" else None

    def count(g: Group) -> int:
        return round_count(keep[g.name], g, round_to,
                           near=None if kept is None else g.channels * kept)

    removed = {u: [(g, torch.nonzero(~top_k(importance[g.name], count(g))).flatten())
                   for g in gs] for u, gs in groups.items()}
    if not any(len(gone) for rs in removed.values() for _, gone in rs):  # a silent no-op
        if single(list(groups)):
            raise no_amount(list(groups))
        rounding = f" with round_to={round_to}" if round_to > 1 else ""
        raise ValueError(f"amount={amount} removes no {' or '.join(groups)} unit in any block "
                         f"(every block's kept count rounds to all of its units{rounding}); "
                         f"use a larger amount{' or a smaller round_to' if rounding else ''}; "
                         "the model was not changed")
    return removed


def _check_units(unit: object) -> tuple[str, ...]:
    """``unit`` as a tuple of unit names: one name, or several of ``"ffn"``/``"heads"``."""
    units = (unit,) if isinstance(unit, str) else tuple(unit) \
        if isinstance(unit, (tuple, list)) else None
    joint = tuple(u for u in UNITS if u != "layers")
    if units is None or not units or any(not isinstance(u, str) for u in units):
        raise ArgumentTypeError(f"unit must be a unit name or a sequence of them, got {unit!r}")
    for u in units:
        if u not in UNITS:
            raise ValueError(f"unknown unit {u!r}; accepted: {', '.join(map(repr, UNITS))}")
    if len(units) > 1 and (len(set(units)) < len(units) or not set(units) <= set(joint)):
        raise ValueError(f"unit={unit!r}: only {', '.join(map(repr, joint))} prune together, "
                         "each named once; remove layers in a call of their own")
    return units


def _layers_to_remove(amount: float, layers: int) -> int:
    """How many of ``layers`` blocks ``amount`` removes (rounded); ``ValueError`` for none
    (a silent no-op) or all of them."""
    if layers == 1:  # "amounts from 0.5 remove one", then "would remove all 1 layers"
        raise ValueError(f"unit 'layers': the model has one block, which no amount can remove "
                         f"(got amount={amount}); accepted: models of two blocks or more, or "
                         "unit='ffn' / 'heads'; the model was not changed")
    n = math.floor(amount * layers + 0.5)
    if n == 0:
        raise ValueError(f"amount={amount} of {layers} layers rounds to no layer removed; "
                         f"amounts from {0.5 / layers:.3g} remove one")
    if n >= layers:
        raise ValueError(f"amount={amount} would remove all {layers} layers; use a "
                         "smaller amount; the model was not changed")
    return n


def _remove_layers(blocks: nn.ModuleList, influence: list[float], amount: float,
                   owner: nn.Module | None) -> None:
    """Remove the ``amount`` of ``blocks`` with the lowest ``influence``; the config of
    ``owner`` (the transformers model holding them, or ``None``) follows the new layer
    count (see :func:`_fewer_layers`)."""
    n = _layers_to_remove(amount, len(blocks))
    bad = [i for i, v in enumerate(influence) if not math.isfinite(v)]
    if bad:  # NaN sorts anywhere: the layers removed would be arbitrary
        raise ValueError(
            f"calibration: the block influence of block(s) {bad} is not finite (their hidden "
            "states hold NaN or inf); check the model's weights and the calibration data for "
            "NaN/inf; the model was not changed"
        )
    drop = set(sorted(range(len(blocks)), key=lambda i: influence[i])[:n])
    config = None if owner is None else _fewer_layers(owner, blocks, drop)
    for i in sorted(drop, reverse=True):
        del blocks[i]
    for i, block in enumerate(blocks):  # key-value caches are indexed by layer
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = i
    if config is not None:
        for key, value in config.items():
            setattr(owner.config, key, value)


# config entries that list layer indices (Qwen2-MoE's and Qwen3-MoE's dense-MLP layers)
_LAYER_INDEX_LISTS = ("mlp_only_layers",)
# config entries that count leading layers (Qwen2's full-attention layers before its
# sliding-window ones): the kept blocks among them
_LEADING_LAYER_COUNTS = ("max_window_layers",)


def _fewer_layers(owner: nn.Module, blocks: nn.ModuleList, drop: set[int]) -> dict[str, Any]:
    """The config entries of ``owner`` without the blocks ``drop``: the layer count, every
    per-layer list (``layer_types``, SmolLM3's ``no_rope_layers``) without their entries,
    the lists of layer indices renumbered and counts of leading layers (Qwen2's
    ``max_window_layers``) recounted. ``ValueError`` (nothing changed yet) unless
    ``owner``'s class built from that config makes each kept block as it was built before:
    a block that depends on the layer count (ESMC's residual scaling) or on a per-layer
    rule the config states another way (DeepSeek-V3's ``first_k_dense_replace``) would
    reload as another block."""
    config = owner.config
    count = len(blocks)
    kept = [i for i in range(count) if i not in drop]
    change: dict[str, Any] = {"num_hidden_layers": len(kept)}
    for key, value in vars(config).items():  # named for layers: not a list of EOS ids
        if "layer" in key and isinstance(value, (list, tuple)) and len(value) == count:
            change[key] = type(value)(value[i] for i in kept)
    for key in _LAYER_INDEX_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, (list, tuple)) and all(isinstance(i, int) for i in value):
            change[key] = type(value)(kept.index(i) for i in value if i in kept)
    for key in _LEADING_LAYER_COUNTS:
        value = getattr(config, key, None)
        if type(value) is int:
            change[key] = sum(i < value for i in kept)
    prefix = next(n for n, m in owner.named_modules() if m is blocks)
    fresh = copy.deepcopy(config)
    for key, value in change.items():
        setattr(fresh, key, value)
    before = _built(owner).get_submodule(prefix)
    after = _built(owner, fresh).get_submodule(prefix)
    for j, i in enumerate(kept):
        old, new = _built_as(before[i]), _built_as(after[j])
        if old != new:
            what = sorted(k for k in {*old, *new} if old.get(k, ...) != new.get(k, ...))[:3]
            raise ValueError(
                f"unit 'layers': block {i} of {type(owner).__name__} would reload as another "
                f"block once {sorted(drop)} are removed ({', '.join(map(str, what))} differ in "
                "the model built from the updated config: the architecture makes its blocks "
                "from the layer count or a per-layer rule); the model was not changed")
    return change


def _built_as(block: nn.Module) -> dict[str, object]:
    """What a freshly built block is made of: its parameters' shapes and its modules'
    plain settings (``layer_idx`` aside, which follows the position)."""
    made: dict[str, object] = {n: tuple(p.shape) for n, p in block.named_parameters()}
    for name, m in block.named_modules():
        made[f"{name}:type"] = type(m).__name__
        for key, value in vars(m).items():
            if (not key.startswith("_") and key not in ("training", "layer_idx")
                    and isinstance(value, (bool, int, float, str, type(None)))):
                made[f"{name}.{key}"] = value
    return made


def _check_shapes(shapes: object, params: Mapping[str, nn.Parameter], param: str) -> None:
    """``ValueError`` (naming the argument ``param``) unless the recorded ``shapes``
    (config.json's :data:`SHAPES_KEY`) name parameters of the architecture (or a bias of one
    of its layers) with shapes no larger than the config builds, before any tensor is cut."""
    where = f"config.json's {SHAPES_KEY}"
    if not isinstance(shapes, Mapping):
        raise ValueError(f"{param}: {where} must map parameter names to shapes, got "
                         f"{type(shapes).__name__}")
    for name, shape in shapes.items():
        owner, _, attr = name.rpartition(".")
        full = params.get(name)
        if full is None and attr == "bias":
            full = params.get(f"{owner}.weight")
            full = None if full is None else full[:, 0] if full.dim() > 1 else full
        valid = isinstance(shape, list) and all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)
        if full is None or not valid or len(shape) != full.dim() \
                or any(n > m for n, m in zip(shape, full.shape)):
            known = "no such parameter" if full is None else f"at most {list(full.shape)}"
            raise ValueError(f"{param}: {where} records {name!r} as {shape!r}; expected a "
                             f"list of positive ints, {known}")


INDEX_NAME = "model.safetensors.index.json"
"""The index ``save_pretrained`` writes beside a model saved in shards."""


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of the directory ``path``: the shards its :data:`INDEX_NAME`
    lists, or without one every ``*.safetensors``. A shard the index lists but the
    directory lacks (a save cut short, a copy missing a file) is a ``ValueError`` naming
    it: its tensors were reported as "missing", as if the shapes did not fit."""
    index = path / INDEX_NAME
    if not index.is_file():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ValueError(f"path: {str(path)!r} holds no *.safetensors weights")
        return files
    try:
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        names = sorted(set(shards))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f"path: {str(index)!r} is no safetensors index (a JSON object "
                         f"whose 'weight_map' maps tensor names to files): {e!r}") from e
    if not names or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
        raise ValueError(f"path: {str(index)!r} names no shard files of this directory "
                         f"({names[:3]!r}); accepted: the index save_pretrained writes")
    if absent := [n for n in names if not os.path.lexists(path / n)]:
        raise ValueError(f"path: {str(index)!r} lists the shard {absent[0]!r} "
                         f"({len(absent)} of {len(names)} missing), which {str(path)!r} "
                         "lacks: a save cut short or an incomplete copy; save the model again")
    return [path / n for n in names]


def _check_saved_shapes(state: Mapping[str, torch.Tensor], built: Mapping[str, torch.Tensor],
                        path: str | os.PathLike) -> None:
    """``ValueError`` naming the first saved tensor whose shape differs from the model built
    from config.json (and its :data:`SHAPES_KEY`): an entry missing, changed or inconsistent
    with the others was a bare ``RuntimeError`` of ``load_state_dict``."""
    kinds = [(name, t.dtype, built[name].dtype) for name, t in state.items() if name in built
             and (t.is_floating_point(), t.dtype == torch.bool)
             != (built[name].is_floating_point(), built[name].dtype == torch.bool)]
    if kinds:  # load_state_dict cast them silently: ids 0/1 into weights, weights into ints
        name, saved, dtype = kinds[0]
        raise ValueError(f"path: the weights in {str(path)!r} do not fit the model: {name!r} "
                         f"is saved as {saved} but the model holds {dtype} ({len(kinds)} "
                         "tensor(s) of another kind: floating, integer, bool); accepted: "
                         "the weights save_pretrained wrote")
    wrong = [(name, list(t.shape), list(built[name].shape)) for name, t in state.items()
             if name in built and built[name].shape != t.shape]
    if wrong:
        name, saved, shape = wrong[0]
        raise ValueError(f"path: the weights in {str(path)!r} do not fit its config.json: "
                         f"{name!r} is saved as {saved} but the config (with its {SHAPES_KEY}) "
                         f"builds {shape} ({len(wrong)} tensor(s) differ); was config.json "
                         "edited after saving?")


def _check_saved_ties(state: Mapping[str, torch.Tensor], model: nn.Module,
                      path: str | os.PathLike) -> None:
    """``ValueError`` where the model built from config.json ties two parameters (one
    tensor under two names, e.g. ``tie_word_embeddings``) that are saved with different
    values: loading kept whichever came last, silently (a config edited after saving)."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        other = first.setdefault(id(param), name)
        if other != name and other in state and name in state and not torch.equal(
                state[other], state[name]):
            raise ValueError(f"path: config.json in {str(path)!r} ties {name!r} to {other!r}, "
                             "but the weights saved for them differ; was config.json edited "
                             "after saving (e.g. tie_word_embeddings)?")


def _sync_heads(model: nn.Module) -> None:
    """Attention modules that store their head counts (BERT's ``num_attention_heads``,
    StableLM's ``num_heads`` and ``num_key_value_heads``) take them from their shapes."""
    for m in model.modules():
        size = getattr(m, "attention_head_size", None)
        query = getattr(m, "query", None)
        if isinstance(size, int) and isinstance(query, nn.Linear) and \
                hasattr(m, "num_attention_heads"):
            m.num_attention_heads = query.out_features // size
            m.all_head_size = query.out_features
        size = getattr(m, "head_dim", None)
        if not isinstance(size, int) or size < 1:
            continue
        for attr, layer in (("num_heads", "q_proj"), ("num_key_value_heads", "k_proj")):
            proj = getattr(m, layer, None)
            if isinstance(getattr(m, attr, None), int) and isinstance(proj, nn.Linear):
                setattr(m, attr, proj.out_features // size)


def _update_config(owner: nn.Module, unit: str, removed: list[tuple[Group, torch.Tensor]]
                   ) -> None:
    """Set ``owner.config``'s widths to the widest block (exact when all blocks agree). A
    width the config class refuses (LLaMA wants heads that divide the hidden size even
    with an explicit ``head_dim``), or that the model built from it would take another
    head size from (StableLM derives it from ``hidden_size / num_attention_heads``), stays
    as it was; :func:`_record_shapes` covers it."""
    config = owner.config
    widest = max(g.channels - len(gone) for g, gone in removed)
    grouped = all(s.name.split(".")[-2] == "q_proj" for g, _ in removed for s in g.slices[:1])
    if unit == "ffn" and hasattr(config, "intermediate_size"):
        change = {"intermediate_size": widest}
    elif unit == "heads" and grouped and getattr(config, "num_key_value_heads", None):
        ratio = config.num_attention_heads // config.num_key_value_heads
        change = {"head_dim": getattr(config, "head_dim", None)
                  or config.hidden_size // config.num_attention_heads,
                  "num_key_value_heads": widest, "num_attention_heads": widest * ratio}
    else:
        return
    before = {k: getattr(config, k, None) for k in change}
    try:  # some config classes refuse a value as it is set (BERT's head count), not in validate
        for k, v in change.items():
            setattr(config, k, v)
        if hasattr(config, "validate"):
            config.validate()
        if unit == "heads" and not _same_head_sizes(owner):
            raise ValueError("the model built from this config has other head sizes")
    except Exception:  # the config class refuses these widths: record shapes instead
        for k, v in before.items():
            setattr(config, k, v)


def _same_head_sizes(owner: nn.Module) -> bool:
    """Whether ``owner``'s class built from its config has the head size of every
    attention module of ``owner``."""
    built = dict(_built(owner).named_modules())
    return all(getattr(built.get(name), "head_dim", None) == m.head_dim
               for name, m in owner.named_modules()
               if isinstance(getattr(m, "head_dim", None), int))


def _config_owner(model: nn.Module, blocks: nn.ModuleList) -> nn.Module | None:
    """The transformers model whose config describes ``blocks``: ``model`` itself or, in a
    wrapper (any module holding one), the outermost ``PreTrainedModel`` that holds them —
    the one whose ``save_pretrained`` writes them. ``None`` without one (no config describes
    the blocks). A wrapper's own ``.config`` is not rebuilt from: its class need not be
    ``cls(config)`` (rebuilding it failed after the weights were cut), and its
    ``save_pretrained``, if any, is not the one that writes the inner model's config."""
    transformers = sys.modules.get("transformers")  # not imported: no model of its exists
    if transformers is None:
        return None
    owner = next((m for m in model.modules() if isinstance(m, transformers.PreTrainedModel)
                  and any(b is blocks for b in m.modules())), None)
    if owner is not None:
        try:  # _record_shapes rebuilds it last, after the cut: a failure there left it cut
            _skeleton(owner)
        except Exception as e:
            raise ValueError(
                f"model: {type(owner).__name__} (holding the blocks) cannot be built from its "
                f"config ({type(e).__name__}: {e}), which recording the pruned shapes "
                "needs; accepted: transformers models built as cls(config); the model was "
                "not changed") from e
    return owner


def _built(model: nn.Module, config: Any = None) -> nn.Module:
    """``model``'s class built from ``config`` (default: its own), on the meta device."""
    with torch.device("meta"):
        return type(model)(model.config if config is None else config)


def _skeleton(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters of ``model``'s class built from its config, on the meta device."""
    return dict(_built(model).named_parameters())


def _record_shapes(model: nn.Module) -> None:
    """Record, under ``config.sparsekit_shapes``, every parameter whose shape the model
    built from its config would not have (nothing when the config describes it)."""
    config = model.config
    if hasattr(config, SHAPES_KEY):
        delattr(config, SHAPES_KEY)
    fresh = _skeleton(model)
    shapes = {n: list(p.shape) for n, p in model.named_parameters()
              if n not in fresh or fresh[n].shape != p.shape}  # not in it: a FLAP bias
    if shapes:
        setattr(config, SHAPES_KEY, shapes)


def resize_to_recorded(model: nn.Module, shapes: Mapping[str, list[int]],
                       param: str = "path") -> None:
    """Cut each named parameter of ``model`` (built from a config recording ``shapes``,
    its :data:`SHAPES_KEY`) to its recorded shape (the trailing entries go); a bias the
    architecture lacks (FLAP's compensation added it) is created. Shapes that do not fit
    are a ``ValueError`` naming ``param`` (the argument that led to the config), raised
    before any tensor is cut. :func:`load_pretrained` and
    :func:`sparsekit.from_pretrained` both rebuild pruned models with it."""
    cuts: dict[tuple[str, int], set[int]] = {}
    params = dict(model.named_parameters())
    _check_shapes(shapes, params, param)
    for name, shape in shapes.items():
        owner, _, attr = name.rpartition(".")
        if name not in params and attr == "bias":
            layer = model.get_submodule(owner)
            layer.bias = nn.Parameter(torch.zeros(shape, dtype=layer.weight.dtype))
            continue
        current = model.get_parameter(name).shape
        for dim, (now, want) in enumerate(zip(current, shape)):
            if want < now:
                cuts[(name, dim)] = set(range(want, now))
    cut(model, cuts)
    _sync_heads(model)
