"""Sparsity inside the training loops people already run: HF ``Trainer``, ``accelerate``,
Lightning.

Every framework here builds and wraps its own optimizer, so masks cannot be attached
before training starts. :func:`attach` is what each integration does once it holds that
optimizer: keep a :class:`~sparsekit.MaskSet` (alone or a schedule's) through its steps
and advance the schedule after each step the optimizer really takes. The framework
modules are thin adapters and import their framework only when imported themselves:

* :mod:`sparsekit.integrations.hf` — ``SparsityCallback``, a ``transformers.TrainerCallback``;
* :mod:`sparsekit.integrations.lightning` — ``SparsityCallback``, a ``lightning.pytorch.Callback``;
* :mod:`sparsekit.integrations.accelerate` — ``attach`` for a plain ``accelerate`` loop.

``import sparsekit.integrations`` imports none of them.
"""

from sparsekit.integrations.training import Attached, Sparsity, TrainingSparsity, attach

__all__ = ["Attached", "Sparsity", "TrainingSparsity", "attach"]
