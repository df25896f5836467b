"""Masked-delta fine-tuning: only a chosen sparse set of entries trains.

Fine-tuning moves few weights far (PST, SPP, S²FT, "RL fine-tunes small subnetworks"):
choose them first and train only them. :func:`masked_delta` is three stages that exist
already, composed:

1. *which entries* — :func:`~sparsekit.prune.compute_masks` at ``sparsity = 1 - density``
   ranks the targets' entries by a criterion: ``"gradient"`` (the magnitude of the loss
   gradient accumulated over a few calibration batches: the entries the task pulls on
   hardest), ``"magnitude"`` (the largest weights) or any other of
   :data:`~sparsekit.CRITERIA`, split over layers by an allocation. Entries that are zero
   are never chosen, so a pruned base keeps every zero;
2. *the update* — each target weight becomes ``W = W₀ + Δ`` (a
   ``torch.nn.utils.parametrize`` parametrization): ``W₀`` is frozen, ``Δ`` starts at zero
   and is the only trainable tensor of the model;
3. *the mask* — a :class:`~sparsekit.MaskSet` on the ``Δ``\\s keeps every unchosen entry
   of ``Δ`` at exactly zero through any ``torch.optim`` optimizer (gradients masked
   before the step, optimizer state and weights after it), so weight decay or a
   coordinate-mixing optimizer cannot move a frozen weight.

The trained update is a :class:`Delta`: sparse, saved compressed (values and positions)
by :meth:`Delta.save`, and added onto a copy of the base by :meth:`Delta.apply`.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsekit import checkpoint
from sparsekit._checks import (
    ArgumentTypeError,
    check_finite,
    check_fraction,
    check_materialized,
    check_module,
    check_parameter_names,
    check_writable,
)
from sparsekit.distributed import is_sharded
from sparsekit.masks import MaskSet, check_mask
from sparsekit.prune import compute_masks
from sparsekit.targets import TargetSpec, resolve_targets

__all__ = ["Delta", "DeltaTraining", "masked_delta"]

KIND = "sparse-delta"
"""The ``kind`` entry of a saved delta's header."""


