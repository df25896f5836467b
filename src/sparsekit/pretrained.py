"""Hugging Face directories with compressed weights: ``save_pretrained`` / ``from_pretrained``.

A directory written by :func:`save_pretrained` is what ``PreTrainedModel.save_pretrained``
writes (``config.json``, ``generation_config.json`` for generative models, the tokenizer's
files when one is given) except for the weights: they are one :mod:`sparsekit.checkpoint`
file, :data:`WEIGHTS_NAME`, whose pruned tensors are stored compressed and whose other
tensors are ordinary ones (optionally smaller: bfloat16, or int8 codes with one float32 scale
per row, ``dense_dtype``). A compiled model (:func:`sparsekit.compile`) keeps its formats,
and its activation-sparse layers their kernels and input thresholds; the layers to rebuild
are recorded in the checkpoint's sealed header, so :func:`from_pretrained` rebuilds exactly
that model.

Plain ``transformers`` must never load such a directory by re-initialising the layers it
does not recognise. Two guards make it refuse instead: ``config.json``'s ``model_type`` is
:data:`REFUSAL`, a sentence naming :func:`from_pretrained` that every ``AutoConfig`` /
``AutoModel*.from_pretrained`` (and so ``SentenceTransformer``) reports in its
``ValueError`` ("has model type `sparsekit: load with sparsekit.from_pretrained(path)` but
Transformers does not recognize this architecture"); and there is no ``model.safetensors``
(or ``pytorch_model.bin``), so a concrete class (``LlamaForCausalLM.from_pretrained``, which
only warns about the model type) finds no weights and raises ``OSError``. The entry
``"sparsekit"`` of ``config.json`` keeps the original ``model_type``; :func:`from_pretrained`
restores it, so the model it returns has a plain config.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsekit import checkpoint
from sparsekit._atomic import (
    atomic_write,
    blocking_parent,
    directory_lock,
    sync,
    unwritable,
    write_target,
)
from sparsekit._checks import ArgumentTypeError, check_materialized_module
from sparsekit.engine import fused
from sparsekit.engine.activation_linear import GROUPED_KERNELS as GROUPED_ACTIVATION_KERNELS
from sparsekit.engine.activation_linear import KERNELS as ACTIVATION_KERNELS
from sparsekit.engine.activation_linear import ActivationSparseLinear, check_column_index
from sparsekit.engine.compile import conv1d_names, tied_weights
from sparsekit.engine.compiled_conv import CompiledConv2d
from sparsekit.engine.compiled_linear import CompiledLinear
from sparsekit.engine.fused import FusedLinear
from sparsekit.masks import MaskSet
from sparsekit.quantize import (
    SCALE_NAME,
    attached_scales,
    dequantize_grid,
    dequantize_int8,
    group_size_of,
    install_scales,
    int8_scales,
    quantize_int8,
)

__all__ = ["MARKER", "REFUSAL", "WEIGHTS_NAME", "from_pretrained", "save_pretrained"]

WEIGHTS_NAME = "sparsekit.safetensors"
GENERATION_NAME = "generation_config.json"
MARKER = "sparsekit"  # the config.json entry that marks a sparsekit directory
MARKER_VERSION = 1
REFUSAL = "sparsekit: load with sparsekit.from_pretrained(path)"  # config.json's model_type
DENSE_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8}
ROW_SCALE_SUFFIX = "_row_scale"  # int8 dense tensor ``<owner>.<leaf>``: scales ``<leaf>_row_scale``
_META_KEY = "pretrained"  # the checkpoint header entry describing the model to rebuild
_CASTABLE = (torch.float32, torch.float64, torch.float16)
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")
"""The weight files a concrete ``transformers`` class loads from a directory."""


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    masks: MaskSet | None = None,
    *,
    tokenizer: Any = None,
    dense_dtype: str | None = None,
) -> Path:
    """Write ``model`` (a ``transformers`` ``PreTrainedModel``, pruned or compiled) to
    ``directory`` as a Hugging Face directory with compressed weights; return the directory.

    The weights go to :data:`WEIGHTS_NAME` through :func:`sparsekit.save` (with ``masks``,
    their parameters are stored by mask; without, any parameter is stored compressed where
    that is smaller; a compiled layer's format is stored as it is). ``tokenizer`` (anything
    with ``save_pretrained``) is saved beside it.

    ``dense_dtype`` shrinks the floating-point tensors that stay dense (outside ``masks``
    and the compiled layers, and without masks too dense to be stored compressed):

    - ``"bf16"`` stores them (embeddings, norms, biases, unpruned layers) in bfloat16;
    - ``"int8"`` stores those of rank ≥ 2 (embeddings, unpruned layers) as int8 codes with
      one float32 scale per row (:func:`sparsekit.quantize.quantize_int8`: each entry is off
      by at most half a step, ``max|row| / 254``; zeros stay zero), a quarter of their
      float32 bytes; the small 1-D tensors (norms, biases) keep their dtype. A weight that
      already lies on an int8 grid (:func:`~sparsekit.quantize.attach_scales`) is stored
      on that grid, exactly; one that has left the grid it records (changed since, e.g.
      fine-tuned) gets scales of its own, as any other weight.

    :func:`from_pretrained` turns them back into the model's dtype, so they round-trip
    exactly only if they were bfloat16 (``"bf16"``) or on their int8 grid already; pruned
    and compiled layers are never touched. Everything that can fail is done before the
    old ``config.json`` is removed: a save refused (bad masks, a weight int8 cannot hold)
    or failing (the tokenizer's save, a full disk) leaves an earlier save in ``directory``
    loadable as it was (the tokenizer's own files aside); only a crash between the final
    renames leaves no loadable directory, as ``config.json`` is renamed last. Two saves to
    one directory at once run one after the other (:func:`sparsekit._atomic.directory_lock`;
    not on platforms without ``fcntl``, such as Windows, where concurrent saves to one
    directory are not supported), so the directory holds one of them, whole. A directory
    holding ``transformers``' own weight files (:data:`HF_WEIGHTS`, e.g. a
    ``model.save_pretrained`` there before) is refused: a concrete class would load those.
    So is, before anything is written, a model :func:`from_pretrained` could not rebuild
    (a ``PeftModel``, a weight under a parametrization, blocks replaced by
    :mod:`sparsekit.moe`): :func:`sparsekit.save` stores those. Runtime state is not
    stored, as ``transformers`` stores no ``attn_implementation``: thresholds applied with
    hooks (:meth:`~sparsekit.activation.ActivationSparsity.save` keeps those) and
    :func:`sparsekit.attention.apply`'s settings are applied again after loading.
    """
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or not callable(getattr(config, "to_json_string", None)):
        raise ArgumentTypeError(
            f"model must be a transformers PreTrainedModel (an nn.Module with a .config), got "
            f"{type(model).__name__}"
        )
    if masks is not None and not isinstance(masks, MaskSet):
        raise ArgumentTypeError(f"masks must be a MaskSet or None, got {type(masks).__name__}")
    if tokenizer is not None and not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ArgumentTypeError(f"tokenizer must have a save_pretrained method, got "
                        f"{type(tokenizer).__name__}")
    stored_as = _check_dense_dtype(dense_dtype)
    path = _check_save_directory(directory)
    check_no_transformers_weights(path, f"directory {str(path)!r}")
    writes = [WEIGHTS_NAME, "config.json"]
    if _generation_config(model) is not None:
        writes.append(GENERATION_NAME)
    _check_files(path, os.fspath(directory), writes)
    # its tensors are read only in the write, after the directory was created
    check_materialized_module(model, "model: ")
    compiled = compiled_layers(model)
    _check_rebuilds(model, compiled)
    dtype = _model_dtype(model, compiled)
    cast = [] if stored_as is None else _dense_tensors(model, masks, compiled, stored_as)
    record = {"version": MARKER_VERSION, "dtype": str(dtype), "compiled": compiled,
              "cast": {"dtype": str(stored_as), "keys": cast} if cast else None}

    path.mkdir(parents=True, exist_ok=True)
    with directory_lock(path):  # another writer of this directory waits for this save
        _write_directory(model, path, masks, record, cast, stored_as, tokenizer)
    return path


def _write_directory(model: nn.Module, path: Path, masks: MaskSet | None,
                     record: dict[str, Any], cast: list[str], stored_as: torch.dtype | None,
                     tokenizer: Any) -> None:
    """:func:`save_pretrained`'s writes, under the lock of ``path``."""
    # a link named as the weights is written through, as atomic_write does: the file it
    # leads to is replaced and the link kept (the rename over the link replaced it with a
    # regular file, leaving the file it named stale)
    weights = write_target(path / WEIGHTS_NAME)
    weights.parent.mkdir(parents=True, exist_ok=True)  # a link to nothing: its folders
    checkpoint._remove_stale_temps(weights)  # killed saves' pending weights
    # the weights are checked and encoded (under a name of this call's own, beside the file
    # they replace: a rename stays on one file system) before anything goes; named like
    # atomic_write's temporary files, so a killed save's is removed by a later one
    fd, name = tempfile.mkstemp(prefix=f".{weights.name}.{os.getpid()}-", suffix=".tmp",
                                dir=weights.parent)
    os.close(fd)
    pending = Path(name)
    generation_pending: Path | None = None
    try:
        with _stored_as(model, cast, stored_as):
            checkpoint.save(model, pending, masks,
                            metadata={_META_KEY: json.dumps(record, sort_keys=True)})
        # Everything that may fail goes before the old config: the tokenizer's and the
        # generation config's own files, then the new config, written and flushed. Only
        # the renames come after it (the directory is loadable again once they are done).
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        if (generation := _generation_config(model)) is not None:
            # under a name of its own, renamed with the weights: written in place, a save
            # that failed later left the old model with the new generation settings
            checkpoint._remove_stale_temps(path / GENERATION_NAME)
            fd, name = tempfile.mkstemp(prefix=f".{GENERATION_NAME}.{os.getpid()}-",
                                        suffix=".tmp", dir=path)
            os.close(fd)
            generation_pending = Path(name)
            generation.save_pretrained(path, config_file_name=generation_pending.name)
        with atomic_write(path / "config.json") as config_tmp:
            _write_config(model, config_tmp)
            sync(config_tmp)
            # the file a link leads to: unlinking the link lost it, and the new config went
            # to that file, leaving the directory without a config.json
            write_target(path / "config.json").unlink(missing_ok=True)
            os.replace(pending, weights)
            if generation_pending is not None:
                os.replace(generation_pending, write_target(path / GENERATION_NAME))
    finally:
        for temporary in (pending, generation_pending):
            if temporary is not None:
                temporary.unlink(missing_ok=True)


def from_pretrained(directory: str | os.PathLike) -> nn.Module:
    """The model saved by :func:`save_pretrained` in ``directory``, in eval mode.

    The architecture comes from ``config.json`` (a ``transformers`` class named in
    ``architectures``), compiled layers are rebuilt as recorded and keep their formats, and
    the weights are loaded by :func:`sparsekit.load`, which checks the file (its seal,
    shapes, dtypes and masks) before the model is touched. Tensors stored in a
    ``dense_dtype`` come back in the model's dtype (int8 codes times their row's scale).
    The masks the file holds are the returned model's ``sparsekit_masks`` (a
    :class:`~sparsekit.MaskSet`, e.g. to fine-tune with them). Needs ``transformers``.
    """
    _check_directory(directory)
    path = Path(directory)
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"directory {str(path)!r} does not exist or is not a directory")
    if not config_file.is_file():
        what = ("its config.json is no regular file" if config_file.exists()
                else "no config.json")  # a directory in its place was "no config.json"
        raise ValueError(f"{str(path)!r} is not a save_pretrained directory ({what})")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ValueError(f"{config_file}: not a JSON object ({err})") from None
    if not isinstance(data, dict):  # a list's pop(MARKER, None) was a bare TypeError
        raise ValueError(f"{config_file}: not a JSON object (a {type(data).__name__})")
    marker = data.pop(MARKER, None)
    if not isinstance(marker, dict) or not isinstance(marker.get("model_type"), str):
        raise ValueError(
            f"{str(path)!r} was not written by sparsekit.save_pretrained (config.json has no "
            f"{MARKER!r} entry); load it with transformers' from_pretrained"
        )
    weights = path / WEIGHTS_NAME
    meta, infos = checkpoint.read_header(weights)
    record = _read_record(weights, meta)
    transformers = _transformers()
    data["model_type"] = marker["model_type"]
    if data["model_type"] not in transformers.CONFIG_MAPPING:
        raise ValueError(f"{config_file}: model type {data['model_type']!r} is not one this "
                         f"transformers {transformers.__version__} knows")
    with config_errors(str(config_file)):
        config = transformers.CONFIG_MAPPING[data["model_type"]].from_dict(data)
    cls = _model_class(transformers, config, config_file)
    dtype = checkpoint._DTYPES[record["dtype"]]
    _check_sizes(cls, config, dtype, infos, record["compiled"], config_file, weights)
    with config_errors(str(config_file)):
        model = cls._from_config(config, dtype=dtype)
    _resize_to_config(model, config)
    _install_compiled(model, record["compiled"], weights, infos)
    install_scales(model, {k: v.shape for k, v in infos.items() if k.endswith(f".{SCALE_NAME}")})
    cast = record["cast"] or {"keys": [], "dtype": None}
    stored_dtype = None if not cast["keys"] else checkpoint._DTYPES[cast["dtype"]]
    with _stored_as(model, cast["keys"], stored_dtype, restore=False,
                    saved={k: tuple(v.shape) for k, v in infos.items()}) as originals:
        masks = checkpoint.load(model, weights)
        _check_activation_layers(model, weights)
        for key, (dtype, grad) in originals.items():  # back to the model's own dtype
            _set_tensor(model, key, _restored(model, key, stored_dtype).to(dtype))
            _get_tensor(model, key).requires_grad_(grad)
    if (path / GENERATION_NAME).is_file() and hasattr(model, "generation_config"):
        # a JSON list or a value it cannot take was a raw TypeError or ValueError
        with config_errors(str(path / GENERATION_NAME), "generation config"):
            model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    if masks.masks:
        model.sparsekit_masks = masks
    return model.eval()


