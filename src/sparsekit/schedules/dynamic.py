"""Dynamic sparse training: drop and regrow connections while training.

Every method is the same loop — every ``every`` steps, drop the weakest active
weights of each layer and grow as many inactive ones — and differs only in its rules,
so each is a small :class:`DropGrow` subclass (as in jaxpruner):

=========  ==========================================  ==================================
method     drop                                        grow
=========  ==========================================  ==================================
set        smallest |w| (Mocanu et al. 2018)           uniformly at random
rigl       smallest |w| (Evci et al. 2020)             largest |dense gradient|
snfs       smallest |w|; the regrowth is shared over   largest |momentum of the dense
           layers by mean momentum (Dettmers &         gradient|
           Zettlemoyer 2019)
granet     global magnitude pruning on a cubic         largest |dense gradient|
           schedule from ``initial_sparsity``, then
           RigL's drop (Liu et al. 2021)
srigl      smallest |w| per neuron: constant fan-in;   largest |dense gradient| per
           neurons with too few salient weights are    neuron (Lasby et al. 2023)
           ablated (Lasby et al. 2023)
=========  ==========================================  ==================================

On a model with :class:`~sparsekit.SparseLinear` layers the same rules change those layers'
stored structure instead of a mask (truly sparse training): each layer is seen as a dense
weight view and a mask, and the dense gradient the grow rules score is computed by the
layer only for the backward passes that need it (every step for SNFS's momentum).

Decisions depend only on weights, gradients and a seeded generator, and every rank makes
them from the same numbers. Under ``DistributedDataParallel`` gradients (the dense ones a
``SparseLinear`` captures included) are averaged over the ranks before the optimizer step,
so every rank computes bitwise the same masks; the random stream is seeded identically on
all ranks. A ``SparseLinear`` that SNFS or SRigL resizes gets DDP a new gradient reducer.
Under FSDP2 (``fully_shard``) weights, gradients and momenta are ``DTensor`` shards (the
gradients already averaged by FSDP's reduce-scatter): the rules read them whole (gathered
from every rank, :func:`sparsekit.distributed.full`), the masks are whole and the same on
every rank, and :class:`~sparsekit.MaskSet` applies them to each rank's shard.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from sparsekit._checks import (
    ArgumentTypeError,
    check_finite,
    check_fraction,
    check_int,
    check_module,
    check_optimizer,
    check_seed,
    check_sparsity,
    renamed,
    renamed_attribute,
)
from sparsekit.allocation import ALLOCATIONS
from sparsekit.distributed import full, shard_like, unsharded
from sparsekit.engine.structure_set import StructureSet, sparse_layers
from sparsekit.masks import Masks, MaskSet, after_gradients, keeping
from sparsekit.patterns import FanIn, fan_in_split
from sparsekit.prune import compute_masks
from sparsekit.registry import Registry
from sparsekit.schedules.base import check_state, check_tensors
from sparsekit.schedules.gradual import check_initial_sparsity, cubic_sparsity
from sparsekit.select import top_k
from sparsekit.targets import resolve_targets

METHODS: Registry = Registry("method")
_ATTACHED: weakref.WeakSet[DynamicSparsity] = weakref.WeakSet()
"""The DynamicSparsity instances attached to their optimizer and not detached since (see
``check_attach``)."""
DROP_SCHEDULES = ("cosine", "linear", "constant")
MaskDict = dict[str, torch.Tensor]


def drop_fraction_at(step: int, *, initial: float, end_step: int, schedule: str) -> float:
    """The fraction of active weights replaced at ``step`` (0 from ``end_step`` on)."""
    if step >= end_step:
        return 0.0
    if schedule == "cosine":
        return initial / 2 * (1 + math.cos(math.pi * step / end_step))
    if schedule == "linear":
        return initial * (1 - step / end_step)
    return initial


def check_holds(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                names: list[str]) -> None:
    """Raise unless ``optimizer`` holds one of ``params`` (the weights named ``names``).

    DynamicSparsity reads their gradients in a hook of ``optimizer`` and keeps their masks
    through its steps; an optimizer built on other weights (another model, parameters a
    ``load_state_dict(assign=True)`` replaced) would do neither, so it is refused before
    any hook goes on it.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in params):
        raise ValueError(
            f"optimizer holds none of the weights DynamicSparsity trains ({', '.join(names[:3])}"
            f"{', …' if len(names) > 3 else ''}); build it from model.parameters() of this model"
        )


