"""``SparsityCallback``: masks and schedules inside a Hugging Face ``Trainer``.

::

    masks = sparsekit.prune(model, 0.5)            # or GradualPruner(...), or a function
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[SparsityCallback(masks)])
    trainer.train()                                # masked weights stay exactly zero

A :class:`~sparsekit.DynamicSparsity` needs the optimizer the ``Trainer`` builds inside
``train()``; pass a function that builds it::

    SparsityCallback(lambda model, opt: DynamicSparsity(model, opt, 0.9, end_step=1000))
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import warnings
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ModuleNotFoundError as exc:  # a missing dependency of transformers is reported as is
    if (exc.name or "").partition(".")[0] != "transformers":
        raise
    raise ImportError("sparsekit.integrations.hf needs transformers, which is not installed: "
                      "pip install 'sparsekit[llm]'") from exc

from sparsekit._atomic import atomic_write, special_kind
from sparsekit._checks import check_optimizer
from sparsekit.distributed import is_sharded
from sparsekit.integrations.training import TrainingSparsity

__all__ = ["SparsityCallback"]

STATE_FILE = "sparsekit_state.pt"
"""The masks' (or the schedule's) ``state_dict`` in each checkpoint directory."""

WEIGHTS_FILE = "sparsekit_weights.json"
"""Beside :data:`STATE_FILE`: ``{"weights": {name: digest}}`` of the masked weights as the
checkpoint holds them (:func:`_weights_digest`), which tells a resume whether that state
is of the checkpoint resumed. A state without it (saved before it was written) is loaded
unchecked."""


class SparsityCallback(TrainingSparsity, TrainerCallback):
    """Attach ``sparsity`` to the ``Trainer``'s own optimizer at train begin, step its
    schedule after every optimizer step and detach at train end.

    ``sparsity`` is a ``MaskSet``, a schedule or a function ``(model, optimizer) -> one
    of them`` (see :data:`sparsekit.integrations.Sparsity`). The masked weights are zero
    in every checkpoint and in the saved model; after training, :attr:`masks` and
    :attr:`schedule` are what was trained (to report, save or compile). Each checkpoint
    also holds their ``state_dict`` (:data:`STATE_FILE`), so
    ``trainer.train(resume_from_checkpoint=...)`` resumes the schedule where it was (a
    checkpoint outside ``output_dir`` needs ``TrainingArguments(resume_from_checkpoint=...)``
    too: the ``Trainer`` does not tell its callbacks where it resumes from).
    """

    _model: nn.Module | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, *, model: nn.Module,
                       optimizer: object, **kwargs: Any) -> None:
        """Attach; when resuming, load the resumed checkpoint's :data:`STATE_FILE` first, so
        that a file that holds no state of this sparsity is a ``ValueError`` naming it, with
        nothing attached.

        The ``Trainer`` tells its callbacks the step it resumes at, not the directory: the
        file is looked for in ``args.resume_from_checkpoint`` (where set) and in the
        checkpoint of that step under ``output_dir``. Beside each, :data:`WEIGHTS_FILE`
        records a digest of the masked weights saved with it, and only the one whose
        digest is that of the weights resumed is loaded: ``output_dir`` may hold the
        checkpoint of that step of another run, whose masks were loaded instead of those of
        a checkpoint resumed from elsewhere. A file of other weights (and none of these) is
        a ``ValueError`` naming it; resuming without any file (saved without this callback)
        warns: the masks and the schedule then start as given, a schedule from its first
        step."""
        real = check_optimizer(optimizer)
        other = _TRAINING.get(id(real))
        if other is not None and other is not self and other.attached is not None and (
                other.attached.optimizer is real):
            raise ValueError(
                f"SparsityCallback: another SparsityCallback (of a "
                f"{type(other.sparsity).__name__}) holds this Trainer's optimizer: both would "
                f"save their state to the same {STATE_FILE} of each checkpoint, and a resume "
                "would load the last one's into both. Pass one SparsityCallback per Trainer "
                "(one MaskSet or schedule for all the weights); a train() that failed leaves "
                "its callback holding the optimizer: call its end() first")
        self._model = model
        saved = _checkpoint(args, state) / STATE_FILE
        resumed = None
        if state.global_step > 0:
            saved, resumed = _resumed_state(args, state, model)
        self.begin(model, optimizer, state=resumed, state_name=str(saved))
        _TRAINING[id(real)] = self

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write :data:`STATE_FILE` (and :data:`WEIGHTS_FILE`) into the checkpoint, on each
        process that writes the checkpoint (``args.should_save``): with
        ``save_on_each_node`` every node's local process zero does, and only the first
        node's checkpoints held the state, so that the other nodes resumed their schedules
        from the first step. Arguments without ``should_save`` (not ``TrainingArguments``)
        save on the world's process zero."""
        if self.attached is not None and getattr(args, "should_save",
                                                 state.is_world_process_zero):
            sparsity = self.attached.schedule or self.attached.masks
            folder = _checkpoint(args, state)
            masks = sparsity.masks if self.attached.schedule is not None else sparsity
            weights = None if self._model is None else _weights_digest(self._model,
                                                                       masks.masks)
            if weights is None:  # no record of another save may stay beside this state
                (folder / WEIGHTS_FILE).unlink(missing_ok=True)
            else:  # first: a state left without it would pass for one of these weights
                with atomic_write(folder / WEIGHTS_FILE) as tmp:
                    tmp.write_text(json.dumps({"weights": weights}))
            with atomic_write(folder / STATE_FILE) as tmp:
                torch.save(sparsity.state_dict(), tmp)

    def end(self) -> None:
        """Let go of the optimizer (what train end does; call it after a ``train()`` that
        failed, to train with another callback)."""
        super().end()
        if self.attached is not None and _TRAINING.get(id(self.attached.optimizer)) is self:
            del _TRAINING[id(self.attached.optimizer)]

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Detach. With ``load_best_model_at_end`` the ``Trainer`` has just put back the
        weights of the best checkpoint: its :data:`STATE_FILE` is loaded too, so that
        :attr:`masks` and :attr:`schedule` are those of these weights (they were those of
        the last step, whose zeros the weights no longer had). Where that checkpoint holds
        no state of these weights, a warning says so."""
        self.end()
        best = getattr(state, "best_model_checkpoint", None)
        if (self.attached is None or self._model is None
                or not getattr(args, "load_best_model_at_end", False)
                or not isinstance(best, str) or not os.path.isdir(best)):
            return
        places = [Path(best) / STATE_FILE]
        saved, loaded, _ = _state_of(places, self._model)
        if saved is None:
            warnings.warn(
                f"SparsityCallback: the Trainer loaded the best model, of {best}, but "
                f"{places[0]} holds no state of its weights: masks and schedule are those "
                "of the last step, not of these weights", RuntimeWarning, stacklevel=2)
        else:
            (self.attached.schedule or self.attached.masks).load_state_dict(loaded)


_TRAINING: weakref.WeakValueDictionary[int, SparsityCallback] = weakref.WeakValueDictionary()
"""The callback training with each optimizer, by the optimizer's id, from train begin to
train end (or for good, after a ``train()`` that failed)."""


def _weights_digest(model: nn.Module, names: Iterable[str]) -> dict[str, str] | None:
    """A digest of each of ``model``'s weights that ``names`` names, by name (names of no
    weight are left out): the ``Trainer`` saves the weights with each checkpoint and
    restores them, bit-identical, before ``on_train_begin`` of a resume. ``None`` for a
    sharded model (FSDP), whose shards differ from rank to rank while one rank writes the
    file."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    if is_sharded(model) or (fsdp is not None and any(
            isinstance(m, fsdp.FullyShardedDataParallel) for m in model.modules())):
        return None
    params = dict(model.named_parameters())
    digests = {}
    for name in names:
        if name in params:
            p = params[name].detach()
            digest = hashlib.blake2b(f"{p.dtype}:{tuple(p.shape)};".encode(), digest_size=16)
            digest.update(p.reshape(-1).contiguous().view(torch.uint8).cpu().numpy())
            digests[name] = digest.hexdigest()
    return digests