@dataclass(frozen=True)
class Delta:
    """A sparse update of some weights: ``values[name]`` is zero wherever ``masks[name]``
    is ``False``; names are the weights' parameter names in the base model.

    Both are checked here, so that :meth:`apply` changes exactly the entries the masks
    keep and by finite amounts (:meth:`save` would refuse anything else, too late), and
    so that every name is one a model's parameter can have (:meth:`save` failed on
    ``""``, ``"a..b"`` or both ``"a"`` and ``"a.b"`` with a ``KeyError`` or an
    ``AttributeError``).
    """

    values: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        for arg, given in (("values", self.values), ("masks", self.masks)):
            if not isinstance(given, Mapping):
                raise ArgumentTypeError(
                    f"{arg} must be a dict of parameter name -> tensor, got {type(given).__name__}"
                )
        if set(self.values) != set(self.masks):
            raise ValueError("values and masks must name the same tensors")
        _check_names(self.values)
        for n, v in self.values.items():
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                got = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
                raise ArgumentTypeError(
                    f"values[{n!r}] must be a floating-point tensor, got {got}"
                )
            if v.layout != torch.strided:  # its checks below failed inside PyTorch
                raise ArgumentTypeError(f"values[{n!r}] must be a dense (strided) tensor, got "
                                        f"layout {v.layout}; convert with `.to_dense()`")
            check_mask(f"masks[{n!r}]", self.masks[n], v.shape)
            check_materialized(f"values[{n!r}]", v)  # its checks below read values
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"values[{n!r}] holds NaN or infinite entries")
            outside = int(torch.count_nonzero(v[~self.masks[n]]))
            if outside:
                raise ValueError(
                    f"values[{n!r}] is nonzero at {outside} entries where masks[{n!r}] is "
                    "False; a delta changes only the entries its mask keeps"
                )

    @property
    def nnz(self) -> int:
        """Entries the update may change (its trainable parameters)."""
        return sum(int(m.sum()) for m in self.masks.values())

    @property
    def density(self) -> float:
        """Fraction of the updated tensors' entries that the update may change."""
        total = sum(m.numel() for m in self.masks.values())
        return self.nnz / total if total else 0.0

    @torch.no_grad()
    def apply(self, model: nn.Module, *, alpha: float = 1.0) -> nn.Module:
        """Add ``alpha`` × the update onto ``model``'s weights in place; return ``model``.

        ``alpha`` is a finite real number (a NumPy scalar or a 0-d tensor too). Every name,
        shape and dtype is checked before any weight changes (a weight on the meta device,
        without values, is refused by name, and so is one made under
        ``torch.inference_mode`` while it is off), and so is every updated weight: one
        that ``alpha`` would make overflow its dtype (``alpha=1e39`` on a float32 weight)
        is refused with the model untouched.
        """
        check_module("model", model)
        if is_sharded(model):  # a raw "mixed torch.Tensor and DTensor" RuntimeError
            raise ValueError("model is sharded (its parameters are DTensor shards, from "
                             "fully_shard or tensor parallelism); accepted: a model whose "
                             "parameters are whole: apply the delta before sharding it")
        alpha = _check_alpha(alpha)
        params = dict(model.named_parameters())
        missing = [n for n in self.values if n not in params]
        if missing:
            # a weight that trains a delta is W₀ + Δ under other names: say so, not that
            # the model has another architecture
            _check_untrained(model, "applying a delta onto it")
            more = "…" if len(missing) > 3 else ""
            raise ValueError(f"model has no parameters {missing[:3]}{more} that this delta "
                             "updates (another architecture?)")
        for n, v in self.values.items():
            if params[n].shape != v.shape or not params[n].is_floating_point():
                raise ValueError(f"delta for {n!r} is {tuple(v.shape)}, the model's parameter is "
                                 f"{tuple(params[n].shape)} {params[n].dtype}")
            check_materialized(f"model: parameter {n!r}", params[n])  # its overflow check reads it
            check_writable(f"model: parameter {n!r}", params[n])  # add_ is in place
        for n, v in self.values.items():
            _check_update(n, params[n], v, alpha)
        for n, v in self.values.items():
            params[n].add_(v.to(params[n].device, params[n].dtype), alpha=alpha)
        return model

    def save(self, path: str | os.PathLike) -> Path:
        """Write the update compressed (kept values and positions) with
        :func:`sparsekit.save`; return the path."""
        # +0.0 outside the mask: a -0.0 there (``values * mask``) passed the check above
        # but a checkpoint refused it, with advice (masks.apply()) a Delta cannot take
        holder = checkpoint.tensor_holder(
            {n: v.masked_fill(~self.masks[n], 0) for n, v in self.values.items()})
        masks = MaskSet(holder, self.masks, pattern="unstructured")
        return checkpoint.save(holder, path, masks, metadata={"kind": KIND})

    @classmethod
    def load(cls, path: str | os.PathLike) -> Delta:
        """Read an update written by :meth:`save` (checked as :func:`sparsekit.load` does)."""
        meta = checkpoint.read_metadata(path)
        if meta.get("kind") != KIND:
            raise ValueError(f"{path} is not a sparse delta written by Delta.save "
                             f"(its header kind is {meta.get('kind')!r})")
        ckpt = checkpoint.read(path)
        # every tensor of a saved delta is stored by its mask; one stored dense (a plain
        # safetensors file, or a header edited and sealed again) was a raw KeyError
        dense = sorted(n for n in ckpt.state if n not in ckpt.kept)
        if dense:
            raise ValueError(f"{path} is not a sparse delta written by Delta.save: the "
                             f"tensors {dense[:3]}{'…' if len(dense) > 3 else ''} are stored "
                             "without positions (a delta stores each update as values and "
                             "a mask)")
        return cls(dict(ckpt.state), {n: ckpt.kept[n] for n in ckpt.state})


