"""JIT-built C++ kernels, loaded on first use and cached on disk.

The kernels are custom operators, ``torch.ops.sparsekit.<name>``: ``library.cpp`` defines
their schemas, one ``.cpp`` file per kernel family registers its CPU implementation, and
:mod:`~sparsekit.engine.kernels.fake` their shapes for ``torch.compile``/``torch.export``.

The arithmetic (the kernel cores) is compiled once per instruction set: portable C++
(``"scalar"``, what ARM builds too), AVX2 + FMA (``"avx2"``) and AVX-512 (``"avx512"``); the
library runs the best one the CPU supports (:func:`isa`; :func:`isas` lists the others it can
run, :func:`use_isa` forces one, e.g. to test or time every path). The rest of the library
is compiled for a baseline of the architecture, so one build runs on any CPU of it. On
AVX-512 the bitmap rows of bf16 values and of int8 codes, and the bitmap columns of
``act_bitmap_gemv``, have two expansions, chosen per value dtype by the CPU
(:func:`bitmap_expansion`; :func:`use_bitmap_expansion` forces one).

The sources are compiled once per (torch version, Python, CPU, sources) by
``torch.utils.cpp_extension.load`` into ``~/.cache/sparsekit/`` (``$SPARSEKIT_CACHE_DIR`` or
``$XDG_CACHE_HOME`` move it); later imports load the built library without rebuilding.
Nothing is built at install time. If the build fails, or ``SPARSEKIT_NO_KERNELS=1`` is set,
:func:`load` returns ``None`` and warns once why; formats that need the kernels are then
simply not candidates.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

import torch

from sparsekit._checks import ArgumentTypeError

__all__ = [
    "available", "bitmap_expansion", "bitmap_expansions", "flush_cache", "isa", "isas", "load",
    "num_threads", "unavailable_reason", "use_bitmap_expansion", "use_isa",
]

_SOURCES = sorted(Path(__file__).parent.glob("*.cpp"))  # one file per kernel family
_HEADERS = sorted(Path(__file__).parent.glob("*.h"))
# Baseline code (x86: SSE4.2 + POPCNT); the cores of wider instruction sets enable them with a
# target pragma in their own file (isa_avx2.cpp, isa_avx512.cpp) and are chosen at load time.
_BASELINE = ["-march=x86-64-v2"] if platform.machine() in ("x86_64", "AMD64") else []
_CFLAGS = ["-O3", *_BASELINE, "-fopenmp"]
_LDFLAGS = ["-fopenmp"]

_module: ModuleType | None = None
_reason: str | None = None
_tried = False


def load() -> ModuleType | None:
    """The ``torch.ops.sparsekit`` namespace, building the kernels on first call; ``None``
    if unavailable."""
    global _module, _reason, _tried
    if _tried:
        return _module
    _tried = True
    if os.environ.get("SPARSEKIT_NO_KERNELS", "") not in ("", "0"):
        _reason = "SPARSEKIT_NO_KERNELS is set"
    else:
        try:
            _module = _build()
        except Exception as exc:  # a failed build must never break the package
            _reason = f"build failed: {type(exc).__name__}: {str(exc).strip()[-500:]}"
    if _module is None:
        warnings.warn(
            f"sparsekit compiled kernels are unavailable ({_reason}); "
            "using PyTorch formats only",
            RuntimeWarning,
            stacklevel=2,
        )
    return _module


def num_threads() -> int:
    """``torch.get_num_threads()``, read as a constant when ``torch.compile`` or
    ``torch.export`` traces a kernel call (it returns an int, which Dynamo cannot put in a
    graph): a traced model keeps the thread count it was traced with."""
    return torch.get_num_threads()


# torch.compiler.assume_constant_result(num_threads), which imports Dynamo to set this one
# attribute: that import took 0.8-1.6 s, half of `import sparsekit`, for every CLI call and
# process. tests/test_export.py checks that the decorator still sets exactly this.
num_threads._dynamo_marked_constant = True  # type: ignore[attr-defined]


def available() -> bool:
    """Whether the compiled kernels can be used (builds them on first call)."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`load` returned ``None``, or ``None`` when the kernels are available."""
    load()
    return _reason


def isa() -> str | None:
    """The instruction set the kernels run (``"scalar"``, ``"avx2"`` or ``"avx512"``): the
    best one this CPU supports unless :func:`use_isa` chose another; ``None`` without
    kernels."""
    ops = load()
    return None if ops is None else str(ops.isa())