# -- what the header records ----------------------------------------------------------------

def compiled_layers(model: nn.Module) -> dict[str, dict[str, object]]:
    """The compiled layers of ``model`` by name, each as what rebuilds an empty one of its
    kind and shape (its format comes from the weights): ``{"kind": "linear" | "conv2d"}``;
    for a fused group, ``{"kind": "fused", "members": [names], "sizes": [rows]}`` under the
    name of its first member; for an :class:`ActivationSparseLinear`, ``{"kind":
    "activation"}`` with its ``kernel``, input ``dtype``, ``int8`` values or not, ``threads``
    and ``prefill`` (``"linear"`` for a compiled layer serving several rows, or ``None``),
    which a fused group whose stacked layer is one holds as its ``"linear"``."""
    first: dict[int, str] = {}
    out: dict[str, dict[str, object]] = {}
    groups: dict[int, list[tuple[int, str]]] = {}
    fused_members: list[str] = []  # what lies under them is their group's record
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in first:
            if isinstance(module, (CompiledLinear, CompiledConv2d, FusedLinear,
                                   ActivationSparseLinear)):
                raise ValueError(f"compiled layer {name!r} is shared with "
                                 f"{first[id(module)]!r}; save_pretrained cannot rebuild that")
            continue
        first[id(module)] = name
        if _under(name, out) or any(name.startswith(f"{m}.") for m in fused_members):
            continue  # an activation-sparse layer's prefill, a fused group's stacked layer
        if isinstance(module, ActivationSparseLinear):
            out[name] = _activation_record(name, module)
        elif isinstance(module, FusedLinear):
            groups.setdefault(id(module._group), []).append((module.index, name))
            fused_members.append(name)
        elif isinstance(module, CompiledConv2d):
            out[name] = {"kind": "conv2d"}
        elif isinstance(module, CompiledLinear):
            out[name] = {"kind": "linear"}
    for members in groups.values():
        names = [n for _, n in sorted(members)]
        group = model.get_submodule(names[0])._group
        out[names[0]] = {"kind": "fused", "members": names, "sizes": list(group.sizes)}
        if isinstance(group.linear, ActivationSparseLinear):
            out[names[0]]["linear"] = _activation_record(f"{names[0]}.group.linear",
                                                         group.linear)
    return dict(sorted(out.items()))