def _resumed_state(args: Any, state: Any, model: nn.Module) -> tuple[Path, Any]:
    """The :data:`STATE_FILE` of the checkpoint resumed (see
    :meth:`SparsityCallback.on_train_begin`) and its ``state_dict``; ``None`` for the
    latter, with a warning, where there is none."""
    places = [_checkpoint(args, state) / STATE_FILE]
    elsewhere = getattr(args, "resume_from_checkpoint", None)
    if isinstance(elsewhere, (str, os.PathLike)) and os.fspath(elsewhere):
        places.insert(0, Path(elsewhere) / STATE_FILE)
    saved, loaded, other = _state_of(places, model)
    if other is not None:
        raise ValueError(
            f"{other} is the state of another checkpoint than the one resumed at step "
            f"{state.global_step}: the weights saved with it differ from those resumed. Set "
            "TrainingArguments(resume_from_checkpoint=...) to the checkpoint directory passed "
            "to train(), whose state it is, or remove the file to start the masks and the "
            "schedule as given")
    if saved is None:
        warnings.warn(
            f"SparsityCallback: resuming at step {state.global_step} without "
            f"{' or '.join(map(str, places))}, the state it saves with each checkpoint: the "
            "masks and the schedule start as given, a schedule from its first step (set "
            "TrainingArguments(resume_from_checkpoint=...) to a checkpoint directory outside "
            "output_dir)", RuntimeWarning, stacklevel=3)
    return saved or places[-1], loaded