def trainable_targets(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str] | None:
    """The names of the default targets of ``model`` that require gradients and that
    ``optimizer`` holds, or ``None`` (all of them) where each does; raise where all are
    frozen, or where the optimizer holds none of the others.

    A weight the optimizer does not hold never trains: the connections dropped from it
    were real weights, those grown into it stayed zero, and its gradient, which the
    optimizer's ``zero_grad`` leaves alone, summed over every step for RigL to grow by.
    """
    chosen = resolve_targets(model)
    trainable = [t for t in chosen if t.param.requires_grad]
    if chosen and not trainable:
        raise ValueError(
            f"every weight DynamicSparsity would train is frozen (requires_grad=False: "
            f"{', '.join(t.name for t in chosen[:3])}{', …' if len(chosen) > 3 else ''}); "
            "unfreeze those it should train sparse"
        )
    if trainable:
        check_holds(optimizer, [t.param for t in trainable], [t.name for t in trainable])
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trained = [t.name for t in trainable if id(t.param) in held]
    return None if len(trained) == len(chosen) else trained


class DynamicSparsity:
    """Train ``model`` sparse while moving its connections (SET, RigL, SNFS, GraNet, SRigL).

    Starts from a random mask with the given ``allocation`` (ERK by default; GraNet starts
    at ``initial_sparsity``, at most ``sparsity``). ``optimizer`` (positional or
    ``optimizer=``) is required: the dense gradients are read just before its steps and the
    masks kept through them. Call :meth:`step` after every ``optimizer.step()``; every
    ``every`` steps until ``end_step`` (``update_every=`` is its deprecated spelling)
    ``method`` drops and regrows. Weights grown where the mask was pruned start at zero
    and their optimizer state is reset; a weight dropped and grown back in the same update
    keeps its value (as RigL's reference code does: only newly active positions are new).
    SET and RigL keep each layer's number of active weights exactly; SNFS keeps the total
    while layers trade weights; GraNet follows its pruning schedule; SRigL keeps a constant
    fan-in per surviving neuron.

    Frozen module weights (``requires_grad=False``) are no targets and stay as they are:
    they have no gradient to grow by, and dropping their connections would change weights
    training leaves alone; nor are weights that ``optimizer`` does not hold, which no step
    trains. :meth:`detach` stops reading the optimizer's gradients and
    keeping the masks through its steps, until :meth:`attach`.

    If ``model`` has :class:`~sparsekit.SparseLinear` layers, those are the targets (other
    layers stay dense) and their current structures are the starting masks; updates go
    through :meth:`SparseLinear.set_structure` with ``optimizer``, so surviving weights
    keep their optimizer state. ``sparsity`` and ``allocation`` then only describe the
    layers as built. GraNet, which prunes with :func:`sparsekit.prune`'s global magnitude
    pass over module weights, is not available for them.
    """

    @renamed(update_every="every")
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        sparsity: float,
        *,
        method: str = "rigl",
        allocation: str = "erk",
        every: int = 100,
        drop_fraction: float = 0.3,
        drop_schedule: str = "cosine",
        end_step: int,
        seed: int = 0,
        momentum: float = 0.9,
        initial_sparsity: float = 0.5,
        salient_fraction: float = 0.3,
    ) -> None:
        check_module("model", model)  # a state dict was a raw AttributeError
        if optimizer is None:
            raise ValueError(
                "DynamicSparsity needs the training optimizer (optimizer=): it reads the "
                "gradients before each step and keeps the masks through it"
            )
        optimizer = check_optimizer(optimizer)
        check_sparsity(sparsity)
        rule = METHODS.get(method)
        ALLOCATIONS.get(allocation)
        if not isinstance(drop_schedule, str):  # a list was "unknown", as if misspelt
            raise ArgumentTypeError(f"drop_schedule must be a string, one of: "
                                    f"{', '.join(DROP_SCHEDULES)}; got {drop_schedule!r}")
        if drop_schedule not in DROP_SCHEDULES:
            raise ValueError(
                f"unknown drop_schedule {drop_schedule!r}; accepted: {', '.join(DROP_SCHEDULES)}"
            )
        check_fraction("drop_fraction", drop_fraction, zero=False)
        check_int("every", every, minimum=1)
        check_int("end_step", end_step, minimum=1)
        if every >= end_step:  # updates at 0 < step < end_step that are multiples of every
            warnings.warn(f"every={every} is not below end_step={end_step}: DynamicSparsity "
                          "will never change its masks (static sparse training); pass a "
                          "smaller every or a later end_step", UserWarning,
                          stacklevel=3)  # the caller, past the @renamed wrapper
        check_seed("seed", seed)
        check_fraction("momentum", momentum)
        check_sparsity(initial_sparsity, "initial_sparsity")
        if method == "granet":  # the only method that starts at initial_sparsity
            check_initial_sparsity(initial_sparsity, sparsity)
        check_fraction("salient_fraction", salient_fraction, one=True)
        sparse = bool(sparse_layers(model))
        if sparse and method == "granet":
            raise ValueError(
                "method 'granet' does not support SparseLinear layers; accepted for them: "
                + ", ".join(m for m in METHODS.names() if m != "granet")
            )
        self.model, self.optimizer, self.method = model, optimizer, method
        self.sparsity, self.initial_sparsity = sparsity, initial_sparsity
        self.allocation, self.every, self.end_step = allocation, every, end_step
        self.drop_fraction, self.drop_schedule, self.beta = drop_fraction, drop_schedule, momentum
        self.salient_fraction = salient_fraction
        self.seed = int(seed)  # a NumPy int passes check_seed; manual_seed takes Python ints
        # A stream of its own: reusing the initial mask's stream would regrow the very
        # positions that scored highest at initialisation.
        self.generator = torch.Generator().manual_seed(self.seed + 1_000_003)
        self.rule: DropGrow = rule(self)
        self.step_count = 0
        self._targets = None if sparse else trainable_targets(model, optimizer)
        if sparse:
            self.masks: Masks = StructureSet(model)
        else:
            with unsharded(model):  # FSDP2: the starting masks are drawn for whole weights
                initial = self.rule.initial_masks()
            self.masks = MaskSet(model, initial)
            self.masks.schedule, self.masks.regrows = type(self).__name__, True
        check_holds(optimizer, self._trained(), list(self.masks.masks))
        self._most = None if sparse else self._kept_at_most()
        self._grads: MaskDict = {}
        self._momenta = {n: torch.zeros_like(p) for n, p in self.masks.params.items()}
        self._hook: RemovableHandle | None = None
        self._removed = False  # set by remove(): its masks are gone, nothing to attach
        self.attach(optimizer)

    update_every = renamed_attribute("update_every", "every")

    def _trained(self) -> list[torch.Tensor]:
        """The parameters the optimizer trains for the masks: the weights, or the stored
        values of sparse layers (whose dense weights are built on every access)."""
        if isinstance(self.masks, StructureSet):
            return [layer.values for layer in self.masks.layers.values()]
        return list(self.masks.params.values())

    def attach(self, optimizer: torch.optim.Optimizer) -> DynamicSparsity:
        """Read the gradients before every step of ``optimizer`` and keep the masks through
        it again, after :meth:`detach` (the constructor attaches it); attaching twice does
        nothing. Only the optimizer given to the constructor is accepted: the momenta and
        the optimizer state the updates reset are that optimizer's; and only while no other
        DynamicSparsity of the same weights is attached to it (both masks held through every
        step)."""
        self.check_attach(optimizer)
        if self._hook is None:
            # Registered before the masks' hooks, so it sees the dense gradients.
            self._hook = self.optimizer.register_step_pre_hook(after_gradients(self._capture))
        self.masks.attach(self.optimizer)
        _ATTACHED.add(self)
        self._arm_capture()
        return self

    def check_attach(self, optimizer: object, *,
                     names: Iterable[str] | None = None) -> torch.optim.Optimizer:
        """Raise what :meth:`attach` of ``optimizer`` would raise, changing nothing (its
        masks' refusals included: check it before loading a state, as
        :func:`sparsekit.integrations.attach` does); ``names`` are the masks' names once
        that state is loaded. Returns the optimizer it would hook."""
        self._check_not_removed("attach")
        real = check_optimizer(optimizer)
        if real is not self.optimizer:
            raise ValueError(
                "optimizer must be the one this DynamicSparsity was built on; build a new "
                "DynamicSparsity for another optimizer"
            )
        own = {id(p) for p in self._trained()}
        for other in list(_ATTACHED):
            if other is not self and other.optimizer is real and other._hooked() and any(
                    id(p) in own for p in other._trained()):
                # both kept their masks through every step: the weights were pruned by the
                # union of two masks (a cell run twice), and the other one never updated
                raise ValueError(
                    "optimizer is attached to another DynamicSparsity of these weights (built "
                    "twice on one model?); accepted: an optimizer no other DynamicSparsity "
                    "drives: remove() or detach() the other one first"
                )
        for other in keeping(real):
            if other is not self.masks and any(id(p) in own for p in other.params.values()):
                # its after-step hook zeroed every connection this one regrew, silently
                raise ValueError(
                    "optimizer keeps another MaskSet of these weights through its steps "
                    f"({', '.join(list(other.masks)[:3])}): it would zero every connection "
                    "DynamicSparsity regrows; accepted: an optimizer no other MaskSet of these "
                    "weights is attached to — detach it first (masks.detach(optimizer)); "
                    "DynamicSparsity keeps masks of its own"
                )
        check = getattr(self.masks, "check_attach", None)  # a StructureSet holds no hooks
        if check is not None:
            check(real, names=names)
        return real

    def _hooked(self) -> bool:
        """Whether its gradient-reading hook is on the optimizer now (one that failed to
        attach, through :func:`sparsekit.integrations.attach`, had it taken off there)."""
        return self._hook is not None and self._hook.id in self.optimizer._optimizer_step_pre_hooks

    def _check_not_removed(self, action: str) -> None:
        if self._removed:
            raise RuntimeError(f"DynamicSparsity.{action}(): it was removed by remove(); build "
                               "a new DynamicSparsity to train sparse again")

    def detach(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Stop reading gradients before ``optimizer``'s steps (by default: the one it was
        built on, the only one it reads) and keeping the masks through them; sparse layers
        stop computing dense gradients. The masks, momenta and step count stay, for
        :meth:`attach`. Detaching twice does nothing."""
        if optimizer is not None and check_optimizer(optimizer) is not self.optimizer:
            raise ValueError(
                "optimizer must be the one this DynamicSparsity was built on (or None); "
                "it reads no other"
            )
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        _ATTACHED.discard(self)
        self.masks.capture(False)
        detach = getattr(self.masks, "detach", None)
        if detach is not None:  # a StructureSet holds no hooks on the optimizer
            detach(self.optimizer)

    def is_update_step(self, step: int) -> bool:
        return step % self.every == 0 and 0 < step < self.end_step

    def step(self) -> bool:
        """Advance one step; at update steps drop and regrow. Returns whether it updated.

        An update that lacks the dense gradients it grows by (no optimizer step since the
        last update, or detached), that would read NaN or inf (weights, dense gradients,
        momenta: a diverged training), or that its masks refuse, raises before the step
        count or any mask changes; so does a step after :meth:`remove`. The exception is
        an optimizer step that a ``torch.amp.GradScaler`` skipped because the gradients
        overflowed (no step ran and some gradient it holds is infinite or NaN): the update
        waits for the next step that runs, and this call changes nothing and returns
        ``False`` — so the usual mixed-precision loop (``scaler.step(optimizer)``,
        ``scaler.update()``, ``step()``) needs no test of its own."""
        self._check_not_removed("step")
        upcoming = self.step_count + 1
        if self.is_update_step(upcoming):
            if self.rule.needs_grads and self._skipped_by_scaler():
                return False
            if self.rule.needs_grads:
                self._check_grads(self.masks.masks)
            self._check_finite()
            check = getattr(self.masks, "check_update", None)
            if check is not None:  # masks removed, a weight replaced by one of another shape
                check({})
        self.step_count = upcoming
        self._arm_capture()
        if not self.is_update_step(self.step_count):
            return False
        fraction = drop_fraction_at(self.step_count, initial=self.drop_fraction,
                                    end_step=self.end_step, schedule=self.drop_schedule)
        self.masks.update(self.rule.update(fraction))
        self._grads.clear()
        return True

    def _skipped_by_scaler(self) -> bool:
        """Whether the optimizer step before this update did not run because its gradients
        overflowed, as a ``GradScaler`` skips it: attached, no dense gradient captured, and
        an infinite or NaN gradient among the optimizer's parameters. (Without an overflow
        a missing gradient is a step() without optimizer.step(), which :meth:`_check_grads`
        refuses.)"""
        if self._hook is None or all(n in self._grads for n in self.masks.masks):
            return False
        return any(p.grad is not None and not bool(torch.isfinite(p.grad).all())
                   for group in self.optimizer.param_groups for p in group["params"])

    def _check_finite(self) -> None:
        """Raise before an update that would read NaN or inf: a weight the drop ranks by
        magnitude, a dense gradient RigL, GraNet and SRigL grow by, a momentum SNFS grows
        and shares the regrowth by. NaN ranks above every number, so such entries were kept
        or regrown silently (SNFS failed with a raw "cannot convert float NaN to integer"
        after its step count had moved)."""
        hint = ("the training diverged (a NaN or inf loss or gradient: lower the learning "
                "rate or clip the gradients); DynamicSparsity.step() changed nothing")
        for n in self.masks.masks:  # whole tensors, in one order on every rank (FSDP2)
            check_finite(f"weight {n!r}", self.weight(n), hint=hint)
            if self.rule.needs_grads:
                check_finite(f"the dense gradient of {n!r}", self.dense_grad(n), hint=hint)
            if self.rule.needs_momenta:
                check_finite(f"the gradient momentum of {n!r}", self.momentum(n), hint=hint)

    def _arm_capture(self) -> None:
        """Ask the masks for dense gradients only for the steps whose rule reads them: the
        momenta (SNFS) until the updates end, the gradient (RigL) of each update step. Past
        ``end_step`` nothing reads them, and sparse layers asked for dense gradients would
        compute them in every backward pass for nothing; nor does anything read them while
        detached (:meth:`detach`)."""
        if self._hook is None:
            return
        upcoming = self.is_update_step(self.step_count + 1)
        self.masks.capture(bool((self.rule.needs_momenta and self._updates_ahead())
                                or (self.rule.needs_grads and upcoming)))

    def _updates_ahead(self) -> bool:
        """Whether an update may come at the next step or later (one comes before
        ``end_step``)."""
        return self.step_count + 1 < self.end_step

    def weight(self, name: str) -> torch.Tensor:
        """The whole current weight ``name`` (dense, zeros where masked), detached."""
        return full(self.masks.params[name].detach())

    def dense_grad(self, name: str) -> torch.Tensor:
        """The whole dense (unmasked) gradient of ``name`` captured before this update's step."""
        self._check_grads((name,))
        return full(self._grads[name])

    def _check_grads(self, names: Iterable[str]) -> None:
        """Raise unless the dense gradients of ``names`` were captured for this update."""
        if self._hook is None and any(name not in self._grads for name in names):
            raise RuntimeError(
                f"{self.method} needs the dense gradient at update steps, which a detached "
                "DynamicSparsity does not read: attach(optimizer) again before stepping it "
                "(its step count did not change)"
            )
        missing = [name for name in names if name not in self._grads]
        if missing and self._grads:  # captured, but these got none in the backward pass
            raise ValueError(
                f"{self.method} grows by the dense gradient, and {missing[0]!r} had none at "
                f"this update (step {self.step_count + 1}): its layer did not take part in "
                "the loss, or it is frozen (requires_grad=False); leave it out of the masks "
                "(exclude=) or train it; nothing was changed")
        if missing:
            raise RuntimeError(
                f"{self.method} needs the dense gradient at update steps: call step() after "
                "every optimizer.step() of the optimizer given to DynamicSparsity"
            )

    def momentum(self, name: str) -> torch.Tensor:
        """The whole momentum of the dense gradient of ``name`` (what SNFS grows by)."""
        return full(self._momenta[name])

    @torch.no_grad()
    def _capture(self) -> None:
        upcoming = self.step_count + 1
        for n, g in self.masks.dense_grads().items():
            if g is None:
                continue
            if self.rule.needs_momenta and self._updates_ahead():
                self._momenta[n].mul_(self.beta).add_(g, alpha=1 - self.beta)
            if self.rule.needs_grads and self.is_update_step(upcoming):
                self._grads[n] = g.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        """The step, masks, random stream and momenta; whole tensors, the same on every rank;
        and the settings they follow (:meth:`settings`)."""
        return {"step": self.step_count, "masks": self.masks.state_dict(),
                "generator": self.generator.get_state(),
                "momenta": {n: full(m).clone() for n, m in self._momenta.items()},
                "settings": self.settings()}

    def settings(self) -> dict[str, Any]:
        """What the run's masks depend on, which a resumed run must share."""
        return {"method": self.method, "sparsity": float(self.sparsity),
                "initial_sparsity": float(self.initial_sparsity),
                "allocation": self.allocation, "every": int(self.every),
                "end_step": int(self.end_step), "drop_fraction": float(self.drop_fraction),
                "drop_schedule": self.drop_schedule}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; a state it cannot come from (NaN momenta among
        them, masks of a run at a lower sparsity or another allocation) changes nothing."""
        self._check_not_removed("load_state_dict")
        check_state(self, state, ("generator", "momenta"), self.settings())
        try:  # a scratch generator checks the state exactly as ours would take it
            torch.Generator().set_state(state["generator"])
        except (TypeError, RuntimeError) as e:
            raise ArgumentTypeError(f"state['generator'] must be the tensor torch.Generator."
                                    f"get_state() returns, got {state['generator']!r:.80}: {e}"
                                    ) from e
        check_tensors("momenta", state["momenta"], self._momenta)
        for n, m in state["momenta"].items():  # SNFS grows by them: NaN was regrown first
            check_finite(f"state['momenta'][{n!r}]", m,
                         hint="a state of a diverged run, or edited; nothing was loaded")
        self._check_same_run(state["masks"])
        self.masks.load_state_dict(state["masks"])
        self.step_count = int(state["step"])
        self.generator.set_state(state["generator"])
        # in the dtype and on the device of the momenta they replace (a state saved on
        # another device, or cast): accumulating into them then rounds as before
        self._momenta = {n: shard_like(m.to(device=self.masks.params[n].device,
                                            dtype=self._momenta[n].dtype, copy=True),
                                       self.masks.params[n])
                         for n, m in state["momenta"].items()}
        self._arm_capture()

    def _kept_at_most(self) -> tuple[dict[str, int] | None, int]:
        """The most weights the masks ever keep: of each layer (``None`` where the
        allocation splits by scores) and in total — what the allocation keeps at the
        starting sparsity (``initial_sparsity`` for GraNet) on a dense model, before which
        no method grows (a model's own zeros only lower it). An allocation by scores may
        round each layer's count up by one."""
        start = self.initial_sparsity if self.method == "granet" else self.sparsity
        shapes = {n: m.shape for n, m in self.masks.masks.items()}
        most = self._allocated(shapes, start)
        if most is None:
            size = sum(math.prod(shape) for shape in shapes.values())
            return None, round(size * (1.0 - start)) + len(shapes)
        return most, sum(most.values())

    def _allocated(
        self, shapes: Mapping[str, torch.Size], sparsity: float
    ) -> dict[str, int] | None:
        """The weights the allocation keeps of each layer of ``shapes`` at ``sparsity`` on a
        dense model; ``None`` where it splits by scores."""
        if ALLOCATIONS.meta(self.allocation)["uses_scores"]:
            return None
        # scores of the layers' shapes without their memory (these allocations read shapes)
        return ALLOCATIONS.get(self.allocation)(
            {n: torch.zeros(()).expand(shape) for n, shape in shapes.items()}, float(sparsity))

    def _check_same_run(self, saved: Mapping[str, Any]) -> None:
        """Raise unless the masks state ``saved`` can come from a run of this
        DynamicSparsity's sparsity and allocation: masks of the same pattern, keeping no
        more weights (of a layer, for the methods that move weights within each layer only;
        in total) than its allocation does (:meth:`_kept_at_most`). The state of a run at a
        lower sparsity or another allocation was loaded without a word, and trained on at
        the state's sparsity while ``sparsity`` said another (GraNet pruned towards this
        one). Masks of the wrong shape or dtype are left for the masks' own
        ``load_state_dict`` to name; sparse layers' structures are the model's own."""
        pattern = saved.get("pattern", self.masks.pattern)
        if pattern != self.masks.pattern:
            raise ValueError(f"state['masks'] holds masks of pattern {pattern!r}, this "
                             f"DynamicSparsity trains {self.masks.pattern!r} ones; nothing was "
                             "loaded")
        masks = saved["masks"]
        if self._most is None or not all(
                isinstance(m, torch.Tensor) and m.dtype == torch.bool and not m.is_meta
                and m.shape == self.masks.masks[n].shape for n, m in masks.items()):
            return
        counts = {n: int(m.sum()) for n, m in masks.items()}
        most, total = self._most
        within_layers = most is not None and self.method not in ("snfs", "granet")
        over = [n for n in counts if counts[n] > most[n]] if within_layers else []
        if over:
            names, ours = over[:1], most[over[0]]
        elif sum(counts.values()) > total:
            names, ours = list(counts), total
        else:
            return
        size = sum(self.masks.masks[n].numel() for n in names)
        theirs = sum(counts[n] for n in names)
        where = f"of {names[0]!r}" if len(names) == 1 else "in total"
        raise ValueError(
            f"state['masks'] keeps {theirs} of {size} weights {where} (sparsity "
            f"{1 - theirs / size:.4g}), more than this DynamicSparsity (method={self.method!r}, "
            f"sparsity={self.sparsity!r}, allocation={self.allocation!r}) ever keeps there "
            f"({ours}, sparsity {1 - ours / size:.4g}): the state of a run at a lower sparsity "
            "or another allocation; accepted: the state of a DynamicSparsity built with the "
            "same sparsity and allocation; nothing was loaded")

    def remove(self) -> None:
        """Stop updating and stop enforcing the masks (the weights stay sparse); it cannot
        be attached again."""
        self.detach()
        self.masks.remove()
        self._removed = True


class DropGrow:
    """SET: drop the smallest |w| of each layer, grow as many uniformly at random."""

    needs_grads = False
    needs_momenta = False

    def __init__(self, ds: DynamicSparsity) -> None:
        self.ds = ds

    def initial_masks(self) -> MaskDict:
        masks, _ = compute_masks(self.ds.model, self.ds.sparsity, method="random",
                                 allocation=self.ds.allocation, seed=self.ds.seed,
                                 targets=self.ds._targets)
        return masks

    def grow_scores(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return torch.rand(w.shape, generator=self.ds.generator).to(w.device)

    def grow_counts(self, drops: dict[str, int]) -> dict[str, int]:
        return drops

    @torch.no_grad()
    def update(self, fraction: float) -> MaskDict:
        masks = self.ds.masks.masks
        drops = {n: round(fraction * int(m.sum())) for n, m in masks.items()}
        grows = self.grow_counts(drops)
        new = {}
        for n, mask in masks.items():
            w = self.ds.weight(n)
            kept = top_k(w.abs().float(), int(mask.sum()) - drops[n], allowed=mask)
            new[n] = kept | top_k(self.grow_scores(n, w), grows[n], allowed=~kept)
        return new


@METHODS.register("set")
class SET(DropGrow):
    pass


@METHODS.register("rigl")
class RigL(DropGrow):
    """Grow where the dense gradient is largest."""

    needs_grads = True

    def grow_scores(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return self.ds.dense_grad(name).abs().float()


@METHODS.register("snfs")
class SNFS(DropGrow):
    """Grow by momentum; share the regrowth over layers by their mean momentum."""

    needs_momenta = True

    def grow_scores(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return self.ds.momentum(name).abs().float()

    def grow_counts(self, drops: dict[str, int]) -> dict[str, int]:
        masks = self.ds.masks.masks
        contrib = {n: float(self.ds.momentum(n).abs()[m].mean()) if m.any() else 0.0
                   for n, m in masks.items()}
        total, norm = sum(drops.values()), sum(contrib.values())
        if norm == 0:
            return drops
        room = {n: m.numel() - int(m.sum()) + drops[n] for n, m in masks.items()}
        share = {n: min(room[n], math.floor(total * c / norm)) for n, c in contrib.items()}
        left = total - sum(share.values())
        for n in sorted(masks, key=lambda n: contrib[n], reverse=True):  # rounding remainder
            extra = min(left, room[n] - share[n])
            share[n] += extra
            left -= extra
        return share


@METHODS.register("granet")
class GraNet(RigL):
    """Prune gradually (global magnitude, cubic schedule from ``initial_sparsity`` at step 0
    to ``sparsity`` at the last update), then RigL's drop and grow."""

    def initial_masks(self) -> MaskDict:
        masks, _ = compute_masks(self.ds.model, self.ds.initial_sparsity, method="random",
                                 allocation=self.ds.allocation, seed=self.ds.seed,
                                 targets=self.ds._targets)
        return masks

    @torch.no_grad()
    def update(self, fraction: float) -> MaskDict:
        ds = self.ds
        # the schedule ends at the last update, as the paper's t0 + nΔt: ending it at
        # end_step left the last update short of `sparsity` (by 0.015 with every=100,
        # end_step=150), and nothing pruned past it
        last = (ds.end_step - 1) // ds.every * ds.every
        target = cubic_sparsity(ds.step_count, initial=ds.initial_sparsity, final=ds.sparsity,
                                start=0, end=last)
        with unsharded(ds.model):
            pruned, _ = compute_masks(ds.model, target, method="magnitude",
                                      allocation="global", targets=list(ds.masks.masks))
        ds.masks.update({n: m & ds.masks.masks[n] for n, m in pruned.items()})
        return super().update(fraction)


@METHODS.register("srigl")
class SRigL(RigL):
    """Constant fan-in RigL: every surviving neuron keeps the same number of inputs.

    A neuron whose salient weights (among the layer's largest kept magnitudes and largest
    other gradients, as many as the live neurons keep and grow: counted over the layer, as
    the paper does) number fewer than ``salient_fraction`` of its fan-in is ablated, and its
    budget shared by the remaining neurons through the ``fanin`` pattern (fan-in = budget //
    neurons); the most salient neurons always survive in the number the budget needs. A
    budget smaller than the layer's neurons keeps that many neurons with fan-in 1, so no
    layer starts or ends cut off.
    """

    def initial_masks(self) -> MaskDict:
        """A random constant fan-in mask of each layer's budget on a dense model, drawn
        among the nonzero weights first, as every method's start: drawn among all of them,
        it zeroed kept weights of a model already pruned or loaded from a checkpoint before
        the schedule was built (a resume lost them), and a budget counted on the nonzero
        weights shrank the fan-in of a resumed model whose grown weights were still 0."""
        base = super().initial_masks()
        budgets = self.ds._allocated({n: m.shape for n, m in base.items()}, self.ds.sparsity)
        masks = {}
        for n, m in base.items():
            scores = torch.rand(m.shape, generator=self.ds.generator)
            dead = self.ds.model.get_parameter(n).detach() == 0
            masks[n] = FanIn().mask(scores.masked_fill(dead.to(scores.device), -torch.inf),
                                    int(m.sum()) if budgets is None else budgets[n])
        return masks

    @torch.no_grad()
    def update(self, fraction: float) -> MaskDict:
        new = {}
        for n, mask in self.ds.masks.masks.items():
            w = self.ds.weight(n).abs().float().flatten(1)
            m2 = mask.flatten(1)
            alive = m2.any(1)
            lives = int(alive.sum())
            budget = int(mask.sum())
            _, fan_in = fan_in_split(budget, lives, m2.shape[1])
            drop = round(fraction * fan_in)
            kept = top_k(w, fan_in - drop, allowed=m2, dim=1)
            grad = self.ds.dense_grad(n).abs().float().flatten(1)
            # salient as the paper counts them, over the whole layer: its largest kept |w|
            # and largest other |grad|, as many as the live neurons keep and grow. Counted
            # row by row, every live neuron had fan_in - drop of them and none was ever
            # ablated at the default fractions.
            heavy = top_k(w, (fan_in - drop) * lives, allowed=m2)
            top_grad = top_k(grad, drop * lives, allowed=~heavy)
            salient = (heavy | top_grad).sum(1).masked_fill(~alive, -1)
            passing = alive & (salient >= self.ds.salient_fraction * fan_in)
            # Never ablate so many neurons that the budget no longer fits in the rest.
            needed = min(-(-budget // m2.shape[1]), lives)
            if int(passing.sum()) < needed:
                passing = top_k(salient.float(), needed, allowed=alive)
            alive = passing
            score = torch.where(kept, torch.inf, grad)  # keep survivors, then best gradients
            ablated = score.masked_fill(~alive[:, None], float("-inf"))
            new[n] = FanIn().mask(ablated, budget).reshape(mask.shape)
        return new
