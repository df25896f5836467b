"""Execution: compressed weight formats, compiled kernels and per-layer autotuning.

:func:`compile` turns a pruned model into one whose ``nn.Linear`` and ``nn.Conv2d``
layers run in the fastest measured format (dense included): :mod:`~sparsekit.engine.autotune`
times and chooses, :mod:`~sparsekit.engine.decisions` caches the choices on disk;
:func:`report` lists them per layer. Projections that read the same input (q/k/v,
gate/up) may run as one :class:`FusedProjections` call (:mod:`~sparsekit.engine.fused`).
Compiled models save and load like any model (each layer states its own entries,
``expected_state``); :func:`decompile` turns one back into ``nn.Linear``/``nn.Conv2d``
layers (``to_module``). Kernels are ``torch.ops.sparsekit`` custom ops
(:mod:`sparsekit.engine.kernels`).
"""

from sparsekit.engine.compile import compile
from sparsekit.engine.compiled_conv import CompiledConv2d
from sparsekit.engine.compiled_linear import CompiledLayer, CompiledLinear
from sparsekit.engine.formats import CSR16, FORMATS, DenseFormat, Format, TorchCSR
from sparsekit.engine.fused import FusedLinear, FusedProjections
from sparsekit.engine.persist import decompile
from sparsekit.engine.report import report

__all__ = [
    "CSR16",
    "FORMATS",
    "CompiledConv2d",
    "CompiledLayer",
    "CompiledLinear",
    "DenseFormat",
    "Format",
    "FusedLinear",
    "FusedProjections",
    "TorchCSR",
    "compile",
    "decompile",
    "report",
]
