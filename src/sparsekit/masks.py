"""MaskSet: the sparsity state of a model, and the only code that mutates weights for it.

A ``MaskSet`` holds one boolean mask per target parameter. It zeroes the masked
weights, and once attached to an optimizer it keeps them at exactly zero through every
``optimizer.step()`` — whatever the optimizer does with momentum, adaptive moments or
weight decay — by masking gradients before the step and weights plus optimizer state
after it. Masks live outside the model, so ``model.state_dict()`` keeps its usual keys.

Masks are whole tensors, the same on every rank of a distributed job (checked when the
model is wrapped in ``DistributedDataParallel`` or sharded by FSDP2). Under FSDP2
(``fully_shard``) weights, gradients and optimizer state are ``DTensor`` shards; each
mask is applied to the part of its weight that this rank holds.

:class:`Masks` is what schedules need of such a state; ``MaskSet`` is one,
:class:`~sparsekit.engine.structure_set.StructureSet` (the masks of truly sparse
``SparseLinear`` layers) the other.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sparsekit._checks import (
    SAME_WIDTH_INT,
    ArgumentTypeError,
    check_bool,
    check_materialized,
    check_module,
    check_optimizer,
    check_writable,
    is_float8,
)
from sparsekit.distributed import check_same_on_ranks, full, is_sharded, local, shard_like
from sparsekit.patterns import Pattern, parse_pattern
from sparsekit.targets import stores_transposed


@runtime_checkable
class Masks(Protocol):
    """The sparsity state a schedule drives: one boolean mask per named weight.

    Schedules read ``masks`` and ``params`` and the dense gradients, and change the state
    only through :meth:`update`, so the same drop/grow rule works on masked dense weights
    (:class:`MaskSet`) and on truly sparse layers (``StructureSet``).
    """

    pattern: str
    masks: dict[str, torch.Tensor]

    @property
    def params(self) -> Mapping[str, torch.Tensor]:
        """The weights, dense, by the name their mask has (read only)."""
        ...

    def attach(self, optimizer: torch.optim.Optimizer) -> Masks:
        """Keep the state through every ``optimizer.step()``."""
        ...

    def update(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace some or all masks; regrown weights and their optimizer state start at 0."""
        ...

    def capture(self, on: bool) -> None:
        """Ask for (or stop asking for) dense gradients of the next backward passes."""
        ...

    def dense_grads(self) -> Mapping[str, torch.Tensor | None]:
        """The gradients of every weight, masked entries included, before the step masks them."""
        ...

    def sparsity(self) -> float: ...

    def state_dict(self) -> dict[str, object]: ...

    def load_state_dict(self, state: Mapping[str, object]) -> None: ...

    def remove(self) -> None: ...


