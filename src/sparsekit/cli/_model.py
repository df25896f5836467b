"""The model a checkpoint belongs to, and the example input it is measured with.

Shared by ``prune`` and ``report``. ``--model`` resolves, in order of preference:

* a registered name (``sparsekit.models``), built with its default arguments;
* nothing: the architecture recorded in the checkpoint's ``model`` header entry. That entry
  is untrusted data: it resolves only through the registry (never an import), its keyword
  arguments must be integers in ``[1, 2**31)``, and the model is first built on the meta
  device and compared, name by name and shape by shape, with the tensors the file declares
  — so a crafted entry cannot make the command allocate more than the file itself declares;
* ``module:factory``, trusted code: ``module`` is imported and ``factory()`` is called, as
  ``python -c`` would. The directory the command runs in is not searched for ``module``
  (unless it is on ``PYTHONPATH``), so a file lying in the current directory is never run
  by accident.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

import sparsekit
from sparsekit import checkpoint
from sparsekit.cli._errors import UsageError
from sparsekit.masks import MaskSet
from sparsekit.models import MODELS, create_model
from sparsekit.training import inference

MAX_ARCH_ARG = 2**31 - 1  # an architecture argument (a width, a class count) above this is no model
MAX_INPUT_ELEMENTS = 2**24  # the example input only measures FLOPs: 64 MiB of float32 is plenty
DEFAULT_INPUT_SHAPE = "1,1,28,28"  # --input-shape when not given: the registered image models'

MODEL_HELP = (
    f"registered model name ({', '.join(MODELS.names())}; default: the one recorded in "
    "CKPT) or module:factory — TRUSTED CODE: imports module and calls factory(), which must "
    "return an nn.Module; the current directory is not searched unless it is on PYTHONPATH"
)


def add_checkpoint_arguments(parser: argparse.ArgumentParser, ckpt_help: str) -> None:
    """The arguments of a command that reads one checkpoint and reports on its model."""
    parser.add_argument("ckpt", help=ckpt_help)
    parser.add_argument("--model", help=MODEL_HELP)
    # no default here: a command tells a shape the user gave from none (report refuses one
    # it would ignore); example_inputs() falls back to DEFAULT_INPUT_SHAPE
    parser.add_argument("--input-shape",
                        help=f"example input shape for the FLOPs report (default: "
                        f"{DEFAULT_INPUT_SHAPE})")
    parser.add_argument("--markdown", action="store_true",
                        help="print Markdown instead of a table")


def load_checkpoint(path: str | os.PathLike, spec: str | None) -> tuple[nn.Module, MaskSet]:
    """The model for ``path`` (see :func:`model_for`) with the checkpoint loaded into it."""
    model = model_for(path, spec)
    return model, sparsekit.load(model, path)


def model_for(path: str | os.PathLike, spec: str | None) -> nn.Module:
    """The architecture for checkpoint ``path``: ``spec`` if given, else the recorded one."""
    header = read_header(path)
    if spec is None:
        return _recorded_model(Path(path), header)
    if ":" not in spec:
        if spec not in MODELS:  # create_model's "unknown model 'x'" named no flag
            raise UsageError(f"--model {spec!r} is neither a registered model nor "
                             f"module:factory; accepted: {', '.join(MODELS.names())}, or "
                             "module:factory")
        return create_model(spec)
    return _trusted_factory(spec)


# -- the checkpoint's header ----------------------------------------------------------------

@dataclass(frozen=True)
class Header:
    """What a checkpoint declares before any tensor is read: metadata and tensor shapes."""

    meta: dict[str, str]
    shapes: dict[str, tuple[int, ...]]


def read_header(path: str | os.PathLike) -> Header:
    """Read and check the header of checkpoint ``path`` without reading its tensors."""
    if not os.fspath(path).strip():  # Path("") is the current directory: "'.' is not a file"
        raise UsageError(f"checkpoint must be the path of a checkpoint file, got "
                         f"{os.fspath(path)!r}")
    path = Path(path)
    if not path.exists():
        raise UsageError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} is not a regular file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"{path} is not a readable safetensors checkpoint ({err})") from None
    if meta.get("format") != checkpoint.FORMAT:
        return Header(meta, stored)  # a plain safetensors file: every tensor as it is stored
    # checked and sealed (`model` and `tensors` included) before anything is read from it
    meta, infos = checkpoint.read_header(path)
    return Header(meta, {name: info.shape for name, info in infos.items()})


# -- the three ways to name a model ---------------------------------------------------------

def _recorded_model(path: Path, header: Header) -> nn.Module:
    """Build the architecture recorded in ``header``, checked against the declared tensors."""
    recorded = header.meta.get("model")
    if recorded is None:
        raise UsageError(
            f"{path} does not record its architecture; pass --model NAME "
            f"(registered: {', '.join(MODELS.names())}) or a trusted module:factory"
        )
    name, kwargs = _parse_record(path, recorded)
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            skeleton = create_model(name, **kwargs)
    except (TypeError, ValueError) as err:
        raise UsageError(
            f"{path}: the recorded model {_clip(recorded)} cannot be built ({err}); "
            "pass --model to choose the architecture"
        ) from None
    own = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if own != header.shapes:
        raise UsageError(
            f"{path}: the recorded model {_clip(recorded)} does not match the checkpoint's tensors "
            f"({_first_difference(own, header.shapes)}); pass --model to choose the architecture"
        )
    return create_model(name, **kwargs)


def _parse_record(path: Path, recorded: str) -> tuple[str, dict[str, int]]:
    """``(name, kwargs)`` from a ``model`` header entry ``{"name": ..., "kwargs": {...}}``."""
    try:
        record = json.loads(recorded)
    except (json.JSONDecodeError, RecursionError):  # a resealed `[[[…]]]`: was a traceback
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("name"), str) or set(
        record
    ) - {"name", "kwargs"}:
        raise UsageError(
            f"{path}: header entry 'model' must be {{\"name\": NAME, \"kwargs\": {{...}}}}, "
            f"got {_clip(recorded)!r}; pass --model to choose the architecture"
        )
    name, kwargs = record["name"], record.get("kwargs", {})
    if name not in MODELS:
        raise UsageError(
            f"{path}: recorded model {name!r} is not registered "
            f"(registered: {', '.join(MODELS.names())}); pass --model"
        )
    if not isinstance(kwargs, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_ARCH_ARG
        for v in kwargs.values()
    ):
        raise UsageError(
            f"{path}: recorded model arguments must be integers in [1, {MAX_ARCH_ARG}], "
            f"got {_clip(json.dumps(kwargs))}; pass --model to choose the architecture"
        )
    return name, kwargs


def _clip(text: str, width: int = 100) -> str:
    """``text`` cut to ``width`` characters for an error message (headers can be long)."""
    return text if len(text) <= width else text[: width - 1] + "…"


def _first_difference(own: dict[str, tuple[int, ...]], declared: dict[str, tuple[int, ...]]) -> str:
    """The first tensor (by name) whose shape differs, for the error message."""
    key = min(k for k in own.keys() | declared.keys() if own.get(k) != declared.get(k))
    return f"{key}: model {own.get(key, 'absent')}, file {declared.get(key, 'absent')}"


def _trusted_factory(spec: str) -> nn.Module:
    """Import ``module`` and call ``factory()`` for ``--model module:factory``."""
    module_name, _, attr = spec.partition(":")
    try:
        with _without_implicit_cwd():
            module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(
            f"--model {spec!r}: cannot import {module_name!r} ({err}); the current directory "
            "is not searched — put the module's directory on PYTHONPATH to trust it"
        ) from None
    except SystemExit as stop:  # sys.exit() at import ended the command with no message
        raise UsageError(f"--model {spec!r}: importing {module_name!r} exited (SystemExit "
                         f"{stop.code!r}) instead of defining {attr!r}") from None
    except Exception as err:  # the user's module failed while importing
        raise UsageError(f"--model {spec!r}: importing {module_name!r} raised "
                         f"{type(err).__name__}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(f"--model {spec!r}: {module_name} has no callable {attr!r}")
    try:
        model = factory()
    except SystemExit as stop:
        raise UsageError(
            f"--model {spec!r}: {attr}() exited (SystemExit {stop.code!r}) instead of "
            "returning an nn.Module"
        ) from None
    except Exception as err:  # the user's factory failed
        raise UsageError(f"--model {spec!r}: {attr}() raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


@contextmanager
def _without_implicit_cwd() -> Iterator[None]:
    """``sys.path`` without the current directory that ``python -m``/``-c`` put first.

    An entry the user added on purpose (``PYTHONPATH``, ``sys.path.insert``) stays; with
    ``python -P`` (``sys.flags.safe_path``) Python added nothing and nothing is removed.
    """
    first = sys.path[0] if sys.path else None
    implicit = not sys.flags.safe_path and first is not None and (
        first == "" or os.path.abspath(first) == os.getcwd()
    )
    if not implicit:
        yield
        return
    del sys.path[0]
    try:
        yield
    finally:
        sys.path.insert(0, first)


# -- the example input -----------------------------------------------------------------------

def token_inputs(shape: str, model: nn.Module, seed: int = 0) -> torch.Tensor:
    """Random token ids of ``--tokens`` ``shape`` (``BATCH,SEQ``) below the vocabulary size
    of ``model`` (a transformers model: its input embeddings), checked by running it."""
    dims = _dims("--tokens", shape, "1,128")
    if len(dims) != 2:
        raise UsageError(f"--tokens must be BATCH,SEQ like 1,128, got {shape!r}")
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    vocab = getattr(embeddings, "num_embeddings", None)
    if not isinstance(vocab, int):
        raise UsageError("--tokens needs a model with token embeddings (a transformers model); "
                         "use --input-shape for float inputs")
    x = torch.randint(0, vocab, dims, generator=torch.Generator().manual_seed(seed))
    _check_runs(model, x, "--tokens", shape)
    return x


def _dims(flag: str, shape: str, example: str) -> tuple[int, ...]:
    """``shape`` as positive integers, at most :data:`MAX_INPUT_ELEMENTS` in all."""
    try:
        dims = tuple(int(d) for d in shape.split(","))
    except ValueError:
        raise UsageError(
            f"{flag} must be comma-separated integers like {example}, got {shape!r}"
        ) from None
    if any(d < 1 for d in dims):
        raise UsageError(f"{flag} dimensions must be ≥ 1, got {shape!r}")
    if math.prod(dims) > MAX_INPUT_ELEMENTS:
        raise UsageError(
            f"{flag} {shape!r} has {math.prod(dims):,} elements; at most "
            f"{MAX_INPUT_ELEMENTS:,} are accepted (the input only measures FLOPs)"
        )
    return dims


def _check_runs(model: nn.Module, x: torch.Tensor, flag: str, shape: str) -> None:
    """Raise ``UsageError`` naming ``flag`` unless ``model`` runs on ``x`` (a ``TypeError``
    too: a model whose forward takes other arguments was an error naming no flag)."""
    try:
        with inference(model):
            model(x)
    except (RuntimeError, IndexError, ValueError, TypeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{flag} {shape!r} does not fit the model ({reason})") from None


def example_inputs(shape: str | None, model: nn.Module) -> torch.Tensor:
    """A zero tensor of ``--input-shape`` ``shape`` (``None``: :data:`DEFAULT_INPUT_SHAPE`),
    checked by running ``model`` on it."""
    shape = DEFAULT_INPUT_SHAPE if shape is None else shape
    x = torch.zeros(_dims("--input-shape", shape, DEFAULT_INPUT_SHAPE))
    if x.dim() >= 2 and callable(getattr(model, "get_input_embeddings", None)):
        raise UsageError(f"--input-shape {shape!r} gives float inputs, but this model reads "
                         "token ids: use --tokens BATCH,SEQ")
    _check_runs(model, x, "--input-shape", shape)
    return x
