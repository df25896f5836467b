"""The decision cache: :func:`~sparsekit.engine.compile`'s per-layer choices, kept on disk.

Timing every layer of a large model takes minutes; the same layer on the same machine
gets the same answer. A decision is stored under a key that holds everything the answer
depends on: the machine (the CPU model, or the GPU for CUDA weights, and the kernel build
key, which hashes the CPU feature flags, the kernel sources and the Python version), the
torch version, the layer (type, shape, input shape), the weight's pattern signature
(nonzeros, the fewest and most in a row, the formats that can hold it), the candidates
allowed, the dtype, the served row counts, the thread counts and the timing margin. A
second compile of the model, or of another with the same layer shapes and patterns,
reads its decisions instead of timing.

Each decision is one JSON file named by the hash of its key, in ``decisions/`` under the
kernel cache (``~/.cache/sparsekit``; ``$SPARSEKIT_CACHE_DIR`` or ``$XDG_CACHE_HOME`` move
it). Files are written atomically (a temporary file renamed over the old one), so a
concurrent compile never reads half a file. A file that cannot be read, or that does not
hold a valid decision for its key (no regular file — a FIFO, a symlink to a device —, one
larger than :data:`_MAX_BYTES`, or a record no timing could give), is ignored with a
``RuntimeWarning`` and replaced by the next timing; a cache that cannot be written only
warns.

Decisions timed on a layer's observed inputs (which columns an activation-sparse layer
skips depends on them) are stored too, under a key that adds those inputs in the coarse
terms compile already uses to take a decision over for a layer alike within one compile
(``inputs``: the share of the typical input row the thresholds keep, in steps of 5 %):
an activation-sparse layer's choice (``kind`` ``"activation"``: its single-row kernel and
whether it replaces the weight-only layer, :func:`_parse_activation`) and the choice to fuse
a group of projections timed on their inputs.

A decision taken on a busy machine may be a coin toss: two formats whose medians lie
closer together than the round-to-round noise of the timing could have come out the
other way. Such a decision is a *close call* (:func:`close_call`, from the evidence every
choice records: the medians of all candidates and the spread of the round times at each
served row count). A close call is timed once more the next time it is read — the file
counts its timings — and that second timing stands, close or not, so a layer whose formats
really are equal costs one extra timing, not one per compile. Clear decisions are read
as they are.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import stat
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from sparsekit._atomic import atomic_write
from sparsekit._checks import check_materialized
from sparsekit.engine import autotune, kernels
from sparsekit.engine.autotune import MARGIN

__all__ = ["TIMINGS", "close_call", "directory", "key", "lookup", "similar", "store"]

_VERSION = 4  # of the key, the file layout and the rule; a change makes old files misses
# (4: fused groups are decided by autotune.choose(..., tolerant=True))
TIMINGS = 2
"""How many timings a close call gets before its decision stands."""
_MAX_BYTES = 1 << 20
"""The largest decision file read (one holds a few kilobytes): a larger one is corrupt, and
no more than this is read of it (a symlink to ``/dev/zero`` filled the memory)."""


_RECORD = frozenset({"format", "format_large", "split", "rows", "ms_dense", "ms_chosen",
                     "speedup", "times_ms", "evidence", "margin", "forced", "reference"})
"""The keys of a timing's record (:func:`~sparsekit.engine.autotune.choose`), the only ones
a stored choice may hold: compile merges the choice into the layer's record, where another
key (``activation``, ``fused``, ``reason``) says what became of the layer, so a file that
added one crashed the compile or skipped its output check."""


def directory() -> Path:
    """Where decisions are stored."""
    return kernels._cache_dir() / "decisions"


def key(
    layer: nn.Module,
    in_shape: tuple[int, ...],
    candidates: Sequence[str],
    rows: Sequence[int],
    threads: int | None,
    value_dtype: torch.dtype | None = None,
    fused: Sequence[str] | None = None,
) -> dict[str, object]:
    """The cache key of timing ``candidates`` (format names, dense included when it may be
    chosen) for ``layer`` with inputs ``(r, *in_shape)`` for ``r`` in ``rows``, the sparse
    candidates holding values of ``value_dtype`` (``None``: the layer's dtype). For the
    decision to fuse a group of projections, ``layer`` is their stacked layer and ``fused``
    the formats of the separate layers and of the stacked one."""
    weight = layer.weight.detach()
    # the pattern signature counts its nonzeros: a raw RuntimeError (.item() on meta)
    check_materialized("layer.weight", weight)
    matrix = weight.flatten(1) != 0
    per_row = matrix.sum(1)
    return {
        "version": _VERSION,
        "machine": _machine(weight.device),
        "kernels": _kernel_key(),
        # the code paths timed: kernels.use_isa and ATen's ATEN_CPU_CAPABILITY switch them on
        # one CPU, and a choice timed on one path is no evidence for another
        "isa": [kernels.isa(), torch.backends.cpu.get_cpu_capability()],
        "torch": torch.__version__,
        "layer": f"{type(layer).__name__}({layer.extra_repr()})",
        "shape": list(weight.shape),
        "in_shape": list(in_shape),
        "dtype": str(weight.dtype),
        "value_dtype": str(value_dtype or weight.dtype),
        "nnz": int(per_row.sum()),
        "row_nnz": [int(per_row.min()), int(per_row.max())] if per_row.numel() else [0, 0],
        "candidates": list(candidates),
        "rows": list(rows),
        "threads": [threads, torch.get_num_threads()],
        "margin": MARGIN,
        "fused": None if fused is None else list(fused),
    } | ({"cold_rows": autotune.COLD_ROWS} if autotune.cold() else {})


def similar(key: dict[str, object]) -> str:
    """``key`` made coarser: the exact nonzero counts replaced by the density in whole
    percent. Layers alike under it (every block of a transformer has the same shapes and
    nearly the same density) get the same decision, so :func:`~sparsekit.engine.compile`
    times one of them and reuses its choice for the others in the same compile."""
    numel = math.prod(key["shape"])
    coarse = {k: v for k, v in key.items() if k not in ("nnz", "row_nnz")}
    coarse["density"] = round(100 * key["nnz"] / max(numel, 1))
    return json.dumps(coarse, sort_keys=True)


def close_call(choice: dict[str, object], candidates: Sequence[str]) -> bool:
    """Whether the timing behind ``choice`` could have chosen otherwise: at some served row
    count another of ``candidates`` has a median within the noise of the chosen format's
    (their ratio's distance from 1, in log terms, below the ``spread`` of the round times
    the evidence records there)."""
    if set(choice) == _ACTIVATION:  # an activation-sparse layer's: its one-row rule decides
        choice, candidates = choice["activation"]["decode"], _AGAINST_WEIGHT_ONLY
    times, evidence = choice["times_ms"], choice["evidence"]
    for r, record in evidence.items():
        chosen = times[record["format"]][r]
        others = [times[n][r] for n in candidates if n != record["format"] and n in times]
        if any(abs(math.log(max(t, 1e-12) / max(chosen, 1e-12))) < record["spread"]
               for t in others):
            return True
    return False


def lookup(key: dict[str, object]) -> dict[str, object] | None:
    """The stored choice for ``key``, or ``None``: a miss, a file not worth trusting, or a
    :func:`close_call` timed fewer than :data:`TIMINGS` times (to be timed again)."""
    data = _read(key)
    if data is None:
        return None
    choice, timings, close = data
    return None if close and timings < TIMINGS else choice


def store(key: dict[str, object], choice: dict[str, object]) -> None:
    """Write ``choice`` for ``key`` atomically, counting it as one more timing of the key
    than the file it replaces held; warn (never raise) if that is impossible.

    A symbolic link at the file's name is replaced, not written through: the cache writes
    only in its own folder (following one overwrote the file it led to, anywhere, and a
    link to nothing made that file's folders)."""
    path = _path(key)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # lookup() warned about it already
        previous = _read(key)
    timings = 1 + (previous[1] if previous is not None else 0)
    text = json.dumps({"key": key, "choice": choice, "timings": timings,
                       "close_call": close_call(choice, key["candidates"])})
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            path.unlink(missing_ok=True)  # a concurrent writer may have replaced it first
        with atomic_write(path) as tmp:
            tmp.write_text(text)
    except OSError as exc:  # one message per directory and reason, so it is shown once
        warnings.warn(
            f"cannot write to the decision cache in {path.parent}: {exc.strerror or exc}",
            RuntimeWarning, stacklevel=2,
        )


def _read(key: dict[str, object]) -> tuple[dict[str, object], int, bool] | None:
    """The choice stored for ``key``, how many timings it has had (files written before the
    count was kept had one) and whether it is a :func:`close_call`; or ``None``, with a
    warning for a file that cannot be read or is corrupt.

    Anything a damaged file can make decoding, parsing or checking raise counts as corrupt:
    bytes that are not text (``UnicodeDecodeError``), integers too large for a float
    (``OverflowError``) and nesting deeper than the parser's recursion (``RecursionError``)
    as well as malformed JSON or a wrong layout."""
    path = _path(key)
    try:
        raw = _read_bytes(path)  # json.loads decodes it, so bad bytes are a corrupt file
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        warnings.warn(f"cannot read decision cache file {path}: {exc}", RuntimeWarning,
                      stacklevel=3)
        return None
    try:
        if raw is None:
            raise ValueError("it is no regular file")
        if len(raw) > _MAX_BYTES:
            raise ValueError(f"it is larger than {_MAX_BYTES} bytes")
        data = json.loads(raw)
        choice = _parse(data, key)
        timings = data.get("timings", 1)
        if type(timings) is not int or timings < 1:
            raise ValueError(f"timings {timings!r} is not a count")
        close = close_call(choice, key["candidates"])
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError,
            RecursionError) as exc:
        warnings.warn(
            f"ignoring corrupt decision cache file {path} ({type(exc).__name__}: {exc}); "
            "the layer is timed again", RuntimeWarning, stacklevel=3,
        )
        return None
    return choice, timings, close


def _read_bytes(path: Path) -> bytes | None:
    """The first ``_MAX_BYTES + 1`` bytes of the file at ``path``, or ``None`` if it is no
    regular file. It is opened without blocking and checked before it is read, so a FIFO
    (which blocked the compile forever) or a device is never waited on or read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:  # checked before a file object wraps it: a directory's raised "Is a directory: 3"
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with open(fd, "rb", closefd=False) as file:
            return file.read(_MAX_BYTES + 1)
    finally:
        os.close(fd)


def _path(key: dict[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return directory() / f"{digest}.json"


def _parse(data: object, key: dict[str, object]) -> dict[str, object]:
    """The choice in ``data``, checked against ``key``: a timing's record
    (:func:`_parse_record`), or for a key of ``kind`` ``"activation"`` an activation-sparse
    layer's choice (:func:`_parse_activation`)."""
    if not isinstance(data, dict) or data.get("key") != key:
        raise ValueError("the file holds another key")
    if key.get("kind") == "activation":
        return _parse_activation(data["choice"], key["candidates"], key["rows"])
    return _parse_record(data["choice"], key["candidates"], key["rows"],
                        linear=str(key["layer"]).startswith("Linear("))


_ACTIVATION = frozenset({"decode", "activation"})
"""The keys of an activation-sparse layer's choice: the record of its single-row kernel
(:meth:`~sparsekit.engine.activation_linear.ActivationSparseLinear.tuned`) and of the
comparison with the weight-only layer (``compile``'s ``_activation_wins``)."""
_AGAINST_WEIGHT_ONLY = ("activation", "weight_only")  # what that comparison times
_COMPARISON = frozenset({"chosen", "decode", "prefill_speed", "prefill_floor"})


def activation_won(decode: Mapping[str, object], prefill_speed: Mapping[int, float],
                   floor: float) -> bool:
    """Whether an activation-sparse layer replaces its weight-only one: it won the one-row
    timing (``decode``'s ``format``) and ran every other row count at least ``floor`` of
    the weight-only layer's speed (``prefill_speed``). Compile decides by it, and a stored
    choice must agree with it."""
    return decode["format"] == "activation" and all(v >= floor for v in prefill_speed.values())


def _parse_activation(choice: object, candidates: Sequence[str], rows: Sequence[int]
                     ) -> dict[str, object]:
    """An activation-sparse layer's stored choice, checked: the kernel record (``None`` where
    no kernels were timed, else ``format``, one of ``candidates`` — ``"act_gemv"`` the
    ``"dense"`` of its timing —, ``single_copy`` if the multi-row copy was tried, and a
    timing's record of ``candidates`` at one row when they were timed), and the comparison
    (``chosen``, a timing's record of ``"activation"`` against ``"weight_only"`` at one
    row, ``prefill_speed`` a finite ratio per served row count above one, and
    ``prefill_floor``). Raises as :func:`_parse_record` does."""
    if not isinstance(choice, dict) or set(choice) != _ACTIVATION:
        raise ValueError(f"an activation-sparse choice holds {sorted(_ACTIVATION)}")
    decode, record = choice["decode"], dict(choice["activation"])
    if set(record) != _COMPARISON or type(record["chosen"]) is not bool:
        raise ValueError(f"an activation comparison holds {sorted(_COMPARISON)}, chosen a bool")
    record["decode"] = _parse_record(record["decode"], _AGAINST_WEIGHT_ONLY, [1])
    record["prefill_speed"] = _by_rows(record["prefill_speed"], [r for r in rows if r > 1],
                                       _time)
    record["prefill_floor"] = _time(record["prefill_floor"])
    # an edited "chosen" installed the layer its own evidence refused, untimed, marked cached
    if record["chosen"] != activation_won(record["decode"], record["prefill_speed"],
                                          record["prefill_floor"]):
        raise ValueError(f"chosen {record['chosen']} contradicts its timings")
    if decode is not None:
        timing = dict(decode)
        kernel, single = timing.pop("format"), timing.pop("single_copy", None)
        if kernel not in candidates or (single is not None and type(single) is not bool):
            raise ValueError(f"kernel {kernel!r} or single_copy {single!r} do not fit")
        if timing:  # timed: the record of candidates, act_gemv as their dense
            timed = ["dense" if c == "act_gemv" else c for c in candidates]
            timing = _parse_record({**timing, "format": timed[candidates.index(kernel)]},
                                  timed, [1])
        decode = {**timing, "format": kernel,
                  **({} if single is None else {"single_copy": single})}
    return {"decode": decode, "activation": record}


def _parse_record(choice: object, candidates: Sequence[str], rows: Sequence[int], *,
                 linear: bool = True) -> dict[str, object]:
    """A timing's record (:func:`~sparsekit.engine.autotune.choose`) of ``candidates`` at
    ``rows``, checked; JSON's string keys become row counts again. Raises
    ``ValueError``/``TypeError``/``KeyError`` for anything malformed.

    Only what a timing can give passes: the keys of its record (:data:`_RECORD`), a second
    format (``format_large``) only for a ``linear`` layer (compile built a
    ``CompiledLinear`` in place of a conv from one), a ``split`` that is a served row count
    (JSON's ``true`` equals the row count 1), and times, spreads and speedups that are
    finite and not negative (``json.loads`` reads ``NaN`` and ``Infinity``)."""
    choice, rows = dict(choice), list(rows)
    unknown = set(choice) - _RECORD
    if unknown:
        raise ValueError(f"keys {sorted(map(str, unknown))} are no timing's record; accepted: "
                         f"{sorted(_RECORD)}")
    large, split = choice.get("format_large"), choice.get("split")
    if (
        choice["format"] not in candidates or choice["rows"] != rows
        or (large is not None and (large not in candidates or type(split) is not int
                                   or split not in rows or not linear))
    ):
        raise ValueError(f"format {choice['format']!r}, format_large {large!r}, split "
                         f"{split!r} or rows {choice['rows']!r} do not fit")
    # the reference is dense (timed even where it may not be chosen) or a candidate; times
    # of formats never timed were accepted
    reference = choice.get("reference", "dense")
    timed = {*candidates, "dense"} if reference == "dense" else set(candidates)
    if reference not in timed or not set(choice["times_ms"]) <= timed:
        raise ValueError(f"times of {sorted(map(str, choice['times_ms']))} against "
                         f"{reference!r} are no timing of {sorted(candidates)}")
    choice["times_ms"] = {
        name: _by_rows(times, rows, _time) for name, times in choice["times_ms"].items()
    }
    choice["evidence"] = _by_rows(choice["evidence"], rows, dict)
    for record in choice["evidence"].values():
        _time(record["spread"])
    for name in ("ms_dense", "ms_chosen", "speedup", "margin"):
        choice[name] = _time(choice[name])
    return choice


def _time(value: object) -> float:
    """``value`` as a float, if it is one a timing can record: a JSON number (``"0.5"`` and
    ``true`` were read as times), finite and not negative."""
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not 0 <= value < math.inf):  # also NaN
        raise ValueError(f"{value!r} is no finite time, spread or ratio ≥ 0")
    return float(value)


def _by_rows(values: dict[str, object], rows: object, kind: Callable[[object], object]
             ) -> dict[int, object]:
    out = {int(r): kind(v) for r, v in values.items()}
    if list(out) != rows:
        raise ValueError(f"entries for rows {list(out)}, expected {rows}")
    return out


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("model name")), "")
    except OSError:
        line = ""
    return line.partition(":")[2].strip() or platform.processor() or platform.machine()


@functools.cache
def _kernel_key() -> str:
    return kernels._build_key()


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()