def isas() -> tuple[str, ...]:
    """The instruction sets this CPU runs, from the portable ``"scalar"`` to the best;
    empty without kernels."""
    ops = load()
    return () if ops is None else tuple(ops.isas())


def flush_cache(tensors: torch.Tensor | Iterable[torch.Tensor]) -> bool:
    """Write the memory of ``tensors`` (one tensor or an iterable of them; their whole
    storages) back and evict it from every CPU cache level (x86 ``clflushopt``, ARM
    ``dc civac``), so that the next read of them comes from memory: autotune's cold timing
    (:func:`sparsekit.engine.autotune.cold_cache`) flushes the layer it times. The values
    are unchanged. Returns whether it flushed: ``False`` without kernels, or on a CPU
    without such an instruction.

    Raises ``TypeError`` for anything but tensors and ``RuntimeError`` for a tensor that is
    not a strided CPU one, before anything is flushed."""
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    elif isinstance(tensors, Iterable) and not isinstance(tensors, (str, bytes)):
        tensors = list(tensors)
    else:
        raise TypeError(f"tensors must be a torch.Tensor or an iterable of them, got "
                        f"{type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors must be torch.Tensors, got {type(t).__name__} at "
                            f"position {i}")
    ops = load()
    if ops is None:
        return False
    return bool(ops.flush_cache(tensors))


def use_isa(name: str) -> contextlib.AbstractContextManager[None]:
    """Run the kernels on instruction set ``name`` (one of :func:`isas`) inside the block,
    for every thread of the process; the previous one is restored on exit.

    >>> with kernels.use_isa("avx2"):  # doctest: +SKIP
    ...     y = layer(x)  # the AVX2 path, even on an AVX-512 CPU
    """
    return _Using("isa", "instruction sets", name, isas(), "set_isa")


class _Using(contextlib.AbstractContextManager):
    """The kernels' choice ``what`` set to ``name`` (one of ``accepted``, the ``kinds`` this
    CPU runs) by the op ``setter`` inside the block, the previous one restored on exit.
    ``name`` is checked at once; one never entered (``kernels.use_isa("scalar")`` as a
    statement, without ``with``, which changed nothing without a word) warns as it goes."""

    _entered = True  # until __init__ has checked the name: a refused one warns of nothing

    def __init__(self, what: str, kinds: str, name: str, accepted: tuple[str, ...],
                 setter: str) -> None:
        if name not in accepted:
            raise ValueError(f"{what} must be one of {accepted} (the {kinds} this CPU runs "
                             f"with kernels available), got {name!r}")
        self._what, self._name, self._setter = what, name, setter
        self._before: str | None = None
        self._entered = False

    def __enter__(self) -> None:
        ops = load()
        assert ops is not None  # accepted is empty without kernels
        self._entered = True
        self._before = str(getattr(ops, self._setter)(self._name))

    def __exit__(self, *exc: object) -> None:
        ops = load()
        assert ops is not None and self._before is not None
        getattr(ops, self._setter)(self._before)

    def __del__(self) -> None:
        if not self._entered:
            warnings.warn(f"the {self._what} {self._name!r} was never entered, so nothing "
                          "changed: use it as a with block (with kernels.use_isa(...):)",
                          RuntimeWarning, stacklevel=2)


def bitmap_expansion(values: str | None = None, *, columns: bool = False) -> str | None:
    """How the AVX-512 kernels move the packed values of bitmap words into the lanes of
    their inputs: ``"vpexpand"`` (one VBMI2 ``vpexpandw`` per word of bf16 values, one
    ``vpexpandb`` per 64 int8 codes, W8A8 or float inputs; in the bitmap columns of
    ``act_bitmap_gemv`` also ``vexpandps`` for fp32) or ``"tables"`` (``pshufb`` by tables
    of byte ranks for bf16, ``vpermb`` by the ranks of the set bits for int8).

    Without ``values``, the setting: ``"auto"`` (the default) or the expansion
    :func:`use_bitmap_expansion` forces. Under ``"auto"`` each dtype takes the one measured
    faster on this kind of CPU: ``"vpexpand"`` for every dtype on Intel; on AMD Zen 4 for
    int8 codes (1.06-1.45x faster across the int8 bitmap kernels) and in the bitmap columns
    of ``act_bitmap_gemv`` (fp32 1.16-1.24x, bf16 1.02-1.19x), ``"tables"`` for the bf16
    rows (which ``vpexpandw`` ran 1.3x slower) and the fp32 ones; ``"tables"`` elsewhere
    (AMD Zen 5 ran the expands 1.3-3x slower). With ``values`` (``"bf16"``, ``"fp32"`` or
    ``"int8"``), the expansion the kernels use for them now: in the bitmap rows, or with
    ``columns=True`` in the bitmap columns. ``None`` without kernels; the AVX2 and scalar
    kernels always use their own tables."""
    if values is not None and values not in _EXPANSION_VALUES:
        raise ValueError(f"values must be one of {_EXPANSION_VALUES}, got {values!r}")
    if not isinstance(columns, bool):
        raise ArgumentTypeError(f"columns must be a bool, got {columns!r}")
    ops = load()
    if ops is None:
        return None
    return str(ops.bitmap_expansion() if values is None
               else ops.bitmap_expansion_of(values, columns))


