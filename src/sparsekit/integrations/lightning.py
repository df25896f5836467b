"""``SparsityCallback``: masks and schedules inside a Lightning ``Trainer``.

::

    masks = sparsekit.prune(module, 0.5)           # or GradualPruner(...), or a function
    trainer = lightning.pytorch.Trainer(max_steps=1000, callbacks=[SparsityCallback(masks)])
    trainer.fit(module, loader)                    # masked weights stay exactly zero

A :class:`~sparsekit.DynamicSparsity` needs the optimizer that
``configure_optimizers`` returns inside ``fit``; pass a function that builds it::

    SparsityCallback(lambda module, opt: DynamicSparsity(module, opt, 0.9, end_step=1000))
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from typing import Any

try:
    from lightning.pytorch import Callback
except ModuleNotFoundError as exc:  # a missing dependency of lightning is reported as is
    if (exc.name or "").partition(".")[0] != "lightning":
        raise
    raise ImportError("sparsekit.integrations.lightning needs Lightning, which is not "
                      "installed: pip install 'lightning>=2.4' (sparsekit has no extra for "
                      "it)") from exc

from sparsekit._checks import ArgumentTypeError
from sparsekit.integrations.training import Sparsity, TrainingSparsity

__all__ = ["SparsityCallback"]


class SparsityCallback(TrainingSparsity, Callback):
    """Attach ``sparsity`` to the ``LightningModule``'s optimizer when training starts,
    step its schedule after every optimizer step and detach when training ends.

    ``sparsity`` is a ``MaskSet``, a schedule or a function ``(module, optimizer) -> one
    of them`` (see :data:`sparsekit.integrations.Sparsity`). The module must train with
    one optimizer. After training, :attr:`masks` and :attr:`schedule` are what was trained.
    Checkpoints hold their state, so ``fit(ckpt_path=...)`` resumes the schedule exactly.

    Several of them train one module when each is given masks or a schedule of other
    weights: their :attr:`state_key` is made of the names of those weights, so that each
    resumes its own state. Lightning refuses two of the same key (two functions, whose
    weights are known only once they have run, or two sparsities of the same weights).
    """

    _restored: dict[str, Any] | None = None

    def __init__(self, sparsity: Sparsity) -> None:
        super().__init__(sparsity)
        masks = getattr(sparsity, "masks", None)  # a MaskSet's dict, or a schedule's masks
        names = getattr(masks, "masks", masks)
        self._key = self.__class__.__qualname__ if not isinstance(names, Mapping) else (
            self._generate_state_key(weights=len(names), names=hashlib.blake2b(
                "\n".join(sorted(names)).encode(), digest_size=6).hexdigest()))

    @property
    def state_key(self) -> str:
        """Where Lightning keeps this callback's state in a checkpoint: the class name and
        the number and a digest of the names of the weights its masks or schedule hold
        (the class name alone for a function). Lightning's own key, the class name, let
        only one of them in a ``Trainer``: a second was refused ("Found more than one
        stateful callback of type `SparsityCallback`") even on other weights."""
        return self._key

    @property
    def _legacy_state_key(self) -> str:
        """The key checkpoints saved before :attr:`state_key` named the weights hold this
        callback's state under (Lightning reads it where :attr:`state_key` is missing)."""
        return self.__class__.__qualname__

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                "SparsityCallback needs exactly one optimizer; configure_optimizers gave "
                f"{len(optimizers)}"
            )
        if self._restored is None and self.attached is None and trainer.global_step > 0:
            # fit(ckpt_path=...) of a checkpoint saved without this callback's state (by
            # another run, or before training started) restarted the schedule silently
            warnings.warn(
                f"SparsityCallback: resuming at step {trainer.global_step} from a checkpoint "
                "without its state (state_dict()['sparsity']): the masks and the schedule "
                "start as given, a schedule from its first step", RuntimeWarning, stacklevel=2)
        # fit(ckpt_path=...): continue where it was saved, the state loaded before attaching
        self.begin(pl_module, optimizers[0], state=self._restored,
                   state_name="the checkpoint's state_dict['sparsity']")
        self._restored = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.end()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Let go of the optimizer of a run that failed, as at its end: the schedule stayed
        attached to it (``on_train_end`` never came), and a new callback of the same
        schedule was refused as "attached already"."""
        self._restored = None
        self.end()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Drop a checkpoint's state that no training took: ``validate(ckpt_path=...)``
        (or ``test``, ``predict``) loads it too, and the next ``fit`` without a checkpoint
        resumed from it, a fresh run starting at that checkpoint's masks and step."""
        self._restored = None

    def state_dict(self) -> dict[str, Any]:
        """The masks' (or the schedule's) state, saved in Lightning checkpoints."""
        return {} if self.attached is None else {
            "sparsity": (self.schedule or self.masks).state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep a checkpoint's state (what :meth:`state_dict` saved) for when training
        starts, where it is loaded before anything is attached: the masks or the schedule
        it is for may only be built then. Its form is checked here already."""
        if not isinstance(state_dict, Mapping):
            raise ArgumentTypeError(f"state_dict must be the dict SparsityCallback.state_dict() "
                                    f"returns, got {type(state_dict).__name__}")
        sparsity = state_dict.get("sparsity")
        if sparsity is not None and not (isinstance(sparsity, Mapping)
                                         and isinstance(sparsity.get("masks"), Mapping)):
            raise ArgumentTypeError(
                "state_dict['sparsity'] must be the state_dict() of masks or a schedule (a "
                f"dict with a 'masks' dict), got {sparsity!r:.80}")
        self._restored = sparsity
