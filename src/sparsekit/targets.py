"""Which parameters are sparsified.

A target is one weight tensor of one module. The default is every ``weight`` of
``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.Conv1d/2d/3d`` that no other kind of module
shares (a tied embedding is never pruned by default); users narrow or widen that with
module types, module/parameter names and glob patterns, and remove entries with
``exclude``.

GPT-2's ``transformers.pytorch_utils.Conv1D`` is a linear layer that stores its weight
as ``(in, out)``. A target of one is :attr:`Target.transposed`: patterns see its weight
through :meth:`Target.out_in`, so N:M groups, blocks and rows run along the inputs of
each output exactly as for ``nn.Linear``.
"""

from __future__ import annotations

import fnmatch
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsekit._checks import ArgumentTypeError, check_module, check_not_compiled, is_float8

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The default target types that need no optional package (:func:`default_types` adds
GPT-2's ``Conv1D``)."""

TargetSpec = type[nn.Module] | str
"""One entry of ``targets``: a module type, a module or parameter name, or a glob."""


@dataclass(frozen=True)
class Target:
    """One parameter to sparsify, with the module that owns it."""

    name: str  # parameter name as in ``model.named_parameters()``, e.g. ``"fc1.weight"``
    module_name: str
    module: nn.Module
    param: nn.Parameter
    # where ``module``'s weight is parametrized (``torch.nn.utils.parametrize``): the name
    # it is read by (``"fc1.weight"``); ``param`` is then the one tensor it is computed from
    # (``"fc1.parametrizations.weight.original"``), the one an optimizer updates
    alias: str | None = None

    @property
    def transposed(self) -> bool:
        """Whether the parameter is a weight stored ``(in, out)`` (GPT-2's ``Conv1D``)."""
        return stores_transposed(self.module) and (
            self.alias is not None or self.param is self.module.weight)

    def out_in(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (laid out like the parameter) seen as ``(out, in)``; its own inverse."""
        return t.t() if self.transposed else t


def conv1d_type() -> type[nn.Module] | None:
    """GPT-2's ``Conv1D`` class once ``transformers`` is imported, else ``None``.

    Never imports ``transformers``: a model holding a ``Conv1D`` has imported it already.
    """
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def linear_types() -> tuple[type[nn.Module], ...]:
    """``nn.Linear``, plus GPT-2's ``Conv1D`` (a linear layer storing its weight as
    ``(in, out)``) once ``transformers`` is imported."""
    conv1d = conv1d_type()
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def default_types() -> tuple[type[nn.Module], ...]:
    """The module types whose ``weight`` is a target by default."""
    return (*linear_types(), nn.Conv1d, nn.Conv2d, nn.Conv3d)


def stores_transposed(module: nn.Module) -> bool:
    """Whether ``module`` is GPT-2's ``Conv1D``, whose weight is stored ``(in, out)``."""
    conv1d = conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def resolve_targets(
    model: nn.Module,
    targets: TargetSpec | Sequence[TargetSpec] | None = None,
    exclude: Iterable[str] = (),
) -> list[Target]:
    """Return the targeted parameters of ``model`` in definition order.

    Strings match module names (meaning that module's ``weight``), exactly or as
    ``fnmatch`` globs, or parameter names (``"fc.bias"``, ``"blocks.*.bias"``). Every
    ``targets`` string and every ``exclude`` entry must match something, so typos surface
    as errors instead of silently dense layers.
    """
    check_module("model", model)
    specs = _as_list(targets, "targets")
    excludes = _as_list(exclude, "exclude") or []
    for e in excludes:
        if not isinstance(e, str):
            raise ArgumentTypeError(f"exclude entries must be names or globs (str), got {e!r}")

    candidates = _weights(model)  # module-owned weights, the default universe
    split = _split_parametrized(model)  # weights computed from several stored tensors
    chosen: dict[str, Target] = {}
    skipped: dict[str, list[str]] = {}
    if specs is None:
        types = default_types()
        chosen = {t.name: t for t in _default(candidates, types)}
        skipped = {n: paths for n, (m, paths) in split.items() if isinstance(m, types)}
    else:
        for spec in specs:
            matched = _match(spec, candidates)
            hit = _match_split(spec, split)
            if hit and isinstance(spec, str) and not _is_glob(spec):
                layer = next(iter(hit))
                raise ValueError(
                    f"targets entry {spec!r}: the weight of layer {layer!r} is parametrized "
                    f"and computed from several stored tensors ({', '.join(hit[layer])}), "
                    "none of which a mask of the weight can keep; target one of them by "
                    "that name, or remove the parametrization first"
                )
            skipped.update(hit)
            if not matched and not hit:
                raise ValueError(
                    f"targets entry {_show(spec)} matches no module or parameter of the model"
                )
            for t in matched:
                chosen.setdefault(t.name, t)
    if specs is None and (pruned := _torch_pruned(model, default_types())):
        warnings.warn(
            f"targets: layers {pruned} were pruned with torch.nn.utils.prune (weight_orig "
            "and weight_mask, the weight recomputed before each forward) and stay as they "
            "are; call torch.nn.utils.prune.remove(layer, 'weight') on them first to prune "
            "them here",
            UserWarning, stacklevel=2,
        )
    if skipped:
        warnings.warn(
            "targets: the weights of layers "
            + "; ".join(f"{n!r} (stored as {', '.join(p)})" for n, p in skipped.items())
            + " are parametrized over several stored tensors and stay dense; target one of "
            "those tensors by name to sparsify it",
            UserWarning, stacklevel=2,
        )

    # every entry is matched against the same targets, so entries that overlap ("fc*" and
    # "fc1", or one given twice) do not fail for what an earlier one removed
    # a tied parameter is excluded by any path it has (the module it was chosen through
    # may be another than the one named: excluding "a" of a tied a/b failed)
    paths: dict[str, list[str]] = {}
    for key, t in candidates.items():
        paths.setdefault(t.name, []).extend([t.module_name, key, *([t.alias] if t.alias else [])])
    removed = set()
    for pattern in excludes:
        hits = [n for n in chosen if _name_match(pattern, n, *paths.get(n, ()))]
        if not hits:
            raise ValueError(
                f"exclude entry {pattern!r} matches none of the targeted parameters: "
                f"{', '.join(chosen) or '(none)'}"
            )
        removed.update(hits)
    chosen = {n: t for n, t in chosen.items() if n not in removed}

    if not chosen and specs is None and not excludes:
        check_not_compiled("model", model, "pruning")
        raise ValueError(
            "targets: the model has no default targets (weights of nn.Linear, nn.Conv1d/2d/3d "
            "or GPT-2's Conv1D that no other kind of module shares); name the parameters to "
            "sparsify with targets="
        )
    if not chosen:
        raise ValueError("targets: no parameters left to sparsify (check targets and exclude)")
    for t in chosen.values():
        # float8 (one byte) is floating point, but PyTorch masks none in place: pruning one
        # zeroed the layers before it, then failed ("masked_fill" not implemented)
        if not torch.is_floating_point(t.param) or is_float8(t.param.dtype):
            raise ArgumentTypeError(
                f"target {t.name!r} has dtype {t.param.dtype}; only floating-point weights "
                "of 16 bits or more (float16, bfloat16, float32, float64) can be sparsified"
            )
    order = {n: i for i, n in enumerate(candidates)}
    return sorted(chosen.values(), key=lambda t: order[t.name])


def default_targets(model: nn.Module) -> list[Target]:
    """The parameters :func:`resolve_targets` picks without ``targets`` and ``exclude``, in
    definition order, but none of its checks: a model without such layers (only
    ``LayerNorm``, ``Embedding`` …) has none, where ``resolve_targets`` raises."""
    return _default(_weights(model), default_types())


def _default(candidates: dict[str, Target], types: tuple[type[nn.Module], ...]
             ) -> list[Target]:
    """The weights of modules of ``types`` among ``candidates`` that no other kind of module
    shares (a tied embedding)."""
    tied_elsewhere = _held_by_other_types(candidates, types)
    return [t for t in candidates.values() if isinstance(t.module, types) and _is_weight(t)
            and id(t.param) not in tied_elsewhere]


def batchnorm_scales(model: nn.Module) -> list[Target]:
    """The scales (γ, the affine ``weight``) of every BatchNorm of ``model``, in definition
    order. They are not targets — nothing masks them — but a channel pattern's group holds
    one of each per channel, and criteria that read only a weight's value (``magnitude``)
    score them with the targets: Torch-Pruning's group magnitude counts a BatchNorm's γ as
    one more member of the group (see :attr:`sparsekit.scores.ScoreContext.scales`)."""
    return [t for t in _weights(model).values()
            if isinstance(t.module, nn.modules.batchnorm._BatchNorm) and t.param is t.module.weight]


def _as_list(value, param: str) -> list | None:
    if value is None:
        return None
    if isinstance(value, (str, type)):
        return [value]
    if isinstance(value, Iterable):
        return list(value)
    raise ArgumentTypeError(
        f"{param} must be a module type, a name/glob or a sequence of them, got {value!r}"
    )


def _weights(model: nn.Module) -> dict[str, Target]:
    """Every module's directly owned parameters, keyed by full parameter name.

    A tied parameter appears under each owner, but its target always carries the name
    ``named_parameters()`` gives it (the first owner's), so masks stay addressable.

    A weight parametrized over one stored tensor of its shape (``register_parametrization``
    with an elementwise function, ``spectral_norm``) is that tensor, owned by the module
    whose weight it is (:attr:`Target.alias` holds the weight's own name).
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, Target] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{module_name}." if module_name else ""
        original = _single_original(module)
        if original is not None:
            full = f"{prefix}parametrizations.weight.original"
            out.setdefault(full, Target(canonical.get(id(original), full), module_name, module,
                                        original, alias=f"{prefix}weight"))
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            out.setdefault(full, Target(canonical.get(id(p), full), module_name, module, p))
    return out


def _stored(module: nn.Module) -> list[tuple[str, torch.Tensor]] | None:
    """The tensors ``module``'s parametrized ``weight`` is computed from, by their names
    under ``parametrizations.weight`` (``original``; ``original0``, ``original1`` …), or
    ``None`` where the weight is not parametrized."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    chain = module.parametrizations["weight"]
    return [(n, p) for n, p in chain.named_parameters(recurse=False)
            if n == "original" or n.startswith("original")]


def _single_original(module: nn.Module) -> torch.Tensor | None:
    """The one stored tensor ``module``'s parametrized weight is computed from, where it
    has the weight's shape (a mask of the weight can keep it), else ``None``."""
    stored = _stored(module)
    if not stored or len(stored) != 1 or stored[0][0] != "original":
        return None
    with torch.no_grad():
        shape = module.weight.shape
    return stored[0][1] if stored[0][1].shape == shape else None


def _torch_pruned(model: nn.Module, types: tuple[type[nn.Module], ...]) -> list[str]:
    """The layers of ``types`` whose weight ``torch.nn.utils.prune`` reparametrized: a
    ``weight_orig`` parameter and a ``weight_mask`` buffer in place of ``weight``, which
    a forward pre-hook recomputes (no default target stands for it)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, types) and "weight_orig" in module._parameters
            and "weight_mask" in module._buffers]


def _split_parametrized(model: nn.Module) -> dict[str, tuple[nn.Module, list[str]]]:
    """``{layer name: (layer, paths of its stored tensors)}`` of the modules whose
    parametrized weight is no one stored tensor of its shape (``weight_norm``'s
    ``original0``/``original1``): no target stands for their weight."""
    out = {}
    for module_name, module in model.named_modules():
        stored = _stored(module)
        if stored is not None and _single_original(module) is None:
            prefix = f"{module_name}." if module_name else ""
            out[module_name] = (module, [f"{prefix}parametrizations.weight.{n}"
                                         for n, _ in stored])
    return out


def _match_split(spec: TargetSpec, split: dict[str, tuple[nn.Module, list[str]]]
                 ) -> dict[str, list[str]]:
    """The layers of ``split`` whose weight ``spec`` selects (by type, module name or the
    weight's name), with their stored tensors' paths."""
    if isinstance(spec, type):
        return {n: p for n, (m, p) in split.items() if isinstance(m, spec)}
    if not isinstance(spec, str):
        return {}
    return {n: p for n, (_, p) in split.items()
            if _name_match(spec, n, f"{n}.weight" if n else "weight")}


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _held_by_other_types(
    candidates: dict[str, Target], types: tuple[type[nn.Module], ...]
) -> set[int]:
    """Ids of parameters that a module outside the default ``types`` also holds.

    Weight tying (GPT-2's ``lm_head`` shares the token embedding) must never let the
    default targets prune an embedding through the ``nn.Linear`` that borrows it; a user
    who wants that names the module explicitly.
    """
    return {id(t.param) for t in candidates.values() if not isinstance(t.module, types)}


def _match(spec: TargetSpec, candidates: dict[str, Target]) -> list[Target]:
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return [t for t in candidates.values() if isinstance(t.module, spec) and _is_weight(t)]
    if not isinstance(spec, str):
        raise ArgumentTypeError(
            f"targets entries must be nn.Module subclasses or names/globs (str), got {spec!r}"
        )
    # A glob selects modules (their weight); a parameter is selected by its own name, or
    # by a glob whose last component names the parameter literally ("blocks.*.bias").
    # A tied parameter is also selected by the path through another owner ("b.weight" of
    # a tied a/b, where named_parameters() names it "a.weight").
    by_param = not _is_glob(spec.rsplit(".", 1)[-1])
    return [
        t for key, t in candidates.items()
        if (by_param and _name_match(spec, t.name, key, *([t.alias] if t.alias else [])))
        or (_is_weight(t) and _name_match(spec, t.module_name))
    ]


def _is_weight(t: Target) -> bool:
    return t.alias is not None or t.name.rsplit(".", 1)[-1] == "weight"


def _name_match(pattern: str, *names: str) -> bool:
    return any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names)


def _show(spec) -> str:
    return spec.__name__ if isinstance(spec, type) else repr(spec)