def _state_of(places: list[Path], model: nn.Module) -> tuple[Path | None, Any, Path | None]:
    """The first of ``places`` that holds a state saved with ``model``'s weights as they
    are now (or one without :data:`WEIGHTS_FILE` beside it), and its ``state_dict``; else
    ``None`` for both, and the first file there of other weights (or ``None``). Only the
    weights the state masks are compared: a weight the ``Trainer`` does not save (a frozen
    base of PEFT adapters, a new head) differs in a resume of the right checkpoint too."""
    other = None
    for saved in places:
        if not os.path.lexists(saved):
            continue
        loaded = _read_state(saved)
        weights = _read_weights(saved.parent / WEIGHTS_FILE)
        if weights is None or _weights_digest(model, weights) in (None, weights):
            return saved, loaded, None
        other = other or saved
    return None, None, other


def _read_weights(path: Path) -> dict[str, str] | None:
    """The digests :data:`WEIGHTS_FILE` at ``path`` holds, or ``None`` where there is no
    file; a file that holds none is a ``ValueError`` naming it."""
    if not os.path.lexists(path):
        return None
    _check_regular(path, "no record of SparsityCallback's weights")  # a FIFO: read for ever
    try:
        weights = json.loads(path.read_text())["weights"]
    except (OSError, ValueError, TypeError, KeyError) as err:  # JSON and UTF-8 errors
        raise ValueError(f"{path} is no record of SparsityCallback's weights: {err}") from err
    if not (isinstance(weights, dict)
            and all(isinstance(v, str) for v in weights.values())):
        raise ValueError(f"{path} is no record of SparsityCallback's weights: its 'weights' "
                         f"must map names to digests, got {weights!r:.80}")
    return weights


def _read_state(path: Path) -> Any:
    """What ``torch.load`` reads from ``path`` (tensors and containers only); a file it
    cannot read is a ``ValueError`` naming it (torch's own errors do not). A damaged file
    (flipped bytes, cut short) fails deep in torch's unpickler with almost any error —
    ``UnicodeDecodeError``, ``KeyError``, ``IndexError``, ``AssertionError`` — each of them
    caught here; an ``OSError`` (a file that cannot be opened) names the file already.

    Its tensors are read onto the CPU (the masks and the schedule move them to their
    weights' devices): a state saved by a run on a GPU was refused on a machine without
    one ("Attempting to deserialize object on a CUDA device"), where the ``Trainer``
    resumes the rest of that checkpoint.

    What lies there in its place (a directory, a FIFO, a broken link) is refused too: it
    was taken for no file at all, and the run went on with the schedule from its first step
    after a mere warning."""
    _check_regular(path, "no state saved by SparsityCallback")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, LookupError,
            TypeError, AttributeError, AssertionError, OverflowError, RecursionError) as err:
        reason = str(err).strip().split("\n")[0] or type(err).__name__  # torch's run long
        raise ValueError(f"{path} is no state saved by SparsityCallback: torch.load failed "
                         f"({reason})") from err


def _check_regular(path: Path, what: str) -> None:
    """Raise ``ValueError`` ("``path`` is ``what``: it is a directory …") unless ``path``
    is a regular file (or a link to one)."""
    if not path.is_file():
        special = special_kind(path)
        kind = ("a directory" if path.is_dir() else f"a {special}" if special
                else "a broken link")
        raise ValueError(f"{path} is {what}: it is {kind}, not a regular file")


def _checkpoint(args: Any, state: Any) -> Path:
    """The directory the ``Trainer`` saves the checkpoint of this step in."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