def _activation_record(name: str, layer: ActivationSparseLinear) -> dict[str, object]:
    prefill = layer.prefill
    if prefill is not None and type(prefill) is not CompiledLinear:
        raise ValueError(
            f"layer {name!r}: an ActivationSparseLinear whose prefill is a "
            f"{type(prefill).__name__} cannot be rebuilt; accepted: a CompiledLinear (what "
            "sparsekit.compile builds) or none"
        )
    return {"kind": "activation", "kernel": layer.kernel, "dtype": str(layer.dtype),
            "int8": layer.scales is not None, "threads": layer.threads,
            "prefill": None if prefill is None else "linear"}


def _read_record(weights: Path, meta: dict[str, str]) -> dict[str, Any]:
    """The checked ``pretrained`` record of the sealed weights header ``meta``."""
    try:
        record = json.loads(meta[_META_KEY])
    except (KeyError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{weights}: the header has no valid {_META_KEY!r} record") from None
    cast = record.get("cast") if isinstance(record, dict) else None
    if (
        not isinstance(record, dict) or record.get("version") != MARKER_VERSION
        or record.get("dtype") not in checkpoint._DTYPES
        or not isinstance(record.get("compiled"), dict)
        or not (cast is None or isinstance(cast, dict)
                and cast.get("dtype") in {str(d) for d in DENSE_DTYPES.values()}
                and isinstance(cast.get("keys"), list)
                and all(isinstance(k, str) for k in cast["keys"]))
    ):
        raise ValueError(f"{weights}: the {_META_KEY!r} record is malformed or of another "
                         f"version (this sparsekit reads version {MARKER_VERSION})")
    return record


# -- rebuilding -----------------------------------------------------------------------------

def _check_rebuilds(model: nn.Module, compiled: dict[str, dict[str, object]]) -> None:
    """Raise ``ValueError`` before anything is written unless :func:`from_pretrained` can
    rebuild ``model``: the class its config names, built on the meta device (and cut to
    the recorded widths), must hold a linear layer (or convolution) where each compiled
    layer is and exactly the model's other tensors. A ``PeftModel``, a weight still under a
    parametrization (a masked delta fine-tune) or a block replaced by :mod:`sparsekit.moe`
    was written, over an earlier save, as a directory that no call could load."""
    config = copy.copy(model.config)
    config.architectures = [type(model).__name__]  # as _write_config records it
    try:
        transformers = _transformers()
        cls = _model_class(transformers, config, Path("config.json"))
        with torch.device("meta"):
            skeleton = cls._from_config(config)
        _resize_to_config(skeleton, config)
    except Exception:  # no transformers or no class for its config: the save names it
        return
    accepted = ("accepted: a transformers model of its config's architecture, pruned or "
                "compiled (merge a PeftModel with merge_and_unload, or a masked delta with "
                "merge, first), or sparsekit.save for any other model")
    for name, spec in compiled.items():
        for member in spec.get("members", [name]):
            try:
                layer = skeleton.get_submodule(member)
            except AttributeError:
                layer = None
            weight = getattr(layer, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
                raise ValueError(
                    f"model: its compiled layer {member!r} is no layer of a "
                    f"{cls.__name__} ({type(layer).__name__}), so from_pretrained could not "
                    f"rebuild it; {accepted}")
    # attached int8 grids are installed from the file (install_scales)
    held = {k for k in model.state_dict()
            if not _under(k, compiled) and not k.endswith(f".{SCALE_NAME}")}
    expected = {k for k in skeleton.state_dict() if not _under(k, compiled)}
    if held != expected:
        extra, missing = sorted(held - expected), sorted(expected - held)
        raise ValueError(
            f"model: from_pretrained would rebuild a {cls.__name__}, whose tensors these are "
            f"not (the model's own: {extra[:3]}; the {cls.__name__}'s missing: {missing[:3]}); "
            f"{accepted}")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise ImportError("from_pretrained needs transformers: pip install 'sparsekit[llm]'"
                          ) from err
    return transformers


def _model_class(transformers: Any, config: Any, config_file: Path) -> Any:
    """The ``transformers`` class named first in ``config.architectures`` (only attributes of
    the ``transformers`` package are looked up: nothing is imported), else the base model
    ``AutoModel`` maps the config to (a subclass of the user's own saves as its name).

    A named class built for another config class (``BertModel`` for a LLaMA config) is a
    ``ValueError``: it failed deep inside its ``__init__`` with a bare ``AttributeError``.
    """
    names = config.architectures if isinstance(config.architectures, list) else []
    for name in names:
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            check_config_class(cls, config, str(config_file))
            return cls
    if type(config) not in transformers.MODEL_MAPPING:
        raise ValueError(f"{config_file}: architectures={config.architectures!r} names no "
                         f"transformers model class, and none is known for a "
                         f"{type(config).__name__}")
    return transformers.MODEL_MAPPING[type(config)]


def _check_sizes(cls: Any, config: Any, dtype: torch.dtype, infos: dict[str, checkpoint.TensorInfo],
                 compiled: dict[str, Any], config_file: Path, weights: Path) -> None:
    """Raise ``ValueError`` naming ``config_file`` unless every tensor of the model it
    describes (a skeleton built on the meta device: no memory) that ``weights`` holds has
    the shape the file declares (compiled layers aside: their formats store other tensors).

    Built for real first, a tampered size (an ``intermediate_size`` of ``10**8``) allocated
    and initialised a model of that size before ``sparsekit.load`` found the mismatch: tens
    of gigabytes, or the out-of-memory killer ending the process.
    """
    try:
        with torch.device("meta"):
            skeleton = cls._from_config(config, dtype=dtype)
    except Exception:  # the real build below names it (config_errors), or succeeds
        return
    _resize_to_config(skeleton, config)
    for key, tensor in skeleton.state_dict().items():
        info = infos.get(key)
        if info is not None and not _under(key, compiled) and tuple(info.shape) != tuple(
                tensor.shape):
            raise ValueError(
                f"{config_file}: the model it describes has {key!r} of shape "
                f"{tuple(tensor.shape)}, but {weights.name} holds {tuple(info.shape)}; "
                "accepted: the config.json saved with these weights (were its sizes changed?)"
            )


def _resize_to_config(model: nn.Module, config: Any) -> None:
    """Cut ``model``, just built from ``config``, to the per-layer shapes the config records
    (``sparsekit_shapes``: :func:`sparsekit.llm.prune_structured` left blocks of different
    widths, or FLAP biases the architecture lacks), as
    :func:`sparsekit.llm.load_pretrained` does: built from the plain config, such a model
    was refused for tensors of the shapes it was saved with."""
    from sparsekit.llm.structured import SHAPES_KEY, resize_to_recorded

    if hasattr(config, SHAPES_KEY):
        resize_to_recorded(model, getattr(config, SHAPES_KEY), "directory")


def check_config_class(cls: type, config: Any, where: str) -> None:
    """Raise ``ValueError`` unless the ``transformers`` model class ``cls`` takes ``config``
    (its ``config_class``): ``where`` (the config file) names the mismatch."""
    wanted = getattr(cls, "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        raise ValueError(f"{where}: architectures names {cls.__name__}, which takes a "
                         f"{wanted.__name__}, but the config is a {type(config).__name__} "
                         f"(model_type {getattr(config, 'model_type', None)!r})")


@contextmanager
def config_errors(where: str, what: str = "model") -> Iterator[None]:
    """Turn an error of ``transformers`` building a config or a model from a config file
    (``where``) into a ``ValueError`` naming the file: values no model can have (a negative
    width, zero heads, a float size) failed with a bare ``RuntimeError``,
    ``ZeroDivisionError``, ``KeyError`` or huggingface_hub's validation error. ``what`` the
    file describes goes in the message. A missing file (``OSError``), a missing dependency
    and running out of memory pass through."""
    try:
        yield
    except (OSError, ImportError, torch.OutOfMemoryError):
        raise
    except Exception as e:
        raise ValueError(f"{where} describes no {what} this transformers can build "
                         f"({type(e).__name__}: {e})") from e


def check_no_transformers_weights(path: Path, what: str) -> None:
    """Raise ``ValueError`` (its message starting with ``what``) where the directory
    ``path`` holds ``transformers``' own weight files (:data:`HF_WEIGHTS`): beside the
    config a save writes, ``LlamaForCausalLM.from_pretrained`` loaded them (on a
    default-sized config: the old dense weights of a 7B model), the second guard gone."""
    if stale := [n for n in HF_WEIGHTS if os.path.lexists(path / n)]:
        raise ValueError(
            f"{what} holds transformers weights ({', '.join(stale)}), which a transformers "
            "class would load instead of these; accepted: a new directory, or one without "
            "them (remove them first)"
        )


def _check_save_directory(directory: object) -> Path:
    """``directory`` as the ``Path`` :func:`save_pretrained` writes, or a ``ValueError``
    naming it: ``""`` (which pathlib reads as ``"."``) wrote into the working directory, a
    NUL character was a ``ValueError`` naming nothing, and a name that is no directory
    (a file, a dangling link) or lies under a file or a broken link failed with a raw
    ``OSError`` of the directory's creation."""
    _check_directory(directory)
    raw = os.fspath(directory)
    path = Path(directory)
    what = ("is empty (use '.' for the working directory)" if raw == ""
            else "holds a NUL character" if "\0" in raw
            else "exists and is not a directory" if os.path.lexists(path) and not path.is_dir()
            else None)
    if what is None and (blocker := blocking_parent(path)):
        what = f"lies under {str(blocker[0])!r}, {blocker[1]}"
    if what is not None:
        raise ValueError(f"directory {raw!r} {what}; accepted: the path of a directory to "
                         "create or to write into")
    return path


def _generation_config(model: nn.Module) -> Any:
    """The generation config :func:`save_pretrained` writes beside ``model``'s config: a
    generative transformers model's ``generation_config``, else ``None``."""
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", lambda: False)
    return generation if generation is not None and can_generate() else None


def _check_files(path: Path, raw: str, names: list[str]) -> None:
    """Raise ``ValueError`` naming ``directory`` (given as ``raw``) where one of the files
    :func:`save_pretrained` writes into it (``names``) cannot be written
    (:func:`~sparsekit._atomic.unwritable`: a directory, a link to one, a link that loops, a
    device or FIFO): the write of that file failed with a raw ``OSError``, after the files
    written before it (the generation config) had changed."""
    for name in names:
        if what := unwritable(path / name):
            raise ValueError(f"directory {raw!r}: its {name!r} is {what}, where save_pretrained "
                             "writes a file; accepted: a directory where that name is free, a "
                             "file, or a link to a file (nothing was written)")


def _check_directory(directory: object) -> None:
    """Raise :class:`~sparsekit._checks.ArgumentTypeError` unless ``directory`` is a path
    (``Path(None)`` was a bare ``TypeError``)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise ArgumentTypeError(f"directory must be a str or os.PathLike path, got "
                                f"{type(directory).__name__}")


def _install_compiled(model: nn.Module, compiled: dict[str, Any], weights: Path,
                      infos: dict[str, checkpoint.TensorInfo]) -> None:
    """Replace the recorded layers of the freshly built ``model`` by empty compiled layers
    of the same shape (dense format; loading installs the saved ones). As compile does, it
    records the GPT-2 ``Conv1D`` layers among them (``model.sparsekit_conv1d``) and those
    whose weight was tied (``model.sparsekit_tied``), which decompile gives back as they
    were."""
    built = dict(model.named_modules(remove_duplicate=False))
    ties, conv1d = tied_weights(model), conv1d_names(model)
    for name, spec in compiled.items():
        kind = spec.get("kind") if isinstance(spec, dict) else None
        if kind == "linear":
            model.set_submodule(name, CompiledLinear.from_linear(_plain(model, name, weights)))
        elif kind == "conv2d":
            conv = _plain(model, name, weights)
            if not isinstance(conv, nn.Conv2d):
                raise ValueError(f"{weights}: compiled conv2d {name!r} is a "
                                 f"{type(conv).__name__} in this architecture")
            model.set_submodule(name, CompiledConv2d.from_conv2d(conv))
        elif kind == "fused":
            _install_fused(model, spec, weights, infos)
        elif kind == "activation":
            linear = _plain(model, name, weights)
            model.set_submodule(name, _empty_activation(linear, name, spec, infos, weights))
        else:
            raise ValueError(f"{weights}: compiled layer {name!r} has an unknown record "
                             f"{spec!r:.100}")
    if conv1d:  # those left Conv1D stay so; decompile skips them
        model.sparsekit_conv1d = conv1d
    names = [n for name, spec in compiled.items()  # each record checked above
             for n in (spec["members"] if spec["kind"] == "fused" else [name])]
    if copies := {n: ties[id(built[n])] for n in names if id(built[n]) in ties}:
        model.sparsekit_tied = copies


def _empty_activation(linear: nn.Linear, name: str, spec: dict[str, Any],
                      infos: dict[str, checkpoint.TensorInfo],
                      weights: Path) -> ActivationSparseLinear:
    """An :class:`ActivationSparseLinear` as recorded in ``spec``, of the shape of
    ``linear`` (the model's layer ``name``), whose int8 scales (per row, or per group of
    inputs where the kernel reads them) have the size the header declares (loading fills
    them, the stored weights, of any number, and the thresholds)."""
    kernel, dtype, threads = spec.get("kernel"), spec.get("dtype"), spec.get("threads")
    if (kernel not in ACTIVATION_KERNELS or dtype not in checkpoint._DTYPES
            or spec.get("int8") not in (True, False) or spec.get("prefill") not in (None, "linear")
            or not (threads is None or type(threads) is int and threads >= 1)):
        raise ValueError(f"{weights}: malformed activation-sparse layer record {spec!r:.200}")
    linear = linear.to(checkpoint._DTYPES[dtype])
    prefill = None if spec["prefill"] is None else CompiledLinear.from_linear(linear)
    layer = ActivationSparseLinear.from_linear(
        linear, 0.0, threads=threads, kernel=kernel, prefill=prefill,
        value_dtype=torch.int8 if spec["int8"] else None,
    )
    info = infos.get(f"{name}.scales")
    if (layer.scales is not None and info is not None and len(info.shape) == 2
            and kernel in GROUPED_ACTIVATION_KERNELS and info.shape[0] == layer.out_features
            and 1 <= info.shape[1] <= layer.in_features
            and layer.in_features % info.shape[1] == 0):  # a grid per group of inputs
        layer._buffers["scales"] = layer.scales.new_ones(info.shape)
    return layer


def _check_activation_layers(model: nn.Module, weights: Path) -> None:
    """Raise ``ValueError`` unless every loaded ``act_sparse_gemv`` layer's column index is
    consistent (:func:`~sparsekit.engine.activation_linear.check_column_index`)."""
    for name, layer in model.named_modules():
        if isinstance(layer, ActivationSparseLinear) and layer.kernel == "act_sparse_gemv":
            check_column_index(layer.colptr, layer.row_indices, layer.values,
                               layer.out_features, layer.block, name=f"{weights}: {name}")


def _install_fused(model: nn.Module, spec: dict[str, Any], weights: Path,
                   infos: dict[str, checkpoint.TensorInfo]) -> None:
    names, sizes = spec.get("members"), spec.get("sizes")
    if not (isinstance(names, list) and isinstance(sizes, list) and len(names) == len(sizes) >= 2
            and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{weights}: malformed fused group record {spec!r:.100}")
    layers = [_plain(model, n, weights) for n in names]
    if [layer.out_features for layer in layers] != sizes or len(
        {(layer.in_features, layer.bias is None) for layer in layers}
    ) != 1:
        raise ValueError(f"{weights}: fused group {names} does not match this architecture")
    members = fused.placeholder(layers[0].in_features, sizes, layers[0].bias is not None,
                                layers[0].weight.dtype)
    if (record := spec.get("linear")) is not None:  # its stacked layer activation-sparse
        if not isinstance(record, dict) or record.get("kind") != "activation":
            raise ValueError(f"{weights}: malformed fused group record {spec!r:.100}")
        group = members[0]._group
        group.linear = _empty_activation(group.linear.to_linear(), f"{names[0]}.group.linear",
                                         record, infos, weights)
    for name, member in zip(names, members, strict=True):
        model.set_submodule(name, member)


def _plain(model: nn.Module, name: str, weights: Path) -> nn.Module:
    """The built model's layer ``name``, which must be a plain ``nn.Linear``/``nn.Conv2d``
    or a layer with ``in_features``/``out_features`` and ``weight`` (e.g. GPT-2's Conv1D,
    read as the linear layer it computes)."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        layer = None
    if isinstance(layer, (nn.Linear, nn.Conv2d)):
        return layer
    weight = getattr(layer, "weight", None)
    if layer is None or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{weights}: the compiled layer {name!r} is no linear layer of this "
                         f"architecture ({type(layer).__name__})")
    out_features, in_features = weight.shape[::-1] if weight.shape[0] == getattr(
        layer, "nx", -1) else weight.shape
    linear = nn.Linear(in_features, out_features, bias=getattr(layer, "bias", None) is not None,
                       dtype=weight.dtype)
    return linear


# -- dense tensors in another dtype -----------------------------------------------------------

def _check_dense_dtype(dense_dtype: str | None) -> torch.dtype | None:
    if dense_dtype is None:
        return None
    if not isinstance(dense_dtype, str) or dense_dtype not in DENSE_DTYPES:
        raise ValueError(f"dense_dtype must be None or one of {list(DENSE_DTYPES)}, got "
                         f"{dense_dtype!r}")
    return DENSE_DTYPES[dense_dtype]


def _model_dtype(model: nn.Module, compiled: dict[str, Any]) -> torch.dtype:
    """The dtype the model is built in: that of its first floating parameter outside the
    compiled layers (whose formats hold their own value dtypes)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not _under(name, compiled):
            return p.dtype
    for name, b in model.named_buffers():
        if b.is_floating_point() and not _under(name, compiled):
            return b.dtype
    return torch.get_default_dtype()


def _dense_tensors(model: nn.Module, masks: MaskSet | None, compiled: dict[str, Any],
                   stored_as: torch.dtype) -> list[str]:
    """The ``state_dict`` keys of the floating tensors stored dense: outside the masks and
    the compiled layers, and (without masks) too dense for a compressed encoding to win;
    for int8, the parameters of rank ≥ 2 among them."""
    masked = set(masks.masks) if masks is not None else set()
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    out = []
    for key, value in model.state_dict().items():
        if (key in masked or value.dtype not in _CASTABLE or _under(key, compiled)
                or key.endswith(f".{SCALE_NAME}")):  # an int8 grid's scales stay exact
            continue
        if stored_as == torch.int8 and (key not in params or value.dim() < 2):
            continue
        if stored_as == torch.int8 and not bool(value.isfinite().all()):
            raise ValueError(f"dense_dtype='int8': {key!r} holds NaN or infinite values, which "
                             "have no int8 code (an infinity would decode as a row of NaN)")
        if masks is None and key in params and value.dim() >= 2:
            nnz = int(torch.count_nonzero(value))
            if checkpoint._sparse_may_win(value.numel(), nnz, value.element_size()):
                continue  # stored compressed: pruned weights keep their dtype
        out.append(key)
    return out


def _under(key: str, compiled: dict[str, Any]) -> bool:
    """Whether ``key`` names a tensor of a compiled layer (or of a fused group's member)."""
    parts = key.split(".")
    heads = {".".join(parts[:i]) for i in range(1, len(parts))}
    return any(n in heads for name, spec in compiled.items() for n in spec.get("members", [name]))


def _get_tensor(model: nn.Module, key: str) -> torch.Tensor:
    owner, _, leaf = key.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, leaf)


def _set_tensor(model: nn.Module, key: str, value: torch.Tensor) -> None:
    """Replace the data of parameter/buffer ``key`` (a tied parameter changes everywhere)."""
    tensor = _get_tensor(model, key)
    if isinstance(tensor, nn.Parameter):
        tensor.data = value
    else:
        owner, _, leaf = key.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf, value)