class _AddDelta(nn.Module):
    """The parametrization ``W = W₀ + Δ`` with a trainable ``Δ`` starting at zero."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(like))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + self.delta


class DeltaTraining:
    """A model whose chosen weights train as ``W₀ + Δ`` with a sparse ``Δ``.

    Build it with :func:`masked_delta`. Give the optimizer :meth:`parameters` (or all of
    ``model.parameters()``: nothing else takes a gradient) and :meth:`attach` it; after
    training, :meth:`delta` is the update and :meth:`merge` bakes it into the weights.
    """

    def __init__(self, model: nn.Module, support: Mapping[str, torch.Tensor]) -> None:
        targets = _check_support(model, support)
        self.model = model
        self._names = list(support)
        self._grad_flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():  # only the deltas train
            p.requires_grad_(False)
        self._sites: dict[str, tuple[nn.Module, str]] = {}
        self._order: dict[nn.Module, list[str]] = {}  # parameter order to give back
        delta_masks = {}
        for name in self._names:
            module_name, attr = targets[name]
            module = model.get_submodule(module_name)
            self._order.setdefault(module, list(module._parameters))
            parametrize.register_parametrization(module, attr, _AddDelta(getattr(module, attr)))
            self._sites[name] = (module, attr)
            prefix = f"{module_name}." if module_name else ""
            delta_masks[f"{prefix}parametrizations.{attr}.0.delta"] = support[name]
        self.masks = MaskSet(model, delta_masks, pattern="unstructured").apply()
        self._delta_names = dict(zip(self._names, delta_masks))

    @property
    def trainable(self) -> int:
        """Entries that train: the size of the sparse update."""
        return sum(int(m.sum()) for m in self.masks.masks.values())

    def parameters(self) -> Iterator[nn.Parameter]:
        """The ``Δ`` tensors, for the optimizer (none are left after :meth:`merge`, which
        is refused: an optimizer of nothing trained nothing)."""
        self._check_not_merged("parameters")
        return iter([module.parametrizations[attr][0].delta
                     for module, attr in self._sites.values()])

    def attach(self, optimizer: torch.optim.Optimizer) -> DeltaTraining:
        """Keep every unchosen entry of ``Δ`` at zero through ``optimizer``'s steps."""
        self._check_not_merged("attach")
        self.masks.attach(optimizer)
        return self

    def _check_not_merged(self, action: str) -> None:
        """Raise if :meth:`merge` removed the ``Δ``\\s: after it, the masks' error blamed
        weights "replaced or deleted since the masks were made"."""
        if not self._sites:
            raise RuntimeError(f"DeltaTraining.{action}(): merge() wrote the update into the "
                               "weights and removed the deltas already; call masked_delta() "
                               "on the merged model to train another update")

    def delta(self) -> Delta:
        """A copy of the update trained so far, by the weights' names: zero outside the
        support, also where ``Δ`` was written to directly rather than by the optimizer."""
        params, masks = self.masks.params, self.masks.masks
        return Delta(
            {n: params[d].detach().masked_fill(~masks[d], 0) for n, d in self._delta_names.items()},
            {n: masks[d].clone() for n, d in self._delta_names.items()},
        )

    def merge(self) -> nn.Module:
        """Write ``W₀ + Δ`` into each weight (the same ``Parameter`` objects as before, so
        masks of the base still hold, in the same order), remove the parametrizations, give
        every parameter back its ``requires_grad`` and return the model; a ``Δ`` holding NaN
        or inf is refused before anything merges. Merging again returns the model as it is
        (it used to set those flags back once more, undoing any change made to them since)."""
        if not self._sites:
            return self.model
        for name, (module, attr) in self._sites.items():  # all checked before any merges
            check_finite(f"the delta of {name!r}", module.parametrizations[attr][0].delta,
                         hint="a diverged training? merging would write it into the weight; "
                         "nothing was merged")
        self.masks.detach()
        for module, attr in self._sites.values():
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        for module, order in self._order.items():
            module._parameters = {k: module._parameters[k] for k in order}
        for p, flag in self._grad_flags.items():
            p.requires_grad_(flag)
        self._sites.clear()
        self._order.clear()
        return self.model


