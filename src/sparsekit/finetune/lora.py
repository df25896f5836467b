"""LoRA (through ``peft``) on a pruned model, merged without filling the pruned weights in.

A LoRA update ``s·B@A`` is dense: merged as it is (``peft``'s ``merge_and_unload``), it
writes a value into every pruned weight and the model is sparse no more. Here each LoRA
layer whose base weight is sparse carries that weight's mask, and every merge — ``peft``'s
own ``merge``/``merge_and_unload`` as well as :func:`merge` — adds only ``s·(B@A) ⊙ mask``:
the zeros of the base stay exactly zero.

Two ways to train, chosen by ``masked_forward`` of :func:`sparse_lora`:

* ``True`` (default; the SPP / PST way): the adapter's forward pass also uses the masked
  update, ``W x + s·((B@A) ⊙ M) x``. Training sees exactly the model that merging gives,
  so the merged model computes what the trained adapter did. Each forward pass builds the
  layer's dense ``(out, in)`` update, a weight-sized tensor that autograd keeps for the
  backward pass.
* ``False``: plain LoRA, ``W x + s·B(A x)``. Cheaper, but the merged model then differs
  from the trained adapter by the masked-out part of the update, ``-s·((B@A) ⊙ ¬M) x``
  per layer — a change the adapter never trained with.

Masks are ``peft`` LoRA *variants*: of the adapters that exist when they are installed, and
of every adapter added to a masked ``Linear`` layer later (:class:`MaskedLoraLinear`). A
model loaded by ``PeftModel.from_pretrained`` carries no masks until :func:`merge`, or
``sparse_lora(peft_model, None, masks)`` to train it on, installs them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import peft
import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_fraction,
    check_int,
    check_materialized_module,
    check_module,
    check_not_compiled,
    check_positive,
)
from sparsekit.masks import MaskSet

__all__ = ["MASK_NAME", "MaskedLora", "MaskedLoraLinear", "MaskedMerge", "layer_masks", "merge",
           "sparse_lora"]

MASK_NAME = "sparse_mask"
"""The non-persistent buffer of a LoRA layer holding its base weight's mask (``True``: kept)."""


def sparse_lora(
    model: nn.Module,
    config: Any,
    masks: MaskSet | None = None,
    *,
    masked_forward: bool = True,
) -> nn.Module:
    """Wrap the pruned ``model`` in a ``peft`` LoRA model whose merges keep its zeros.

    Given a ``PeftModel`` (an adapter loaded with ``PeftModel.from_pretrained`` to resume
    its training) and ``config=None``, install the masks on its adapters instead: loaded,
    they are plain LoRA, and training on resumed with the unmasked forward.

    ``config`` is a ``peft.LoraConfig``. ``masks`` is the :class:`~sparsekit.MaskSet` the
    model was pruned with (applied once the adapters are in place); without it, a base
    weight's mask is where it is nonzero (read before an initialization that rewrites the
    base, such as PiSSA's, and applied after it). Only LoRA layers of ``nn.Linear`` and GPT-2
    ``Conv1D`` may have a sparse base. ``masked_forward`` picks how the adapter trains (see
    the module docstring). Returns the ``peft.PeftModel`` (``model`` itself is changed in
    place, as ``peft`` does); when anything is refused, by sparsekit or by ``peft``,
    ``model`` is left as it came.
    """
    check_module("model", model)
    check_bool("masked_forward", masked_forward)
    if isinstance(model, peft.PeftModel):
        return _reinstall(model, config, masks, masked_forward)
    if not isinstance(config, peft.LoraConfig):
        raise ArgumentTypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    check_materialized_module(model, "model: ")  # its masks are read from the weights
    check_not_compiled("model", model, "fine-tuning")  # peft printed a fused group's repr
    if _lora_layers(model):
        some = ", ".join(map(repr, list(_lora_layers(model))[:3]))
        raise ValueError(f"model has LoRA layers already ({some}…): sparse_lora was applied "
                         "to it before; train that PeftModel, or merge() it first")
    by_param = _check_masks(model, masks)
    _check_config(config)
    _check_ranks(model, config)
    if masks is None and _rewrites_base(config):
        by_param = {id(p): p.detach() != 0 for p in model.parameters() if p.dim() >= 2}
    modules, attributes = dict(model.named_modules()), set(vars(model))
    grad_flags = {p: p.requires_grad for p in model.parameters()}
    try:
        wrapped = peft.get_peft_model(model, config)  # peft checks the targets here
        _check_saved_copies(wrapped, by_param, "config.modules_to_save")
        _install(wrapped, by_param, masked_forward=masked_forward)
    except Exception:
        _restore(model, modules, grad_flags, attributes)
        raise
    if masks is not None:
        masks.apply()  # the base weights are the same parameters inside the LoRA layers
    elif by_param:  # the zeros an init that rewrote the base filled in
        with torch.no_grad():
            for layer in _lora_layers(wrapped).values():
                if hasattr(layer, MASK_NAME):
                    layer.get_base_layer().weight.masked_fill_(~getattr(layer, MASK_NAME), 0)
    return wrapped


