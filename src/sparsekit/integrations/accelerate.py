"""Masks and schedules in a plain ``accelerate`` training loop.

::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sparsity = sparsekit.integrations.accelerate.attach(accelerator, schedule, model, optimizer)
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(loss_fn(model, batch))
            optimizer.step()          # the schedule steps only when the optimizer really does
            optimizer.zero_grad()
    sparsity.remove()

The schedule steps once per real optimizer step: with gradient accumulation the
``AcceleratedOptimizer`` skips the steps between synchronisations, and so does the
schedule.
"""

from __future__ import annotations

import sys
from typing import Any

from torch import nn

from sparsekit._checks import ArgumentTypeError, check_module
from sparsekit.integrations import training
from sparsekit.integrations.training import Attached, Sparsity

__all__ = ["attach"]


def attach(accelerator: Any, sparsity: Sparsity, model: nn.Module, optimizer: object) -> Attached:
    """:func:`sparsekit.integrations.attach` for models and optimizers that went through
    ``accelerator.prepare``: masks and functions see the unwrapped model (its parameter
    names), hooks go on the optimizer inside the ``AcceleratedOptimizer``.

    A ``torch.compile``-d model is unwrapped too: ``unwrap_model`` keeps the compiled
    wrapper by default, and a function's masks were named ``_orig_mod.…`` (names the model
    saved without compiling, and every checkpoint of it, lack)."""
    unwrap = getattr(accelerator, "unwrap_model", None)
    if unwrap is None or isinstance(accelerator, type):  # the class: unwrap_model unbound
        got = f"the class {accelerator.__name__}" if isinstance(accelerator, type) else (
            type(accelerator).__name__)
        raise ArgumentTypeError(f"accelerator must be an accelerate.Accelerator, got {got}")
    check_module("model", model)  # unwrap_model failed on anything else with AttributeError
    unwrapped = unwrap(model)
    dynamo = sys.modules.get("torch._dynamo")  # imported where anything was compiled
    if dynamo is not None and isinstance(unwrapped, dynamo.OptimizedModule):
        unwrapped = unwrapped._orig_mod  # what unwrap_model(keep_torch_compile=False) gives
    return training.attach(sparsity, unwrapped, optimizer)
