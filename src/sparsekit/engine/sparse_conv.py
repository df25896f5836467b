"""Deprecated path: :class:`CompiledConv2d` lives in :mod:`sparsekit.engine.compiled_conv`."""

from sparsekit.engine._moved import moved

__getattr__ = moved(
    __name__,
    {n: "sparsekit.engine.compiled_conv" for n in ("CompiledConv2d", "convertible")},
)