@contextmanager
def _stored_as(model: nn.Module, keys: list[str], dtype: torch.dtype | None, *,
               restore: bool = True, saved: dict[str, tuple[int, ...]] | None = None
               ) -> Iterator[dict[str, tuple[torch.dtype, bool]]]:
    """``model`` with the tensors ``keys`` as :func:`save_pretrained` stores them: cast to
    ``dtype``, or for ``torch.int8`` as codes with their float32 row scales in a buffer
    beside them (``<leaf>`` + :data:`ROW_SCALE_SUFFIX`; a parameter holding codes takes
    no gradient meanwhile); yields their own dtypes and ``requires_grad``. With
    ``restore`` the original tensors (not a lossy cast back) are put back and the scale
    buffers removed afterwards (else :func:`_restored` reads them). ``saved`` (loading:
    the shapes of the file's stored tensors) says which int8 weights were stored on their
    grid (:func:`_int8`)."""
    originals: dict[str, torch.Tensor] = {}
    grads: dict[str, bool] = {}
    seen: set[int] = set()
    try:
        for key in keys:
            tensor = _lookup(model, key)
            if id(tensor) in seen:  # tied: stored once
                continue
            _check_storable(key, tensor, dtype)
            seen.add(id(tensor))
            originals[key], grads[key] = tensor.data, tensor.requires_grad
            if dtype == torch.int8:
                codes, scales = _int8(model, key, tensor.detach(), saved)
                tensor.requires_grad_(False)
                _set_tensor(model, key, codes)
                owner, _, leaf = key.rpartition(".")
                model.get_submodule(owner).register_buffer(leaf + ROW_SCALE_SUFFIX, scales)
            else:
                _set_tensor(model, key, tensor.detach().to(dtype))
        yield {k: (v.dtype, grads[k]) for k, v in originals.items()}
    finally:
        if restore:
            for key, value in originals.items():
                _set_tensor(model, key, value)
                _get_tensor(model, key).requires_grad_(grads[key])
                _row_scales(model, key, pop=True)


