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

from typing import Any

from torch import nn
from transformers import TrainerCallback

from sparsekit.integrations.training import TrainingSparsity

__all__ = ["SparsityCallback"]


class SparsityCallback(TrainingSparsity, TrainerCallback):
    """Attach ``sparsity`` to the ``Trainer``'s own optimizer at train begin, step its
    schedule after every optimizer step and detach at train end.

    ``sparsity`` is a ``MaskSet``, a schedule or a function ``(model, optimizer) -> one
    of them`` (see :data:`sparsekit.integrations.Sparsity`). The masked weights are zero
    in every checkpoint and in the saved model; after training, :attr:`masks` and
    :attr:`schedule` are what was trained (to report, save or compile).
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, *, model: nn.Module,
                       optimizer: object, **kwargs: Any) -> None:
        self.begin(model, optimizer)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.end()
