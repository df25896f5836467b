"""Save and load SAEs in SAELens's on-disk layout, so either library reads the other's files.

A directory holds ``cfg.json`` (SAELens's config fields: ``architecture``, ``d_in``,
``d_sae``, ``dtype``, ``apply_b_dec_to_input``, ``normalize_activations``, ``k`` …) and
``sae_weights.safetensors`` (``W_enc`` ``(d_in, d_sae)``, ``W_dec`` ``(d_sae, d_out)``,
``b_enc``, ``b_dec`` and, for JumpReLU, ``threshold``). Each sparsekit activation is saved as
the SAELens architecture that computes the same codes at inference: ``topk``, ``abstopk``,
``standard`` (L1), ``jumprelu`` (JumpReLU, and BatchTopK with its learned threshold, as
SAELens saves BatchTopK too), ``transcoder`` and ``jumprelu_transcoder``. What only
sparsekit uses (the training activation, Matryoshka prefixes) goes under a ``"sparsekit"``
key that SAELens ignores, and the training state SAELens has no tensors for goes into a
third file, ``sparsekit_state.safetensors``, which SAELens never opens (it loads its
weights file strictly: an extra tensor there would break it): JumpReLU's ``log_threshold``
(``threshold = exp(log_threshold)`` does not invert bit for bit), BatchTopK's float64
threshold and its count of updates, and every SAE's ``tokens_since_fired``. :func:`load`
prefers them, so a reload is bit-identical and training resumes as it would have; a
directory SAELens saved (whose config has no ``"sparsekit"`` key) never reads a stale one.

:func:`save` writes each file to a temporary file beside it, fsyncs it and renames it into
place (:func:`~sparsekit._atomic.atomic_write`), the config last, so a failed save leaves
the directory as it was, and one interrupted between the renames leaves no ``cfg.json``
(which :func:`load` refuses) rather than a config that describes other weights. Two
saves to one directory at once run one after the other
(:func:`~sparsekit._atomic.directory_lock`; not on platforms without ``fcntl``, such as
Windows, where concurrent saves to one directory are not supported).
:func:`load` refuses a damaged directory with a ``ValueError`` naming the file and what is
wrong in it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparsekit._atomic import atomic_write, blocking_parent, directory_lock, sync
from sparsekit._checks import ArgumentTypeError, check_finite, check_materialized_module
from sparsekit.sae.sae import SAE

__all__ = ["CFG_NAME", "WEIGHTS_NAME", "load", "save"]

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
STATE_NAME = "sparsekit_state.safetensors"  # sparsekit-only training state (SAELens ignores it)
_RESERVED_METADATA = ("sae_lens_version",)  # metadata keys save writes itself
LAYOUT_VERSION = "6.0.0"  # the SAELens config format written (6.x: metadata, architecture)
_LOADABLE = ("topk", "abstopk", "standard", "jumprelu", "batchtopk", "matryoshka_batchtopk",
             "transcoder", "jumprelu_transcoder")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}  # also spelled "torch.float32" …
_WEIGHTS = ("W_enc", "W_dec", "b_enc", "b_dec")


def _architecture(sae: SAE) -> str:
    return _architecture_of(sae.activation, sae.transcoder)


def _architecture_of(activation: str, transcoder: bool) -> str:
    """The SAELens architecture a sparsekit ``activation`` saves as (``ValueError`` for a
    TopK-family transcoder, which SAELens lacks)."""
    jump = activation in ("jumprelu", "batchtopk")
    if transcoder:
        if activation in ("topk", "abstopk"):
            raise ValueError(
                f"sae: SAELens has no {activation} transcoder; a transcoder saves with "
                f"activation 'l1', 'jumprelu' or 'batchtopk'")
        return "jumprelu_transcoder" if jump else "transcoder"
    return "jumprelu" if jump else {"topk": "topk", "abstopk": "abstopk", "l1": "standard"}[
        activation]


def _state(sae: SAE) -> dict[str, torch.Tensor]:
    """The sparsekit-only tensors of ``sae`` (:data:`STATE_NAME`): what SAELens's weights
    cannot hold exactly, or at all."""
    state = {"tokens_since_fired": sae.tokens_since_fired}
    if sae.activation == "jumprelu":
        state["log_threshold"] = sae.log_threshold
    if sae.activation == "batchtopk":
        state["threshold"] = sae.threshold
        state["threshold_updates"] = sae.threshold_updates
    return {name: t.detach().contiguous().cpu() for name, t in state.items()}


def _check_metadata(metadata: Any) -> None:
    """Raise unless ``metadata`` is None or a dict of str keys that save does not write
    itself (``sae_lens_version`` is the layout's version, not the caller's)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    bad = list(_non_str_keys(metadata))
    if bad:
        raise ArgumentTypeError(f"metadata keys must be str (JSON object keys), got "
                                f"{bad[0]!r}")
    reserved = [key for key in metadata if key in _RESERVED_METADATA]
    if reserved:
        raise ValueError(f"metadata must not hold {reserved[0]!r}: save writes it (the "
                         f"layout's version, {LAYOUT_VERSION!r}); reserved keys: "
                         f"{', '.join(_RESERVED_METADATA)}")


