"""Sparse fine-tuning: train a small update without giving up a model's sparsity.

* :mod:`sparsekit.finetune.delta` — masked-delta fine-tuning: only a chosen sparse set of
  entries trains (chosen by gradient or weight magnitude), and the update is a sparse
  delta that saves small and applies onto the base (:func:`masked_delta`, :class:`Delta`);
* :mod:`sparsekit.finetune.lora` — LoRA through ``peft`` on a pruned model, merged without
  filling the pruned weights in (:func:`sparse_lora`, :func:`merge_lora`); imports ``peft``
  on first use.

:func:`sparsekit.diff` measures how sparse an update between two checkpoints is.
"""

from typing import Any

from sparsekit.finetune.delta import Delta, DeltaTraining, masked_delta

__all__ = ["Delta", "DeltaTraining", "masked_delta", "merge_lora", "sparse_lora"]

_LORA = {"sparse_lora": "sparse_lora", "merge_lora": "merge"}


def __getattr__(name: str) -> Any:
    if name in _LORA:  # peft is imported only when LoRA is asked for
        from sparsekit.finetune import lora

        return getattr(lora, _LORA[name])
    raise AttributeError(f"module 'sparsekit.finetune' has no attribute {name!r}")