def _check_alpha(alpha: Any) -> float:
    """``alpha`` as a float, after checking it is a finite real number: a bool or a string
    is an :class:`ArgumentTypeError`, NaN or infinity a ``ValueError``. A NumPy scalar and
    a 0-d tensor are numbers too."""
    value = alpha.item() if isinstance(alpha, torch.Tensor) and alpha.dim() == 0 else alpha
    accepted = "a finite real number (a float, an int, a NumPy scalar or a 0-d tensor)"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ArgumentTypeError(f"alpha must be {accepted}, got {alpha!r}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond every float
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"alpha must be {accepted}, got {alpha!r}")
    return value


def _check_update(name: str, param: torch.Tensor, value: torch.Tensor, alpha: float) -> None:
    """Raise unless ``param + alpha · value`` is finite in ``param``'s dtype wherever
    ``param`` is: ``alpha`` beyond the dtype's largest number failed in ``add_`` (after the
    earlier weights had changed), a product beyond it made weights infinite."""
    largest = torch.finfo(param.dtype).max
    if abs(alpha) > largest:
        raise ValueError(f"alpha={alpha!r} is beyond the largest {param.dtype} number "
                         f"({largest:.3g}), the dtype of {name!r}; pass a smaller alpha")
    updated = torch.add(param, value.to(param.device, param.dtype), alpha=alpha)
    overflow = int((param.isfinite() & ~updated.isfinite()).sum())
    if overflow:
        raise ValueError(f"alpha={alpha!r} times the delta makes {overflow} entries of "
                         f"{name!r} overflow {param.dtype} (largest {largest:.3g}); pass a "
                         "smaller alpha")


_RESERVED = frozenset(dir(nn.Module()))
"""Attribute names of every module, which no submodule or parameter can take."""


def _check_names(values: Mapping[str, torch.Tensor]) -> None:
    """Raise unless every name is a parameter name a model can have: dotted parts, none
    empty nor an attribute every module has (``forward``), and no name the module of
    another (``"a"`` and ``"a.b"``)."""
    for n in values:
        if not isinstance(n, str):
            raise ArgumentTypeError(f"values must be keyed by parameter names (str), got {n!r}")
        parts = n.split(".")
        if not all(parts) or _RESERVED.intersection(parts):
            raise ValueError(
                f"values[{n!r}]: a parameter name is dot-separated module and parameter "
                "names ('0.weight', 'fc1.bias'), none empty nor an attribute of nn.Module"
            )
    modules = {n.rsplit(".", 1)[0] for n in values if "." in n}
    modules = {prefix for m in modules for prefix in _prefixes(m)}
    clash = sorted(set(values) & modules)
    if clash:
        inside = next(n for n in values if n.startswith(f"{clash[0]}."))
        raise ValueError(f"values names both {clash[0]!r} and {inside!r}: a parameter "
                         "cannot also be the module of another")


