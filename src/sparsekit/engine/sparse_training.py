"""Deprecated path: :class:`SparseLinear` lives in :mod:`sparsekit.engine.sparse_linear`."""

from sparsekit.engine._moved import moved

__getattr__ = moved(__name__, {"SparseLinear": "sparsekit.engine.sparse_linear"})