def _reinstall(model: peft.PeftModel, config: Any, masks: MaskSet | None,
               masked_forward: bool) -> peft.PeftModel:
    """:func:`sparse_lora` on a ``PeftModel``: its adapters get their masks (from ``masks``,
    else where the base weights are nonzero) and the forward ``masked_forward`` picks."""
    if config is not None:
        raise ValueError(f"config must be None for a PeftModel, whose adapters keep their own "
                         f"configs (sparse_lora on it installs the masks again), got "
                         f"{type(config).__name__}; pass the pruned base model to add an adapter")
    check_materialized_module(model, "model: ")
    by_param = _check_masks(model, masks)
    _install(model, by_param, masked_forward=masked_forward)
    return model


def merge(model: nn.Module, masks: MaskSet | None = None) -> nn.Module:
    """Merge every LoRA adapter of ``model`` into its base weights, masked, and unload.

    ``model`` is a ``peft`` model (from :func:`sparse_lora`, ``get_peft_model`` or
    ``PeftModel.from_pretrained``). A layer's mask is the one :func:`sparse_lora` gave it,
    else the entry of ``masks`` for its base weight, else where that weight is nonzero.
    Returns the base model with merged weights; every weight zero before is zero after (a
    ``modules_to_save`` copy of a module with a sparse weight, which would replace it, and an
    adapter holding NaN or infinite entries are refused before anything is merged).
    """
    if not isinstance(model, nn.Module) or not callable(getattr(model, "merge_and_unload", None)):
        raise ArgumentTypeError(f"model must be a peft model (with merge_and_unload()), got "
                                f"{type(model).__name__}")
    if not _lora_layers(model):
        raise ValueError("model has no LoRA layers to merge (is it a peft LoRA model?)")
    check_materialized_module(model, "model: ")  # merging reads and writes the weights
    by_param = _check_masks(model, masks)
    _check_saved_copies(model, by_param, "model: its modules_to_save")
    _check_finite_adapters(model)
    _install(model, by_param, masked_forward=None)
    return model.merge_and_unload()


def layer_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """The mask each LoRA layer of ``model`` merges with, by the name of its base weight."""
    check_module("model", model)
    return {f"{name}.base_layer.weight": getattr(layer, MASK_NAME)
            for name, layer in _lora_layers(model).items() if hasattr(layer, MASK_NAME)}


# -- masks as LoRA variants -----------------------------------------------------------------