def _lookup(model: nn.Module, key: str) -> object:
    """The attribute ``key`` of ``model``, ``None`` where there is none."""
    try:
        return _get_tensor(model, key)
    except AttributeError:
        return None


def _check_storable(key: str, tensor: object, dtype: torch.dtype | None) -> None:
    """Raise ``ValueError`` unless ``tensor`` is floating (of rank ≥ 2 to be stored as
    int8): a header naming other tensors was written for another architecture."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or (
            dtype == torch.int8 and tensor.dim() < 2):
        raise ValueError(f"tensor {key!r} cannot be stored as {dtype}: "
                         f"{type(tensor).__name__} {tuple(getattr(tensor, 'shape', ()))}")


def _int8(model: nn.Module, key: str, tensor: torch.Tensor,
          saved: dict[str, tuple[int, ...]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensor`` (rank ≥ 2) as int8 codes and one float32 scale per row: on the int8 grid
    its layer records where the weight still lies on it (quantized, and not changed since),
    else on :func:`~sparsekit.quantize.int8_scales`. A weight moved off its recorded grid
    (fine-tuned after ``llm.prune(..., quantize="int8")``) was rounded to that stale grid,
    its values beyond the grid's range clamped: errors of many steps, without a word.
    When loading (``saved``: the file's stored tensors) the grid is used where the file
    stored the codes on it: their row scales are no tensor of their own, but tied to the
    grid's scales."""
    owner, _, leaf = key.rpartition(".")
    rows = tensor.reshape(tensor.shape[0], -1)
    grid = attached_scales(model.get_submodule(owner)) if leaf == "weight" else None
    if grid is not None and tensor.dim() == 2:
        group = group_size_of(rows, grid)
        codes, scales = quantize_int8(rows, grid, group)
        if (torch.equal(dequantize_int8(codes, scales, group).to(rows.dtype), rows)
                if saved is None else key + ROW_SCALE_SUFFIX not in saved):
            return codes, scales  # the grid's own scales: saved once, the row scales tied
    codes, scales = quantize_int8(rows, int8_scales(rows))
    return codes.reshape(tensor.shape), scales