_EXPANSION_VALUES = ("bf16", "fp32", "int8")


def bitmap_expansions() -> tuple[str, ...]:
    """The bitmap expansions this CPU runs: ``"tables"``, and ``"vpexpand"`` on an AVX-512 CPU
    with VBMI2; empty without kernels."""
    ops = load()
    return () if ops is None else tuple(ops.bitmap_expansions())


def use_bitmap_expansion(name: str) -> contextlib.AbstractContextManager[None]:
    """Expand bitmap words with ``name`` inside the block, for every thread of the process:
    one of :func:`bitmap_expansions` for every value dtype, or ``"auto"`` (each dtype the
    one faster on this CPU, :func:`bitmap_expansion`); the previous setting is restored on
    exit. They give the same outputs, bit for bit.

    >>> with kernels.use_bitmap_expansion("tables"):  # doctest: +SKIP
    ...     y = layer(x)  # bf16 bitmap rows by pshufb tables, even on Intel
    """
    expansions = bitmap_expansions()
    return _Using("bitmap expansion", "expansions", name,
                  ("auto", *expansions) if expansions else (), "set_bitmap_expansion")


def _cache_dir() -> Path:
    root = os.environ.get("SPARSEKIT_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "sparsekit"


def _build_key() -> str:
    """Hash of everything the built library depends on (sources, flags, CPU, Python)."""
    h = hashlib.sha256()
    for src in [*_SOURCES, *_HEADERS]:
        h.update(src.read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    h.update(f"{sys.version_info[:2]} {platform.machine()} {_cpu_flags()}".encode())
    return h.hexdigest()[:12]


def _cpu_flags() -> str:
    """CPU feature flags (the build runs on any CPU of its architecture, but timing decisions
    keyed by :func:`_build_key` are this CPU's)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


@contextlib.contextmanager
def _build_claim(build_dir: Path) -> Iterator[None]:
    """Hold ``build_dir`` for one building process, and clear what a killed build left.

    ``torch.utils.cpp_extension`` marks a build with a ``lock`` file and makes every other
    process wait until it disappears; a build that was killed leaves it behind, and every
    later import would wait forever. Each sparsekit build therefore also holds an OS lock
    (``flock`` on ``build.claim``), which the kernel releases when its process ends however
    it ends: whoever gets the claim knows that no build is running, so a ``lock`` file still
    there is stale and is removed (with a warning). Without ``fcntl`` (not POSIX) the claim
    is skipped."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(build_dir / "build.claim", "a+b") as claim:
        fcntl.flock(claim, fcntl.LOCK_EX)  # waits only for a build that is still running
        try:
            lock = build_dir / "lock"
            if lock.exists():
                warnings.warn(f"removing the stale kernel build lock {lock} (a killed build "
                              "left it)", RuntimeWarning, stacklevel=4)
                lock.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(claim, fcntl.LOCK_UN)


def _build() -> ModuleType:
    from torch.utils.cpp_extension import load as jit_load

    from sparsekit.engine.kernels import fake

    key = _build_key()
    build_dir = _cache_dir() / f"kernels-{torch.__version__}-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    with _build_claim(build_dir):
        jit_load(  # loads the operator library into the process
            name=f"sparsekit_kernels_{key}",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=_CFLAGS,
            extra_ldflags=_LDFLAGS,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=False,
        )
    fake.register()
    return torch.ops.sparsekit