def _prefixes(module_name: str) -> list[str]:
    """``"a.b.c"`` → ``["a", "a.b", "a.b.c"]``: the module and every module above it."""
    parts = module_name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def masked_delta(
    model: nn.Module,
    density: float,
    *,
    method: str = "gradient",
    allocation: str = "uniform",
    targets: TargetSpec | Sequence[TargetSpec] | None = None,
    exclude: Iterable[str] = (),
    data: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    seed: int = 0,
) -> DeltaTraining:
    """Choose ``density`` of the targets' entries and make them the only ones that train.

    ``density`` in (0, 1] is the fraction of the targeted weights' entries that train
    (LoRA of rank ``r`` on an ``(out, in)`` layer trains ``r·(in + out)`` of ``in·out``).
    ``method`` names the criterion that chooses them (default ``"gradient"``: needs
    ``data`` as ``(inputs, labels)`` batches and ``loss_fn(outputs, labels)``, cross-entropy
    by default), ``allocation`` how the count is split over layers (``"uniform"``: the same
    density in each, ``"global"``: one ranking); ``targets``/``exclude`` as in
    :func:`sparsekit.prune`. Zero entries (a pruned base) are never chosen, so a layer
    has at most its nonzeros trainable. All arguments are checked before the model changes.
    """
    check_fraction("density", density, zero=False, one=True)
    _check_untrained(model, "choosing another")
    support, _ = compute_masks(model, 1.0 - float(density), method=method, pattern="unstructured",
                               allocation=allocation, targets=targets, exclude=exclude,
                               data=data, loss_fn=loss_fn, seed=seed)
    if not any(bool(m.any()) for m in support.values()):  # a fine-tune that changes nothing
        total = sum(m.numel() for m in support.values())
        raise ValueError(f"density={density!r} of {total} targeted entries rounds to none "
                         f"that train; accepted: at least {1 / total:.3g}")
    return DeltaTraining(model, support)


def _check_untrained(model: nn.Module, before: str) -> None:
    """Raise unless ``model`` is a module that trains no delta yet: on one that does, the
    weights are parametrized and no target was left to choose (a ``ValueError`` that
    blamed ``targets``), nor a weight to apply a delta onto by its name (one that blamed
    "another architecture"); ``before`` names what must wait for ``merge()``."""
    check_module("model", model)
    trained = [f"{module_name}.{attr}" if module_name else attr
               for module_name, module in model.named_modules()
               if parametrize.is_parametrized(module)
               for attr, chain in module.parametrizations.items()
               if any(isinstance(p, _AddDelta) for p in chain)]
    if trained:
        more = ", …" if len(trained) > 3 else ""
        raise ValueError(f"model trains a delta on {', '.join(trained[:3])}{more} already (a "
                         f"DeltaTraining not merged); merge() it before {before}")


def _check_support(model: nn.Module, support: Mapping[str, torch.Tensor]
                   ) -> dict[str, tuple[str, str]]:
    """``{name: (module name, attribute)}`` of each weight to train, after checking the
    weights can take a delta: present by their exact parameter names (no globs or module
    names), floating, not shared, with a bool mask of their shape."""
    check_module("model", model)
    if not isinstance(support, Mapping):
        raise ArgumentTypeError(
            f"support must be a dict of parameter name -> bool tensor, got {type(support).__name__}"
        )
    for name in support:
        module_name, _, attr = name.rpartition(".")
        module = dict(model.named_modules()).get(module_name)
        if module is not None and parametrize.is_parametrized(module, attr):
            raise ValueError(f"{name!r} is parametrized already (a DeltaTraining not merged?)")
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    known = set(names)
    check_parameter_names("support names", support, known,
                          f"it takes exact parameter names (no globs or module names), such "
                          f"as {', '.join(map(repr, names[:3]))}")
    chosen = {t.name: t for t in resolve_targets(model, list(support))} if support else {}
    if not chosen:
        raise ValueError("support: no weights to train")
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    sites = {}
    for name, mask in support.items():
        t = chosen[name]
        check_mask(f"support[{name!r}]", mask, t.param.shape)
        if uses[id(t.param)] > 1:
            raise ValueError(f"{name!r} is shared with another module (tied weights); a delta "
                             "on one of its owners would not reach the others: exclude it")
        if t.param.is_inference() and not torch.is_inference_mode_enabled():
            # the parametrization's set_ raised a raw RuntimeError, with every parameter's
            # requires_grad turned off
            raise ValueError(f"model: parameter {name!r} is an inference tensor (made under "
                             "torch.inference_mode), which cannot take a delta; accepted: "
                             "parameters made outside inference mode (build or load the model "
                             "without it)")
        sites[name] = (t.module_name, name.rpartition(".")[2])
    return sites