def _non_str_keys(value: Any, seen: frozenset[int] = frozenset()) -> Iterator[Any]:
    """The keys that are not ``str`` of every dict in ``value``, nested ones too: JSON
    turned ``{1: ...}`` into ``{"1": ...}`` silently, so the metadata reloaded changed.
    A container holding itself is left to ``json.dumps``, which names it."""
    if id(value) in seen or not isinstance(value, (dict, list, tuple)):
        return
    seen = seen | {id(value)}
    if isinstance(value, dict):
        yield from (key for key in value if not isinstance(key, str))
    for item in value.values() if isinstance(value, dict) else value:
        yield from _non_str_keys(item, seen)


def save(sae: SAE, path: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` to the directory ``path`` (created if needed) in SAELens's layout;
    ``metadata`` (e.g. ``{"model_name": ..., "hook_name": ...}``) goes into the config's
    ``metadata``. Returns the directory."""
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a sparsekit.sae.SAE, got {type(sae).__name__}")
    path = _save_directory(path)
    _check_metadata(metadata)
    architecture = _architecture(sae)
    dtype = str(sae.W_enc.dtype).removeprefix("torch.")
    cfg: dict[str, Any] = {
        "architecture": architecture, "d_in": sae.d_in, "d_sae": sae.n_latents,
        "dtype": dtype, "device": "cpu", "apply_b_dec_to_input": not sae.transcoder,
        "normalize_activations": "none", "reshape_activations": "none",
        "metadata": {"sae_lens_version": LAYOUT_VERSION, **(metadata or {})},
        "sparsekit": {"activation": sae.activation, "k": sae.k,
                      "matryoshka": list(sae.matryoshka) or None,
                      "normalize_decoder": sae.normalize_decoder,
                      "bandwidth": sae.bandwidth, "transcoder": sae.transcoder,
                      "state": STATE_NAME},
    }
    if sae.transcoder:
        cfg["d_out"] = sae.d_out
    if architecture in ("topk", "abstopk"):
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    try:
        text = json.dumps(cfg, indent=2, allow_nan=False)  # NaN is no JSON value
    except (TypeError, ValueError) as e:
        raise ArgumentTypeError(f"metadata must hold only JSON values (str, finite numbers, "
                                f"bools, None, lists and dicts of them): {e}") from e
    check_materialized_module(sae, "sae.")  # .cpu() failed inside PyTorch
    weights = {name: getattr(sae, name).detach().contiguous().cpu() for name in _WEIGHTS}
    if "jumprelu" in architecture:
        threshold = sae.log_threshold.exp() if sae.activation == "jumprelu" \
            else sae.threshold.to(sae.W_enc.dtype).expand(sae.n_latents)
        weights["threshold"] = threshold.detach().contiguous().cpu()
    state = _state(sae)
    _check_saveable(weights, state)
    path.mkdir(parents=True, exist_ok=True)
    # All files are written and flushed before the old config goes (no old config may
    # describe new weights) and any is renamed, the config (the outer block) last: a
    # save that fails before its renames leaves the directory as it was. Another save to
    # this directory waits for the lock: the directory holds one save's files.
    with directory_lock(path), atomic_write(path / CFG_NAME) as cfg_tmp:
        cfg_tmp.write_text(text)
        sync(cfg_tmp)
        with atomic_write(path / STATE_NAME) as state_tmp:
            save_file(state, state_tmp)
            sync(state_tmp)
            with atomic_write(path / WEIGHTS_NAME) as weights_tmp:
                save_file(weights, weights_tmp)
                sync(weights_tmp)
                (path / CFG_NAME).unlink(missing_ok=True)
    return path


def _check_saveable(weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming ``sae`` unless :func:`load` would take these tensors (the
    checks of :func:`_check_values` and :func:`_read_state`): a NaN weight (a diverged
    training) was written over the directory's good files, as files load refuses."""
    floats = {name: t for name, t in state.items() if name != "log_threshold"
              and t.is_floating_point()}
    try:
        _check_values("sae", weights | {k: v for k, v in state.items() if k == "log_threshold"})
        bad = [name for name, t in floats.items() if not bool(torch.isfinite(t).all())]
        if bad:
            raise ValueError(f"sae: {bad[0]} must be finite, got {floats[bad[0]].tolist()}")
    except ValueError as e:
        raise ValueError(f"{e}; nothing was written: load refuses such files") from None


def _directory(path: Any) -> Path:
    """``path`` as a ``Path``; raise unless it is a str or an ``os.PathLike``."""
    if not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(f"path must be a str or os.PathLike directory, got "
                                f"{type(path).__name__}")
    return Path(path)


def _save_directory(raw_path: Any) -> Path:
    """``raw_path`` as the directory :func:`save` writes, or a ``ValueError`` naming it: ``""``
    (which pathlib reads as ``"."``) wrote into the working directory; a file or a dangling
    link at ``path``, a file above it, or a directory in place of one of the files to write
    failed with a raw ``OSError`` (the last after the old config was deleted)."""
    _directory(raw_path)
    raw = os.fspath(raw_path)
    path = Path(raw)
    what = ("'', which is empty (use '.' for the working directory)" if raw == ""
            else f"{raw!r}, which holds a NUL character" if "\0" in raw
            else f"the file {raw!r}" if path.is_file()
            else f"{raw!r}, which is not a directory"
            + ("" if path.exists() else " (a broken symbolic link)")
            if os.path.lexists(path) and not path.is_dir()
            else None)
    if what is None and (blocker := blocking_parent(path)):
        what = f"{raw!r}, which lies under {str(blocker[0])!r}, {blocker[1]}"
    in_the_way = [name for name in (CFG_NAME, STATE_NAME, WEIGHTS_NAME)
                  if what is None and os.path.lexists(path / name)
                  and not (path / name).is_file()]
    if in_the_way:
        what = f"{raw!r}, which holds {in_the_way[0]!r} that is not a file"
    if what is not None:
        raise ValueError(f"path must be a directory (or not exist yet) where save can write "
                         f"its files, got {what}")
    return path


@contextlib.contextmanager
def _damaged(file: Path, what: str) -> Iterator[None]:
    """Turn the error reading ``file`` or building an SAE from it raises into a
    ``ValueError`` naming the file (the original is its ``__cause__``)."""
    try:
        yield
    except (SafetensorError, ValueError, TypeError, RuntimeError) as e:  # JSONDecodeError too
        raise ValueError(f"{file}: {what}: {e}") from e


def load(path: str | Path) -> SAE:
    """Read an SAE saved by :func:`save` or by SAELens (``SAE.save_model``) from the
    directory ``path``.

    Raises ``FileNotFoundError`` when a file is missing and a ``ValueError`` naming the file
    when one is damaged or describes what sparsekit cannot load (an unknown architecture or
    dtype, a dtype that would round the stored tensors, missing, mistyped or conflicting
    fields, missing tensors, tensors of other shapes than the config's)."""
    path = _directory(path)
    for name in (CFG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"path: no {name} in {str(path)!r} (SAELens layout)")
    cfg_file, weights_file = path / CFG_NAME, path / WEIGHTS_NAME
    cfg = _read_cfg(cfg_file)
    architecture = cfg.get("architecture", "standard")
    ours = cfg.get("sparsekit") or {}
    transcoder = "transcoder" in architecture or ours.get("transcoder", False)
    if not transcoder and not cfg.get("apply_b_dec_to_input", True):
        raise ValueError(f"{cfg_file}: an autoencoder with apply_b_dec_to_input=false "
                         f"is not supported")
    activation = ours.get("activation") or (
        "jumprelu" if "jumprelu" in architecture or "batchtopk" in architecture
        else "l1" if architecture in ("standard", "transcoder") else architecture)
    _check_architecture(cfg_file, architecture, activation, ours, transcoder)
    k = next((v for v in (cfg.get("k"), ours.get("k")) if v is not None), None)  # 0 is one
    if k is None and activation in ("topk", "abstopk", "batchtopk"):  # SAELens writes k
        raise ValueError(f"{cfg_file}: no k (or sparsekit.k), which a {activation} SAE needs "
                         f"(the latents it keeps)")
    with _damaged(weights_file, "not a safetensors file"):
        weights = load_file(weights_file)
    state = _read_state(path, cfg_file, ours)
    # SAELens needs the threshold even where sparsekit reads the exact one from the state
    needed = _WEIGHTS + (("threshold",) if activation in ("jumprelu", "batchtopk") else ())
    missing = [name for name in needed if name not in weights]
    if missing:
        raise ValueError(f"{weights_file}: no tensor {', '.join(missing)} (it holds "
                         f"{', '.join(sorted(weights)) or 'none'})")
    _check_values(weights_file, weights)
    _check_widths(cfg, cfg_file, weights, weights_file)
    dtype = _DTYPES[str(cfg.get("dtype", "float32")).removeprefix("torch.")]
    for name in needed:  # a wider dtype holds them exactly (SAELens loads half() saves so)
        if torch.promote_types(weights[name].dtype, dtype) != dtype:
            raise ValueError(f"{weights_file}: {name} is {weights[name].dtype}, but "
                             f"{cfg_file.name} says dtype {cfg.get('dtype')!r}, which would "
                             f"round it; accepted: a dtype that holds {weights[name].dtype}")
    w_enc, w_dec, b_enc = weights["W_enc"], weights["W_dec"], weights["b_enc"]
    with _damaged(weights_file, "cannot read W_dec's row norms"):
        if cfg.get("rescale_acts_by_decoder_norm", False):  # fold the norms: same codes
            norms = w_dec.norm(dim=-1)
            # a zero row stays zero (its latent contributes nothing either way): dividing
            # it by its norm of 0 loaded a NaN row into W_dec
            divisor = torch.where(norms > 0, norms, torch.ones_like(norms))
            w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / divisor[:, None]
        unit = bool(torch.allclose(w_dec.float().norm(dim=-1), torch.ones(()), atol=1e-4))
    with _damaged(cfg_file, "not a loadable SAE config"):
        sae = SAE(cfg["d_in"], cfg["d_sae"], activation, k=1 if k is None else k,
                  d_out=cfg.get("d_out", cfg["d_in"]), transcoder=transcoder,
                  matryoshka=ours.get("matryoshka"),
                  normalize_decoder=ours.get("normalize_decoder", unit),
                  bandwidth=ours.get("bandwidth", 1e-3),
                  dtype=dtype)
    loaded = {"W_enc": w_enc, "W_dec": w_dec, "b_enc": b_enc, "b_dec": weights["b_dec"]}
    if activation == "jumprelu":
        loaded["threshold"] = weights["threshold"].clamp_min(0).log()
    for name, value in loaded.items():
        expected = getattr(sae, "log_threshold" if name == "threshold" else name).shape
        if value.shape != expected:
            raise ValueError(f"{weights_file}: {name} has shape {tuple(value.shape)}, but "
                             f"{cfg_file.name} describes {tuple(expected)}")
    if activation == "jumprelu" and "log_threshold" in state:
        loaded["threshold"] = state["log_threshold"]  # log(exp(t)) is not t bit for bit
    for name, own in (("tokens_since_fired", sae.tokens_since_fired),  # the state's
                      ("log_threshold", getattr(sae, "log_threshold", None)),
                      ("threshold", getattr(sae, "threshold", None))):
        if name in state and own is not None and state[name].shape != own.shape:
            raise ValueError(f"{path / STATE_NAME}: {name} has shape "
                             f"{tuple(state[name].shape)}, but {cfg_file.name} describes "
                             f"{tuple(own.shape)}")
    with torch.no_grad():
        for name, value in loaded.items():
            getattr(sae, "log_threshold" if name == "threshold" else name).copy_(value)
        if "tokens_since_fired" in state:
            sae.tokens_since_fired.copy_(state["tokens_since_fired"])
        if activation == "batchtopk":
            if "threshold" in state:  # the float64 running value, and how far it has run
                sae.threshold.copy_(state["threshold"])
                sae.threshold_updates.fill_(int(state["threshold_updates"]))
            else:  # SAELens's file: its float threshold as learned
                sae.threshold.fill_(float(weights["threshold"].max()))
    sae.eval()
    return sae


def _check_widths(cfg: dict[str, Any], cfg_file: Path, weights: dict[str, torch.Tensor],
                  weights_file: Path) -> None:
    """Raise naming the files unless the widths the config gives (``d_in``, ``d_sae``,
    ``d_out``, where they are ints) are the encoder's and decoder's shapes: the SAE is
    built at the config's widths before its weights are copied, so an edited config
    (``d_sae`` of millions beside a small file) allocated gigabytes before the shapes
    were compared. Widths that are no ints are left to the SAE's own checks."""
    widths = {key: cfg.get(key, cfg["d_in"]) if key == "d_out" else cfg[key]
              for key in ("d_in", "d_sae", "d_out")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in widths.values()):
        return
    for name, keys in (("W_enc", ("d_in", "d_sae")), ("W_dec", ("d_sae", "d_out"))):
        shape = tuple(weights[name].shape)
        expected = tuple(widths[key] for key in keys)
        if shape != expected:
            raise ValueError(f"{weights_file}: {name} has shape {shape}, but "
                             f"{cfg_file.name} describes {expected} "
                             f"({', '.join(keys)})")


def _check_architecture(cfg_file: Path, architecture: str, activation: Any,
                        ours: dict[str, Any], transcoder: bool) -> None:
    """Raise unless sparsekit's ``activation`` (when the config names one) saves as the
    config's ``architecture``: an edited file would otherwise load as another SAE (a TopK
    file read as BatchTopK, at threshold 0)."""
    if "activation" not in ours:
        return
    try:
        expected = _architecture_of(activation, transcoder)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{cfg_file}: sparsekit activation {activation!r} cannot be saved "
                         f"as {'a transcoder' if transcoder else 'an autoencoder'}") from e
    if expected != architecture:
        raise ValueError(f"{cfg_file}: sparsekit activation {activation!r} saves as "
                         f"architecture {expected!r}, but the file says {architecture!r}")


def _check_values(file: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Raise naming ``file`` unless every tensor of it is floating-point and finite (a
    JumpReLU ``threshold`` may be +inf, ``exp`` of a large log threshold: a latent that
    never fires; its ``log_threshold`` ±inf, the log of 0 or inf): an int32 ``W_dec``
    would be cast silently, a NaN one gives NaN codes."""
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{file}: {name} must be floating-point, got {tensor.dtype}")
        if name not in ("threshold", "log_threshold"):
            check_finite(f"{file}: {name}", tensor)
            continue
        ok = torch.isfinite(tensor) | (tensor == torch.inf) if name == "threshold" \
            else ~tensor.isnan()
        bad = int((~ok).sum())
        if bad:
            accepted, found = ("finite or +inf", "NaN or -inf") if name == "threshold" \
                else ("finite or ±inf", "NaN")
            raise ValueError(f"{file}: {name} must be {accepted}, got {bad} {found} among "
                             f"{tensor.numel()} values")


_STATE_DTYPES = {"tokens_since_fired": torch.int64, "threshold": torch.float64,
                 "threshold_updates": torch.int64}


def _read_state(path: Path, cfg_file: Path, ours: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The sparsekit-only tensors (:data:`STATE_NAME`) when the config names the file
    (saves before it existed, and SAELens's, have none: empty); raise naming the file
    unless they are the dtypes saved, finite where float, and counts ≥ 0."""
    if "state" not in ours:
        return {}
    if ours["state"] != STATE_NAME:
        raise ValueError(f"{cfg_file}: sparsekit state must be {STATE_NAME!r}, got "
                         f"{ours['state']!r}")
    file = path / STATE_NAME
    if not file.is_file():
        raise FileNotFoundError(f"path: no {STATE_NAME} in {str(path)!r}, which "
                                f"{cfg_file.name} names")
    with _damaged(file, "not a safetensors file"):
        state = load_file(file)
    for name, tensor in state.items():
        dtype = _STATE_DTYPES.get(name)
        if dtype is None and name != "log_threshold":
            raise ValueError(f"{file}: unknown tensor {name!r}")
        if dtype is not None and tensor.dtype != dtype:
            raise ValueError(f"{file}: {name} must be {dtype}, got {tensor.dtype}")
        if dtype is None:
            _check_values(file, {name: tensor})
        elif tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{file}: {name} must be finite, got {tensor.tolist()}")
        elif not tensor.is_floating_point() and bool((tensor < 0).any()):
            raise ValueError(f"{file}: {name} must be ≥ 0")
    if ("threshold" in state) != ("threshold_updates" in state) or (
            "threshold_updates" in state and state["threshold_updates"].shape != ()):
        raise ValueError(f"{file}: threshold and threshold_updates (a scalar) go together")
    return state


def _read_cfg(file: Path) -> dict[str, Any]:
    """``cfg.json`` as a dict with the fields :func:`load` needs; raise naming the file
    unless it is one sparsekit can load."""
    with _damaged(file, "not valid JSON"):
        cfg = json.loads(file.read_text())
    if not isinstance(cfg, dict):
        raise ValueError(f"{file}: must hold a JSON object, got {type(cfg).__name__}")
    missing = [key for key in ("d_in", "d_sae") if key not in cfg]
    if missing:
        raise ValueError(f"{file}: no {' or '.join(missing)} (the SAE's widths)")
    if not isinstance(cfg.get("sparsekit") or {}, dict):
        raise ValueError(f"{file}: sparsekit must be an object, got {cfg['sparsekit']!r}")
    architecture = cfg.get("architecture", "standard")
    if architecture not in _LOADABLE:
        raise ValueError(f"{file}: architecture {architecture!r} is not supported; "
                         f"accepted: {', '.join(_LOADABLE)}")
    ours = cfg.get("sparsekit") or {}
    for fields, key, label in ((cfg, "apply_b_dec_to_input", ""),
                               (cfg, "rescale_acts_by_decoder_norm", ""),
                               (ours, "transcoder", "sparsekit.")):
        if key in fields and not isinstance(fields[key], bool):  # "false" is truthy
            raise ValueError(f"{file}: {label}{key} must be a JSON bool (true or false), got "
                             f"{fields[key]!r}")
    activation = ours.get("activation")
    if activation is not None and not isinstance(activation, str):  # a list was unhashable
        raise ValueError(f"{file}: sparsekit.activation must be a string (topk, batchtopk, "
                         f"abstopk, jumprelu or l1), got {activation!r}")
    if None not in (cfg.get("k"), ours.get("k")) and cfg["k"] != ours["k"]:  # one won silently
        raise ValueError(f"{file}: k ({cfg['k']!r}) and sparsekit.k ({ours['k']!r}) must "
                         f"agree")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{file}: normalize_activations="
                         f"{cfg['normalize_activations']!r} is not supported; fold it first")
    dtype = cfg.get("dtype", "float32")
    if str(dtype).removeprefix("torch.") not in _DTYPES:
        raise ValueError(f"{file}: dtype {dtype!r} is not supported; accepted: "
                         f"{', '.join(_DTYPES)}")
    return cfg