def _row_scales(model: nn.Module, key: str, *, pop: bool = False) -> torch.Tensor | None:
    """The row-scale buffer of the int8 tensor ``key`` (removed with ``pop``), or ``None``."""
    owner, _, leaf = key.rpartition(".")
    buffers = model.get_submodule(owner)._buffers
    name = leaf + ROW_SCALE_SUFFIX
    return buffers.pop(name, None) if pop else buffers.get(name)


def stored_values(weights: Path) -> dict[str, torch.Tensor]:
    """The tensors of a sparsekit weights file (``sparsekit.safetensors``) as the values
    they stand for: tensors stored as int8 (``dense_dtype="int8"``) are their codes times
    their row scales (or the layer's int8 grid they were stored on), the row scales
    dropped. :func:`sparsekit.diff` reads a directory so; it had compared the codes."""
    stored = checkpoint.read(weights)
    record = _read_record(weights, stored.meta)
    state = dict(stored.state)
    cast = record["cast"] or {"keys": [], "dtype": None}
    if cast["keys"] and checkpoint._DTYPES[cast["dtype"]] == torch.int8:
        for key in cast["keys"]:
            owner, _, leaf = key.rpartition(".")
            scales = state.pop(f"{key}{ROW_SCALE_SUFFIX}", None)
            if scales is None:  # stored on the layer's own grid, tied to it
                scales = state[f"{owner}.{SCALE_NAME}"]
            codes = state[key]
            rows = codes.reshape(codes.shape[0], -1)
            state[key] = dequantize_grid(rows, scales).reshape(codes.shape)
    return state


def _restored(model: nn.Module, key: str, stored: torch.dtype) -> torch.Tensor:
    """The loaded tensor ``key`` in float32 (or as it is when not stored as int8): int8
    codes times their row's scale, whose buffer is removed."""
    tensor = _get_tensor(model, key).detach()
    if stored != torch.int8:
        return tensor
    scales = _row_scales(model, key, pop=True)
    rows = tensor.reshape(tensor.shape[0], -1)
    return dequantize_grid(rows, scales).reshape(tensor.shape)


def _write_config(model: nn.Module, file: Path) -> None:
    """Write ``model.config`` to ``file`` as ``save_pretrained`` writes it, with the refusal
    as its ``model_type`` and the marker keeping the real one (``file``: the temporary file
    of :func:`save_pretrained`'s atomic write)."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    data = json.loads(config.to_json_string(use_diff=True))
    data[MARKER] = {"weights": WEIGHTS_NAME, "version": MARKER_VERSION,
                    "model_type": data.get("model_type", config.model_type)}
    data["model_type"] = REFUSAL
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