class MaskedMerge(LoraVariant):
    """Plain LoRA forward; merging (and unmerging) adds (subtracts) ``s·(B@A) ⊙ mask``."""

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to set up: the mask is the layer's buffer :data:`MASK_NAME`."""

    @staticmethod
    def merge_safe(module: nn.Module, active_adapter: str,
                   orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + _masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: nn.Module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += _masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: nn.Module, active_adapter: str,
                orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight - _masked_delta(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: nn.Module, *, active_adapter: str, x: torch.Tensor,
                result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        return result + lora_b(lora_a(dropout(x))) * scaling


class MaskedLora(MaskedMerge):
    """The forward pass uses the masked update too: training sees the model merging gives."""

    @staticmethod
    def forward(module: nn.Module, *, active_adapter: str, x: torch.Tensor,
                result: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        delta = _masked_delta(module, active_adapter)
        if module.fan_in_fan_out:  # GPT-2 Conv1D: the weight is stored (in, out)
            delta = delta.t()
        x = module.lora_dropout[active_adapter](x)
        return result + F.linear(x, delta.to(x.dtype))


class MaskedLoraLinear(peft.tuners.lora.Linear):
    """A ``peft`` LoRA ``Linear`` whose base weight is sparse: adapters added to it later
    (``add_adapter``, ``add_weighted_adapter``, ``load_adapter``) take the masked variant
    too (:class:`MaskedLora`, or :class:`MaskedMerge` where the layer was given
    ``masked_forward=False``), so ``peft``'s own ``merge_and_unload`` of any of them keeps
    the zeros. Merged through ``peft`` as plain LoRA, they had filled every pruned weight
    of the layer in, silently."""

    sparse_masked_forward = True

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> LoraVariant:
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None and not isinstance(variant, MaskedMerge):
            raise ValueError(f"LoRA layer with a sparse base weight: a new adapter's "
                             f"{type(variant).__name__} cannot keep its zeros (plain LoRA can)")
        return MaskedLora() if self.sparse_masked_forward else MaskedMerge()


def _masked_delta(module: nn.Module, adapter: str) -> torch.Tensor:
    """``s·(B@A) ⊙ mask`` of ``adapter``, laid out like the base weight."""
    # where, not a product: an entry of B@A that overflowed to ±inf times a False of the
    # mask was NaN, written into a pruned weight by the merge
    delta = module.get_delta_weight(adapter)
    return torch.where(getattr(module, MASK_NAME), delta, delta.new_zeros(()))


def _install(model: nn.Module, by_param: Mapping[int, torch.Tensor], *,
             masked_forward: bool | None) -> None:
    """Give every LoRA layer with a sparse base its mask and the masked variant.

    ``masked_forward=None`` keeps the forward a layer has (a merge changes only merging).
    Raises before changing anything when a layer cannot take a mask.
    """
    plan = []
    for name, layer in _lora_layers(model).items():
        weight = layer.get_base_layer().weight
        mask = getattr(layer, MASK_NAME, None)
        if mask is None:
            mask = by_param.get(id(weight))
            if mask is None:
                mask = weight.detach() != 0
        if bool(mask.all()):
            continue  # a dense base: plain LoRA merges it exactly
        if not isinstance(layer, peft.tuners.lora.Linear):
            raise ArgumentTypeError(
                f"LoRA layer {name!r} ({type(layer).__name__}) has a sparse base weight; only "
                "Linear and GPT-2 Conv1D layers can keep one"
            )
        for adapter in layer.lora_A:
            variant = layer.lora_variant.get(adapter)
            if variant is not None and not isinstance(variant, MaskedMerge):
                raise ValueError(f"LoRA layer {name!r}: adapter {adapter!r} uses "
                                 f"{type(variant).__name__}, which cannot keep a sparse base")
            if variant is None and adapter in layer.merged_adapters:
                # merge_and_unload keeps what is merged: the dense update, silently
                raise ValueError(f"LoRA layer {name!r}: adapter {adapter!r} was merged already "
                                 "by peft's plain merge (merge_adapter()), which filled the "
                                 "pruned weights in; call model.unmerge_adapter() first")
        plan.append((layer, mask.to(weight.device, torch.bool)))
    for layer, mask in plan:
        if not hasattr(layer, MASK_NAME):
            layer.register_buffer(MASK_NAME, mask, persistent=False)
        if type(layer) is peft.tuners.lora.Linear:
            layer.__class__ = MaskedLoraLinear
        if isinstance(layer, MaskedLoraLinear) and masked_forward is not None:
            layer.sparse_masked_forward = masked_forward
        for adapter in layer.lora_A:
            current = layer.lora_variant.get(adapter)
            if masked_forward is None and current is not None:
                continue
            layer.lora_variant[adapter] = (MaskedLora if masked_forward else MaskedMerge)()


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def _check_config(config: peft.LoraConfig) -> None:
    """Raise on ranks and scales ``peft`` would take but cannot train with (NaN or infinite
    ``lora_alpha`` makes every output non-finite; a float rank fails deep in torch), and
    on DoRA."""
    check_int("config.r", config.r, minimum=1)
    check_positive("config.lora_alpha", config.lora_alpha)
    # peft takes a negative or NaN dropout as none, and 1.0 zeroes every adapter input
    check_fraction("config.lora_dropout", config.lora_dropout)
    for key, rank in (config.rank_pattern or {}).items():
        check_int(f"config.rank_pattern[{key!r}]", rank, minimum=1)
    for key, alpha in (config.alpha_pattern or {}).items():
        check_positive(f"config.alpha_pattern[{key!r}]", alpha)
    if config.use_dora:
        raise ValueError("config.use_dora=True: a DoRA update rescales whole columns and "
                         "cannot keep a sparse base; use plain LoRA")
    if getattr(config, "lora_bias", False):  # peft ≥ 0.14
        # the masked update is s·(B@A)⊙M: lora_B's bias never trained, then the merge added
        # it (a loaded adapter's: 4.0 off the trained model)
        raise ValueError("config.lora_bias=True: the adapter's bias is a dense update of the "
                         "layer's bias that the masked forward does not apply; accepted: "
                         "lora_bias=False (bias='lora_only' or 'all' trains the biases "
                         "themselves)")


_KEEPS_BASE = frozenset({"gaussian", "eva", "orthogonal", "mica"})
"""The string ``init_lora_weights`` of ``peft`` that initialize the adapter alone; every
other (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA …) subtracts the adapter's start from the base
weight, which fills its zeros in."""


def _rewrites_base(config: peft.LoraConfig) -> bool:
    """Whether ``config``'s initialization changes the base weights: their zeros (the masks
    without a ``MaskSet``) must then be read before ``peft`` wraps the model — read after,
    a PiSSA base was dense and its pruned weights were lost silently."""
    init = config.init_lora_weights
    return not (isinstance(init, bool) or str(init).lower() in _KEEPS_BASE)


def _check_ranks(model: nn.Module, config: peft.LoraConfig) -> None:
    """Raise on a rank above every dimension of ``model``'s weights: the update ``B@A``
    of an ``(out, in)`` layer has rank at most ``min(out, in)``, so such a rank adds
    nothing, while ``peft`` allocates ``r·(in + out)`` entries per layer for it (``r=2**40``
    was a raw ``RuntimeError`` of the allocator, a large one filled the memory)."""
    top = max((max(p.shape) for p in model.parameters() if p.dim() >= 2), default=None)
    if top is None:
        return  # no weight matrix: peft finds nothing to target and says so
    ranks = [("config.r", config.r)] + [
        (f"config.rank_pattern[{key!r}]", rank) for key, rank in (config.rank_pattern or {}).items()
    ]
    for name, rank in ranks:
        if rank > top:
            raise ValueError(f"{name} must be an int in [1, {top}] (the largest dimension of "
                             f"the model's weights: a higher rank adds nothing), got {rank}")


def _check_saved_copies(model: nn.Module, by_param: Mapping[int, torch.Tensor],
                        what: str) -> None:
    """Raise if ``modules_to_save`` copies a module with a sparse weight: the copy trains
    densely and replaces the module when merged, filling its pruned weights in (``what``
    names where the copies were asked for: the config, or the model being merged)."""
    for name, module in model.named_modules():
        if not isinstance(module, peft.utils.ModulesToSaveWrapper):
            continue
        for pname, p in module.original_module.named_parameters():
            mask = by_param.get(id(p))
            sparse = (not bool(mask.all()) if mask is not None
                      else p.dim() >= 2 and not bool(p.detach().all()))
            if sparse:
                raise ValueError(
                    f"{what}: {name!r} has a sparse weight ({pname!r}); its "
                    "trainable copy would train densely and fill the pruned weights in when "
                    "merged. Target it with LoRA (target_modules) instead")


def _check_finite_adapters(model: nn.Module) -> None:
    """Raise if an adapter that merging adds holds NaN or infinite entries (a diverged
    training): the merge wrote them into every kept weight of its layer, silently."""
    for name, layer in _lora_layers(model).items():
        for pname, p in layer.named_parameters():
            kind, _, rest = pname.partition(".")
            if (kind.startswith("lora_") and rest.partition(".")[0] in layer.active_adapters
                    and not bool(torch.isfinite(p).all())):
                raise ValueError(
                    f"model: LoRA layer {name!r} holds NaN or infinite entries in {pname!r} (a "
                    "diverged training?); merging would write them into its weights")


def _restore(model: nn.Module, modules: Mapping[str, nn.Module],
             grad_flags: Mapping[nn.Parameter, bool], attributes: set[str]) -> None:
    """Put back the submodules ``peft`` replaced (``modules`` as ``named_modules()`` gave
    them before, parents first) and the ``requires_grad`` flags it changed, and remove the
    attributes it added to ``model`` (those not in ``attributes``, ``vars(model)`` before).

    ``peft`` leaves the layers it wrapped before an error in place, and a failed
    ``get_peft_model`` returns no model to ``unload()``. The ``peft_config`` it leaves on
    the model made the next ``get_peft_model`` of it warn of "multiple adapters".
    """
    for name, module in modules.items():
        if name and model.get_submodule(name) is not module:
            model.set_submodule(name, module)
    for p, flag in grad_flags.items():
        p.requires_grad_(flag)
    for name in set(vars(model)) - attributes:
        delattr(model, name)


def _check_masks(model: nn.Module, masks: MaskSet | None) -> dict[int, torch.Tensor]:
    """The masks by parameter identity, after checking they belong to ``model``."""
    if masks is None:
        return {}
    if not isinstance(masks, MaskSet):
        raise ArgumentTypeError(f"masks must be a MaskSet or None, got {type(masks).__name__}")
    if masks._removed:  # it holds no masks: the model was wrapped, then apply() failed
        raise ValueError("masks were removed by remove() and hold no masks; pass the MaskSet "
                         "before its remove(), or masks=None (a base weight's mask is then "
                         "where it is nonzero)")
    # the parameters the model holds now: a MaskSet follows one that load_state_dict(...,
    # assign=True) replaced, which was refused here as a parameter of another model
    params = masks._current_params()
    own = {id(p) for p in model.parameters()}
    foreign = [n for n, p in params.items() if id(p) not in own]
    if foreign:
        raise ValueError(
            f"masks were made for another model: {foreign[:3]}{'…' if len(foreign) > 3 else ''} "
            "are not parameters of this model"
        )
    return {id(params[n]): m for n, m in masks.masks.items()}
