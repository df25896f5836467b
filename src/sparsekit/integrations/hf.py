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

import os
import pickle
import warnings
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
from sparsekit.integrations.training import TrainingSparsity

__all__ = ["SparsityCallback"]

STATE_FILE = "sparsekit_state.pt"
"""The masks' (or the schedule's) ``state_dict`` in each checkpoint directory."""


class SparsityCallback(TrainingSparsity, TrainerCallback):
    """Attach ``sparsity`` to the ``Trainer``'s own optimizer at train begin, step its
    schedule after every optimizer step and detach at train end.

    ``sparsity`` is a ``MaskSet``, a schedule or a function ``(model, optimizer) -> one
    of them`` (see :data:`sparsekit.integrations.Sparsity`). The masked weights are zero
    in every checkpoint and in the saved model; after training, :attr:`masks` and
    :attr:`schedule` are what was trained (to report, save or compile). Each checkpoint
    also holds their ``state_dict`` (:data:`STATE_FILE`), so
    ``trainer.train(resume_from_checkpoint=...)`` resumes the schedule where it was.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, *, model: nn.Module,
                       optimizer: object, **kwargs: Any) -> None:
        """Attach; when resuming, load the checkpoint's :data:`STATE_FILE` first, so that
        a file that holds no state of this sparsity is a ``ValueError`` naming it, with
        nothing attached.

        The ``Trainer`` tells its callbacks the step it resumes at, not the directory: the
        file is looked for in the checkpoint of that step under ``output_dir``. Resuming
        without it (a checkpoint from elsewhere, or saved without this callback) warns:
        the masks and the schedule then start as given, a schedule from its first step."""
        saved = _checkpoint(args, state) / STATE_FILE
        resumed = None
        if state.global_step > 0 and os.path.lexists(saved):
            resumed = _read_state(saved)
        elif state.global_step > 0:
            warnings.warn(
                f"SparsityCallback: resuming at step {state.global_step} without {saved}, "
                "the state it saves with each checkpoint: the masks and the schedule start "
                "as given, a schedule from its first step", RuntimeWarning, stacklevel=2)
        self.begin(model, optimizer, state=resumed, state_name=str(saved))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write :data:`STATE_FILE` into the checkpoint, on each process that writes the
        checkpoint (``args.should_save``): with ``save_on_each_node`` every node's local
        process zero does, and only the first node's checkpoints held the state, so that
        the other nodes resumed their schedules from the first step. Arguments without
        ``should_save`` (not ``TrainingArguments``) save on the world's process zero."""
        if self.attached is not None and getattr(args, "should_save",
                                                 state.is_world_process_zero):
            sparsity = self.attached.schedule or self.attached.masks
            with atomic_write(_checkpoint(args, state) / STATE_FILE) as tmp:
                torch.save(sparsity.state_dict(), tmp)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.end()


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
    if not path.is_file():
        special = special_kind(path)
        kind = ("a directory" if path.is_dir() else f"a {special}" if special
                else "a broken link")
        raise ValueError(f"{path} is no state saved by SparsityCallback: it is {kind}, not "
                         "a regular file")
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, LookupError,
            TypeError, AttributeError, AssertionError, OverflowError, RecursionError) as err:
        reason = str(err).strip().split("\n")[0] or type(err).__name__  # torch's run long
        raise ValueError(f"{path} is no state saved by SparsityCallback: torch.load failed "
                         f"({reason})") from err


def _checkpoint(args: Any, state: Any) -> Path:
    """The directory the ``Trainer`` saves the checkpoint of this step in."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
