"""Execution: compressed weight formats, compiled kernels and per-layer autotuning.

:func:`compile` turns a pruned model into one whose ``nn.Linear`` layers run in the
fastest measured format (dense included); :func:`report` lists the choices per layer.
"""

from sparsekit.engine.compile import compile, report
from sparsekit.engine.formats import CSR16, FORMATS, DenseFormat, Format, TorchCSR
from sparsekit.engine.sparse_linear import CompiledLinear

__all__ = [
    "CSR16",
    "FORMATS",
    "CompiledLinear",
    "DenseFormat",
    "Format",
    "TorchCSR",
    "compile",
    "report",
]