class MaskSet:
    """Boolean masks for named parameters of ``model``; ``True`` means the weight is kept.

    ``pattern`` names the shape the masks follow (a spec :func:`sparsekit.load` accepts:
    ``"unstructured"``, ``"2:4"``, ``"block:4x4"``, …); masks that do not follow it are
    refused here, so that :func:`sparsekit.save` never writes a file ``load`` refuses.
    """

    def __init__(
        self, model: nn.Module, masks: Mapping[str, torch.Tensor], *,
        pattern: str | Pattern = "unstructured",
    ) -> None:
        check_module("model", model)
        params = dict(model.named_parameters())
        parsed = parse_pattern(pattern)
        self._check(masks, params, model=model)
        _check_follow(parsed, masks, model)
        self.model = model
        self.pattern = str(parsed)
        # whole masks, also of FSDP2's sharded weights: a mask built from one (p != 0) is a
        # sharded DTensor, which the ranks' agreement check failed on with a raw error
        self.masks: dict[str, torch.Tensor] = {
            n: full(m).to(device=params[n].device, dtype=torch.bool, copy=True)
            for n, m in masks.items()
        }
        if isinstance(model, nn.parallel.DistributedDataParallel) or is_sharded(model):
            check_same_on_ranks(self.masks)
        self.params: dict[str, nn.Parameter] = {n: params[n] for n in masks}
        self._shards: dict[str, torch.Tensor] = {}  # this rank's part of each mask
        self._refresh_shards()
        # Parameters are tracked by owner and attribute, so a replaced Parameter
        # (load_state_dict(assign=True), a conversion that builds new ones) is followed.
        self._owners: dict[str, tuple[nn.Module, str]] = {n: _owner(model, n) for n in masks}
        self._hooks: dict[int, list[RemovableHandle]] = {}
        self._grad_hooks: list[RemovableHandle] = []  # LBFGS: every closure's gradient
        self._accumulate_hooks: list[RemovableHandle] = []  # at backward (_mask_accumulated)
        self._capturing = False  # a schedule reads the dense gradients before this step
        self._optimizers: dict[int, torch.optim.Optimizer] = {}
        # Masks as bits of each weight's width, built while attached (_keep_bits): one AND
        # per tensor and step, as fast as a multiply and ~30x faster than masked_fill_.
        self._factors: dict[str, torch.Tensor] = {}
        self._removed = False  # set by remove(): nothing is left to apply or update
        # the schedule that changes these masks as it trains (its class name; set by the
        # schedules), and whether it regrows connections (DynamicSparsity): another MaskSet
        # kept through the same steps would zero what it regrows, another schedule's
        # prune the weights to the union of both masks
        self.schedule: str | None = None
        self.regrows = False
        self._accumulating: set[int] = set()  # ids of the weights _accumulate_hooks are on


    # -- state ------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self) -> MaskSet:
        """Zero every masked weight in place (with +0.0)."""
        self._check_not_removed("apply")
        self._follow_replaced_params()
        for n, p in self.params.items():
            local(p).masked_fill_(~self._shards[n], 0)
        return self

    def update(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Replace some or all masks (e.g. a prune or regrow step) and re-apply them.

        Weights that become kept again ("regrown") start from zero, and their optimizer
        state in every attached optimizer is zero, so nothing from before the drop
        leaks back. Each new mask must follow :attr:`pattern`.
        """
        self.check_update(masks)
        self._follow_replaced_params()
        with torch.no_grad():
            for n, new in masks.items():
                new = new.to(device=self.masks[n].device, dtype=torch.bool, copy=True)
                grown = new & ~self.masks[n]
                local(self.params[n]).masked_fill_(self._shard(n, grown), 0)
                for opt in self._optimizers.values():  # regrown and dropped start clean
                    _fill_state(opt, self.params[n], self._shard(n, grown | ~new))
                self.masks[n] = new
        self._refresh_shards()
        self._refresh_factors()
        self.apply()

    def check_update(self, masks: Mapping[str, torch.Tensor]) -> None:
        """Raise what :meth:`update` of ``masks`` would raise, changing nothing: for callers
        that must refuse before changing other state (a schedule's round, the weights it
        rewinds)."""
        self._check_not_removed("update")
        params = self._current_params()  # a replaced parameter of another shape is refused
        self._check(masks, self.params, subset=True, model=self.model)
        _check_follow(parse_pattern(self.pattern), masks, self.model)
        for opt in self._optimizers.values():  # the state update() zeroes at dropped weights
            _check_state_writable(opt, {n: params[n] for n in masks})

    def sparsity(self) -> float:
        """Fraction of masked entries over all masked parameters."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0

    def layer_sparsity(self) -> dict[str, float]:
        """Sparsity of each masked parameter, by parameter name."""
        return {n: 1.0 - int(m.sum()) / m.numel() if m.numel() else 0.0
                for n, m in self.masks.items()}

    def state_dict(self) -> dict[str, object]:
        return {"pattern": self.pattern, "masks": {n: m.clone() for n, m in self.masks.items()}}

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        """Load masks saved by :meth:`state_dict` and apply them: a mask for each parameter
        this MaskSet masks (an empty ``MaskSet(model, {})`` takes any), shapes matching.

        Meant for resuming: the optimizer state of kept weights is left as loaded, only
        masked entries are zeroed. To change masks during training use :meth:`update`.
        """
        masks, pattern = self._check_state(state)
        if _several_ranks():  # each rank read its own (stale) file: as __init__ refuses it
            check_same_on_ranks({n: full(m) for n, m in masks.items()})
        owners = {n: _owner(self.model, n) for n in masks}
        params = {n: module._parameters[attr] for n, (module, attr) in owners.items()}
        self._check_loadable(params)
        # copies: the state's tensors stay the caller's, changing them changes no mask
        new = {n: m.to(params[n].device, torch.bool, copy=True) for n, m in masks.items()}
        self._owners, self.params, self.masks = owners, params, new
        self.pattern = str(pattern)
        self._refresh_shards()
        for opt in self._optimizers.values():  # masked entries of the state start clean
            for n, p in self.params.items():
                _fill_state(opt, p, ~self._shards[n])
        self._refresh_factors()
        self.apply()

    def _check_loadable(self, params: Mapping[str, torch.Tensor]) -> None:
        """Raise unless the weights ``params`` that loaded masks would hold, and their state
        in every attached optimizer, can be zeroed in place (no inference tensor outside
        inference mode, nothing on the meta device): the masks, the weights they follow and
        the pattern were swapped first, so a failing zeroing left the MaskSet half loaded."""
        for n, p in params.items():
            check_materialized(f"parameter {n!r}", p)
            check_writable(f"parameter {n!r}", p)
        for opt in self._optimizers.values():
            _check_state_writable(opt, params)

    def _check_state(self, state: object) -> tuple[Mapping[str, torch.Tensor], Pattern]:
        """The masks and the pattern of ``state``, checked as :meth:`load_state_dict` takes
        them."""
        self._check_not_removed("load_state_dict")
        if not isinstance(state, Mapping) or "masks" not in state:
            raise ValueError("state must be a dict from MaskSet.state_dict() with a 'masks' entry")
        masks = state["masks"]
        try:
            pattern = parse_pattern(state.get("pattern", self.pattern))
        except (TypeError, ValueError) as err:
            kind = ArgumentTypeError if isinstance(err, TypeError) else ValueError
            raise kind(f"state['pattern']: {err}") from err
        self._check(masks, dict(self.model.named_parameters()), model=self.model)
        if missing := sorted(set(self.masks) - set(masks)):  # they went on training dense
            raise ValueError(
                f"state['masks'] must hold a mask for each parameter this MaskSet masks, "
                f"got none for {missing[:5]}; accepted: the state_dict() of a MaskSet of "
                "these parameters (or load into an empty MaskSet(model, {}))")
        _check_follow(pattern, masks, self.model)
        return masks, pattern

    # -- training ---------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> MaskSet:
        """Keep masked weights at zero through every ``optimizer.step()``.

        ``optimizer`` may be a wrapper that exposes the real optimizer as ``.optimizer``
        (accelerate's ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, the
        optimizer an HF ``Trainer`` holds): the hooks go on the optimizer it wraps.

        Gradients of masked weights are zeroed as soon as the backward pass accumulates
        them, so gradient clipping (``clip_grad_norm_``, the HF ``Trainer``'s
        ``max_grad_norm``) and logged gradient norms see the masked model's gradients, as
        they would see a truly sparse one's; and again before the step (after its closure,
        when it gets one: Lightning steps that way), so momenta and adaptive moments, zeroed
        here at the masked positions, only ever accumulate zeros there. Under DDP or FSDP2
        each rank's gradient is zeroed as it is accumulated, before DDP averages it and
        before FSDP2 reduces it: the masks agree on every rank (checked here, every rank
        attaching alike), so clipping measures the masked average as one process would.
        While a schedule reads the dense gradients (:meth:`capture`: RigL's update steps,
        SNFS's momenta), they are zeroed only before the step. After the step masked
        weights are zeroed again, so nothing that mixes coordinates
        (LBFGS, orthogonalised updates) can revive them. Steps skipped by
        ``torch.amp.GradScaler`` run no hooks and change nothing. Load an optimizer
        ``state_dict`` before attaching, so that this zeroing covers it.

        On CPU prefer ``fused=True`` for Adam/AdamW: the default foreach Adam takes
        ``sqrt`` of the zero second moments, which AVX-512 CPUs compute ~8x slower than of
        other numbers (measured: a 90%-sparse MLP step 1.57x dense with foreach, 1.13x fused).

        Optimizers that re-evaluate the loss inside ``step`` (``LBFGS``) see the gradient of
        every closure call, not only the one before the step: for them the masks are also
        applied as gradient hooks on the weights, so their curvature estimates never see a
        masked coordinate. Parameters replaced since the masks were made (for example by
        ``load_state_dict(..., assign=True)``) are followed, not left unmasked.
        """
        optimizer = self.check_attach(optimizer)
        if _several_ranks():  # masks made before DDP gave every rank rank 0's weights
            check_same_on_ranks(self.masks)
        self._follow_replaced_params()
        key = id(optimizer)
        if key in self._hooks:
            return self
        self._optimizers[key] = optimizer
        _KEEPING.add(self)
        self._hooks[key] = [
            optimizer.register_step_pre_hook(after_gradients(self._mask_grads)),
            optimizer.register_step_post_hook(lambda *_: self._after_step()),
        ]
        if isinstance(optimizer, torch.optim.LBFGS) and not self._grad_hooks:
            self._grad_hooks = [p.register_hook(self._grad_mask(n))
                                for n, p in self.params.items()]
        self._hook_accumulation()
        self.apply()  # weights and any existing state start clean (exact +0.0)
        with torch.no_grad():
            for n, p in self.params.items():
                _fill_state(optimizer, p, ~self._shards[n])
        self._refresh_factors()
        return self

    def check_attach(self, optimizer: object, *,
                     names: Iterable[str] | None = None) -> torch.optim.Optimizer:
        """Raise what :meth:`attach` of ``optimizer`` would raise, changing nothing, and
        return the optimizer it would hook (the one a wrapper exposes).

        ``names`` are the parameters the masks will hold once a state is loaded (the names
        of its masks; names that are no parameters are left to :meth:`load_state_dict` to
        refuse): check it before loading the state, so that an optimizer the masks refuse
        leaves them, the model and the optimizer as they were.
        """
        optimizer = check_optimizer(optimizer)
        self._check_not_removed("attach")
        if names is None:
            params = self._current_params()
            if id(optimizer) in self._hooks:
                return optimizer
        else:
            model_params = dict(self.model.named_parameters())
            params = {n: model_params[n] for n in names
                      if isinstance(n, str) and n in model_params}
        self._check_optimizes_params(optimizer, params)
        own = {id(p) for p in params.values()}
        for other in keeping(optimizer):
            if other is self or not any(id(p) in own for p in other.params.values()):
                continue
            names = ", ".join(list(other.masks)[:3])
            if other.regrows:  # its after-step hook zeroed every connection the other regrew
                raise ValueError(
                    f"optimizer is driven by a {other.schedule} of these weights ({names}): "
                    "this MaskSet would zero every connection it regrows; accepted: an "
                    f"optimizer no {other.schedule} of these weights drives — detach() or "
                    "remove() it first")
            if self.schedule and other.schedule:  # built twice (a notebook cell run again)
                raise ValueError(
                    f"optimizer keeps the masks of a {other.schedule} of these weights "
                    f"({names}): a second schedule would prune them to the union of both "
                    "masks, neither at its target; accepted: an optimizer no other schedule "
                    "of these weights drives — remove() or detach() the other first")
        _check_state_writable(optimizer, params)  # zeroed once hooked: refuse before hooking
        return optimizer

    def _hooked(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether its step hooks are on ``optimizer`` now (an :func:`sparsekit.integrations
        .attach` that failed takes them off the optimizer directly)."""
        registered = (optimizer._optimizer_step_pre_hooks.keys()
                      | optimizer._optimizer_step_post_hooks.keys())
        return any(h.id in registered for h in self._hooks.get(id(optimizer), []))

    def detach(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Stop enforcing masks on ``optimizer`` (default: on every attached optimizer)."""
        optimizer = check_optimizer(optimizer, optional=True)
        keys = [id(optimizer)] if optimizer is not None else list(self._hooks)
        for key in keys:
            for h in self._hooks.pop(key, []):
                h.remove()
            self._optimizers.pop(key, None)
        if not self._hooks:
            _KEEPING.discard(self)
        if not any(isinstance(o, torch.optim.LBFGS) for o in self._optimizers.values()):
            for h in self._grad_hooks:
                h.remove()
            self._grad_hooks = []
        self._hook_accumulation()
        self._refresh_factors()

    def remove(self) -> None:
        """Bake the zeros into the weights and drop the masks (the model stays sparse).

        Removing twice does nothing; :meth:`apply`, :meth:`update`, :meth:`attach` and
        :meth:`load_state_dict` then raise: build a new ``MaskSet`` to mask again.
        """
        if self._removed:
            return
        self.apply()
        self.detach()
        self.masks.clear()
        self.params.clear()
        self._shards.clear()
        self._owners.clear()
        self._removed = True

    @property
    def removed(self) -> bool:
        """Whether :meth:`remove` dropped the masks (the MaskSet then masks nothing)."""
        return self._removed

    def capture(self, on: bool) -> None:
        """Leave the gradients of masked weights dense until the step (``on``), for a
        schedule that reads them in its step pre-hook (:meth:`dense_grads`), or zero them
        as the backward pass accumulates them (``off``, the default)."""
        check_bool("on", on)
        self._capturing = on

    def dense_grads(self) -> dict[str, torch.Tensor | None]:
        """Each weight's ``.grad``: dense when read before the step (an optimizer pre-hook)
        while :meth:`capture` is on."""
        return {n: p.grad for n, p in self.params.items()}

    def _refresh_factors(self) -> None:
        self._factors = (
            {n: _keep_bits(m, self.params[n].dtype) for n, m in self._shards.items()}
            if self._optimizers else {}
        )

    def _shard(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of the whole tensor ``t``, laid out as parameter ``name``."""
        return local(shard_like(t, self.params[name]))

    def _refresh_shards(self) -> None:
        self._shards = {n: self._shard(n, m) for n, m in self.masks.items()}

    def _grad_mask(self, name: str):
        return lambda grad: _and_bits(grad.clone(), self._bits(name, grad))

    def _hook_accumulation(self) -> None:
        """Put :meth:`_mask_accumulated` on the masked weights the attached optimizers
        step (only theirs: a detached optimizer's weights train unmasked)."""
        for h in self._accumulate_hooks:
            h.remove()
        self._accumulating = self._to_accumulate()
        self._accumulate_hooks = [
            p.register_post_accumulate_grad_hook(self._mask_accumulated(n))
            for n, p in self.params.items() if id(p) in self._accumulating]

    def _to_accumulate(self) -> set[int]:
        """The ids of the masked weights that the attached optimizers step and that are
        trained now (``requires_grad``)."""
        held = {id(p) for o in self._optimizers.values() for g in o.param_groups
                for p in g["params"]}
        return {id(p) for p in self.params.values() if p.requires_grad and id(p) in held}

    def _mask_accumulated(self, name: str) -> Callable[[torch.Tensor], None]:
        """The hook that zeroes the gradient of ``name``'s masked weights once the backward
        pass has accumulated it (on each rank before DDP averages it: a tensor's
        post-accumulate hooks run inside its accumulation, before the reducer's hook on
        the accumulator) — not while a schedule reads dense gradients."""
        def hook(param: torch.Tensor) -> None:
            if self._capturing or param.grad is None:
                return
            with torch.no_grad():
                self._mask_grad(name, param)
        return hook

    def _mask_grad(self, name: str, param: torch.Tensor) -> None:
        if param.grad.is_sparse:  # nn.Embedding(sparse=True)
            param.grad = _masked_sparse(param.grad, self._shards[name])
        else:
            grad = local(param.grad)
            _and_bits(grad, self._bits(name, grad))

    def _bits(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """The keep bits of parameter ``name`` at the width of ``t`` (its weight or
        gradient): ``model.to(dtype)`` after :meth:`attach` keeps the parameter objects and
        swaps their data, so bits made for the old width failed the next step with a raw
        broadcast error."""
        bits = self._factors[name]
        if bits.element_size() != t.element_size():
            bits = self._factors[name] = _keep_bits(self._shards[name], t.dtype)
        return bits

    def _current_params(self) -> dict[str, torch.Tensor]:
        """The masked parameters as the model holds them now (a replaced one in place of
        the tracked one); raise, changing nothing, where one was replaced by a parameter
        its mask does not fit or by one on the meta device (``model.to("meta")``: following
        it moved the masks there, and their values were lost), where one is an inference
        tensor, which cannot be zeroed outside inference mode (the layers before it were
        zeroed, then a raw ``RuntimeError``), and where the module holding one is no longer
        part of the model (replaced or deleted: its weight was masked, and the layer the
        model now runs was left dense, silently)."""
        params = {}
        modules = {id(m) for m in self.model.modules()}
        for n, (module, attr) in self._owners.items():
            if id(module) not in modules:
                raise ValueError(
                    f"the module holding parameter {n!r} is no longer part of the model "
                    "(replaced or deleted since the masks were made); build a new MaskSet "
                    "for the model as it is now"
                )
            current = module._parameters.get(attr)
            if current is not None:
                check_writable(f"parameter {n!r}", current)
            if current is not None and current is not self.params[n]:
                check_materialized(f"parameter {n!r} (replaced since the masks were made)",
                                   current)
            if current is not self.params[n] and (current is None
                                                  or current.shape != self.masks[n].shape):
                got = None if current is None else tuple(current.shape)
                raise ValueError(
                    f"parameter {n!r} was replaced by one of shape {got}; its mask has shape "
                    f"{tuple(self.masks[n].shape)} (build a new MaskSet for the new model)"
                )
            params[n] = current
        return params

    def _follow_replaced_params(self) -> None:
        """Re-point at parameters that replaced the tracked ones (same name, new object)."""
        changed = False
        for n, current in self._current_params().items():
            if current is self.params[n]:
                continue
            self.params[n] = current
            self.masks[n] = self.masks[n].to(current.device)
            changed = True
        if changed:
            self._refresh_shards()
            self._refresh_factors()
            if self._accumulate_hooks:  # they were on the parameters replaced
                self._hook_accumulation()

    @staticmethod
    def _check_optimizes_params(optimizer: torch.optim.Optimizer,
                                params: Mapping[str, torch.Tensor]) -> None:
        """Refuse an optimizer that holds none of the masked weights ``params`` (e.g. built
        on the parameters a ``load_state_dict(assign=True)`` replaced): it could not be
        masked. Where those weights are frozen (a LoRA base, whose zeros ``sparse_lora``
        keeps itself) the advice is to leave the masks out, not to rebuild the optimizer."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if params and not any(id(p) in held for p in params.values()):
            advice = ("they are frozen (requires_grad=False, as the base of sparse_lora, which "
                      "keeps its zeros itself): nothing trains them, so no masks need to be "
                      "attached" if not any(p.requires_grad for p in params.values())
                      else "build it from model.parameters() of the model these masks "
                      "belong to")
            raise ValueError(
                "optimizer holds none of the masked parameters "
                f"({', '.join(list(params)[:3])}{', …' if len(params) > 3 else ''}); {advice}"
            )

    @torch.no_grad()
    def _mask_grads(self) -> None:
        # an AND, not a multiply: a NaN or infinite gradient at a masked position times 0
        # stayed NaN, went into the weight and the optimizer's moments, and spread from there
        for n, p in self.params.items():
            if p.grad is not None:
                self._mask_grad(n, p)
        # a weight added to the optimizer (add_param_group: Lightning's BackboneFinetuning)
        # or unfrozen since: masked as it accumulates from the next backward on (its first
        # step's clipping saw it dense; it had gone unhooked for good)
        if self._to_accumulate() != self._accumulating:
            self._hook_accumulation()

    @torch.no_grad()
    def _after_step(self) -> None:
        # Elementwise optimizers left masked weights at +0.0; the AND pins them against the
        # rest. Their state needs no pinning: it accumulates only the masked gradients.
        # Optimizers that mix coordinates (Muon) moved masked weights; the AND makes each
        # of them +0.0 (a multiply by 0 kept -0.0 and NaN) and leaves every kept one as is.
        for n in self._factors:
            weight = local(self.params[n])
            _and_bits(weight, self._bits(n, weight))

    # -- validation -------------------------------------------------------------------

    def _check_not_removed(self, action: str) -> None:
        """Raise if :meth:`remove` dropped the masks, naming the call that came too late."""
        if self._removed:
            raise RuntimeError(
                f"MaskSet.{action}(): the masks were removed by remove(); build a new MaskSet "
                "to mask the model again"
            )

    @staticmethod
    def _check(masks: Mapping[str, torch.Tensor], params: Mapping, *, subset: bool = False,
               model: nn.Module) -> None:
        if not isinstance(masks, Mapping):
            raise ArgumentTypeError(
                f"masks must be a dict of name -> bool tensor, got {type(masks).__name__}"
            )
        for n, m in masks.items():
            if n not in params and (first := _shared_name(model, n)) is not None:
                # was "not a parameter of the model", of a parameter it holds
                raise ValueError(
                    f"masks has an entry {n!r} that names the parameter {first!r} by another "
                    "path (a module or weight shared under two names); accepted: one mask per "
                    f"weight, under {first!r}"
                )
            if n not in params:
                raise ValueError(
                    f"masks has an entry {n!r} that this MaskSet does not mask; it masks: "
                    f"{', '.join(params) or 'nothing'} (build a new MaskSet to mask others)"
                    if subset else
                    f"masks has an entry {n!r} that is not a parameter of the model; "
                    f"parameters: {', '.join(params)}"
                )
            check_mask(f"mask for {n!r}", m, params[n].shape)
            dtype = params[n].dtype
            # PyTorch masks no float8 tensor in place: apply() zeroed the layers before
            # one, then failed with a raw NotImplementedError
            if not maskable(dtype):
                raise ArgumentTypeError(
                    f"masks has an entry {n!r} for a parameter of dtype {dtype}, which cannot "
                    "be masked in place; accepted: parameters of other dtypes (float16, "
                    "bfloat16, float32, float64)"
                )

    def __repr__(self) -> str:
        return (
            f"MaskSet({len(self.masks)} tensors, sparsity={self.sparsity():.4f}, "
            f"pattern={self.pattern!r})"
        )


_KEEPING: weakref.WeakSet[MaskSet] = weakref.WeakSet()
"""The MaskSets attached to some optimizer now (see :func:`keeping`)."""


def keeping(optimizer: torch.optim.Optimizer) -> list[MaskSet]:
    """The MaskSets that keep their masks through ``optimizer``'s steps now (attached, not
    detached since): another schedule of the same weights must not fight them."""
    return [m for m in list(_KEEPING) if m._optimizers.get(id(optimizer)) is optimizer
            and m._hooked(optimizer)]


def check_mask(name: str, mask: object, shape: torch.Size | tuple[int, ...]) -> None:
    """Raise unless ``mask`` is a bool tensor of ``shape``; ``name`` says which mask.

    Only ``bool`` is a mask: a float or integer tensor has no single reading (is 0.5 kept?
    NaN? 3?), and converting one silently kept every nonzero. Convert with ``!= 0`` where
    that is what the values mean.
    """
    shape = tuple(shape)
    if not isinstance(mask, torch.Tensor):
        raise ArgumentTypeError(
            f"{name} must be a bool tensor of shape {shape}, got {type(mask).__name__}"
        )
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {shape}")
    if mask.dtype != torch.bool:
        raise ArgumentTypeError(
            f"{name} must be a bool tensor (True keeps), got dtype {mask.dtype}; "
            "convert with `mask != 0` if nonzero means kept"
        )
    if mask.layout != torch.strided:
        raise ArgumentTypeError(
            f"{name} must be a dense (strided) bool tensor, got layout {mask.layout}; "
            "convert with `.to_dense()`"
        )
    check_materialized(name, mask)


def maskable(dtype: torch.dtype) -> bool:
    """Whether a :class:`MaskSet` can mask a parameter of ``dtype`` in place: any but the
    float8 ones, which PyTorch cannot ``masked_fill_``."""
    return not is_float8(dtype)


def pattern_view(model: nn.Module, name: str, mask: torch.Tensor) -> torch.Tensor:
    """The mask of ``model``'s parameter ``name`` as patterns see it: ``(out, in)``, so the
    weight of a module that stores it ``(in, out)`` (GPT-2's ``Conv1D``) is transposed."""
    owner, _, attr = name.rpartition(".")
    transposed = attr == "weight" and stores_transposed(model.get_submodule(owner))
    return mask.t() if transposed else mask


def one_mask(table: Mapping[str, torch.Tensor], names: Sequence[str],
             weight: str) -> torch.Tensor:
    """The mask ``table`` gives the one ``weight`` that ``names`` (keys of ``table``) all
    name: tied parameters, a module reachable by several paths. ``ValueError`` naming two
    of them where their masks differ — a tensor has one mask, and which of several would
    otherwise win depends on the order of the table."""
    first = table[names[0]]
    for name in names[1:]:
        other = table[name]
        if other is not first and not torch.equal(other.to(first.device).bool(),
                                                  first.bool()):
            raise ValueError(f"masks[{names[0]!r}] and masks[{name!r}] name the same weight "
                             f"({weight}) but differ; pass one mask per weight")
    return first


def keeps_everything(mask: torch.Tensor) -> bool:
    """Whether ``mask`` prunes nothing. Such a mask is exempt from the pattern check, here
    (:class:`MaskSet`) and in :func:`sparsekit.load` alike: nothing is pruned yet, and any
    pattern can still be pruned from it."""
    return bool(mask.all())


def _check_follow(pattern: Pattern, masks: Mapping[str, torch.Tensor],
                  model: nn.Module) -> None:
    """Raise unless every mask of ``model`` follows ``pattern`` (seen as the pattern sees
    it, :func:`pattern_view`), as :func:`sparsekit.load` checks a saved one; a mask that
    :func:`keeps_everything` passes too.
    """
    for n, m in masks.items():
        m = pattern_view(model, n, m)
        pattern.check(m.shape, n)
        if not pattern.is_valid(m) and not keeps_everything(m):
            raise ValueError(
                f"mask for {n!r} does not follow pattern={str(pattern)!r}; prune with that "
                "pattern, or pass the pattern the masks have (e.g. 'unstructured')"
            )


def after_gradients(fn: Callable[[], None]) -> Callable[..., object]:
    """An optimizer step pre-hook that runs ``fn`` once the step's gradients exist.

    Usually they do when ``step()`` starts. A step given a ``closure`` computes them inside
    it (Lightning's automatic optimization, LBFGS) — until then ``.grad`` still holds the
    previous step's — so ``fn`` then runs after every call of the closure instead.
    """

    def hook(_optimizer: object, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        positional = len(args) > 1  # args[0] is the optimizer itself
        closure = args[1] if positional else kwargs.get("closure")
        if closure is None:
            fn()
            return None

        def closure_then_fn():
            loss = closure()
            fn()
            return loss

        if positional:
            return (args[0], closure_then_fn, *args[2:]), kwargs
        return args, {**kwargs, "closure": closure_then_fn}

    return hook


def first_names(model: nn.Module) -> dict[str, str]:
    """Every parameter name of ``model`` → the first name of its tensor, the one
    ``named_parameters()`` lists (a tied weight, or a module registered under two names,
    has several)."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(p), n)
            for n, p in model.named_parameters(remove_duplicate=False)}


def _shared_name(model: nn.Module, name: object) -> str | None:
    """The name ``model.named_parameters()`` gives the parameter that ``name`` reaches by
    another path (a module or a weight shared under two names), or ``None``."""
    first = first_names(model).get(name) if isinstance(name, str) else None
    return first if first != name else None


def _keep_bits(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` as integers of ``dtype``'s width: every bit set where kept, none where
    masked. ANDed into a tensor of ``dtype`` (:func:`_and_bits`) it leaves each kept value
    as it is, bit for bit, and makes each masked one +0.0, whatever it held (NaN and the
    infinities included, which a multiply by 0 keeps non-finite)."""
    bits = SAME_WIDTH_INT[dtype.itemsize]
    return mask.to(bits).mul_(255 if bits is torch.uint8 else -1)


def _several_ranks() -> bool:
    """Whether a process group of more than one rank is running."""
    return (torch.distributed.is_available() and torch.distributed.is_initialized()
            and torch.distributed.get_world_size() > 1)


def _masked_sparse(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A sparse COO gradient (``nn.Embedding(sparse=True)``: the rows looked up) with its
    masked entries +0.0, whatever they held: its values have no dense layout to AND bits
    into (a raw "Cannot access storage of SparseTensorImpl" before)."""
    grad = grad.coalesce()
    keep = mask[tuple(grad.indices())]  # (entries, *dense dims) of the values
    values = torch.where(keep, grad.values(), torch.zeros((), dtype=grad.dtype))
    return torch.sparse_coo_tensor(grad.indices(), values, grad.shape, is_coalesced=True,
                                   check_invariants=False)


def _and_bits(t: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``t`` with :func:`_keep_bits`'s ``bits`` ANDed into it, in place."""
    t.view(bits.dtype).bitwise_and_(bits)
    return t


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that holds parameter ``name`` directly, and its attribute name."""
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), attr


def _check_state_writable(optimizer: torch.optim.Optimizer,
                          params: Mapping[str, torch.Tensor]) -> None:
    """Raise unless the per-element state ``optimizer`` holds for ``params`` (by name), which
    :func:`_fill_state` zeroes in place, can be changed in place: an optimizer state loaded
    under ``torch.inference_mode`` failed ``attach`` with a raw ``RuntimeError`` once its
    hooks were registered, and ``update`` or ``load_state_dict`` half way through."""
    for n, p in params.items():
        for key, value in elementwise_state(optimizer, p).items():
            check_writable(f"optimizer state {key!r} of parameter {n!r}", value)


def elementwise_state(optimizer: torch.optim.Optimizer,
                      param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state tensors ``optimizer`` keeps per element of ``param``, by state key: those
    of ``param``'s shape (momenta, moments; not a step count), which follow its weights
    when they are masked, resampled, remapped or restored."""
    return {key: value for key, value in optimizer_state(optimizer).get(param, {}).items()
            if isinstance(value, torch.Tensor) and value.shape == param.shape}


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, dict]:
    """The per-parameter state ``optimizer`` steps with: its ``state``, or for a
    ``ZeroRedundancyOptimizer``, whose own ``state`` stays empty, that of the optimizer it
    runs on this rank's shard of the parameters (``.optim``). Read through ``.state`` alone,
    the moments of masked and regrown weights were never zeroed under ZeRO."""
    if torch.distributed.is_available():
        from torch.distributed.optim import ZeroRedundancyOptimizer
        if isinstance(optimizer, ZeroRedundancyOptimizer):
            return optimizer.optim.state
    return optimizer.state


def _fill_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, where: torch.Tensor) -> None:
    """Zero the per-element optimizer state of ``param`` (momenta, moments) at ``where``
    (this rank's part, when the state is sharded like ``param``)."""
    for value in elementwise_state(optimizer, param).values():
        local(value).masked_fill_(where, 0)
