"""Save and load SAEs in SAELens's on-disk layout, so either library reads the other's files.

A directory holds ``cfg.json`` (SAELens's config fields: ``architecture``, ``d_in``,
``d_sae``, ``dtype``, ``apply_b_dec_to_input``, ``normalize_activations``, ``k`` …) and
``sae_weights.safetensors`` (``W_enc`` ``(d_in, d_sae)``, ``W_dec`` ``(d_sae, d_out)``,
``b_enc``, ``b_dec`` and, for JumpReLU, ``threshold``). Each sparsekit activation is saved as
the SAELens architecture that computes the same codes at inference: ``topk``, ``abstopk``,
``standard`` (L1), ``jumprelu`` (JumpReLU, and BatchTopK with its learned threshold, as
SAELens saves BatchTopK too), ``transcoder`` and ``jumprelu_transcoder``. What only
sparsekit uses (the training activation, Matryoshka prefixes) goes under a ``"sparsekit"``
key that SAELens ignores, so :func:`load` gives back the module that was saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sparsekit.sae.sae import SAE

__all__ = ["CFG_NAME", "WEIGHTS_NAME", "load", "save"]

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
LAYOUT_VERSION = "6.0.0"  # the SAELens config format written (6.x: metadata, architecture)
_LOADABLE = ("topk", "abstopk", "standard", "jumprelu", "batchtopk", "matryoshka_batchtopk",
             "transcoder", "jumprelu_transcoder")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "torch.float32": torch.float32,
           "torch.bfloat16": torch.bfloat16, "torch.float16": torch.float16}


def _architecture(sae: SAE) -> str:
    jump = sae.activation in ("jumprelu", "batchtopk")
    if sae.transcoder:
        if sae.activation in ("topk", "abstopk"):
            raise ValueError(
                f"sae: SAELens has no {sae.activation} transcoder; a transcoder saves with "
                f"activation 'l1', 'jumprelu' or 'batchtopk'")
        return "jumprelu_transcoder" if jump else "transcoder"
    return "jumprelu" if jump else {"topk": "topk", "abstopk": "abstopk", "l1": "standard"}[
        sae.activation]


def save(sae: SAE, path: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` to the directory ``path`` (created if needed) in SAELens's layout;
    ``metadata`` (e.g. ``{"model_name": ..., "hook_name": ...}``) goes into the config's
    ``metadata``. Returns the directory."""
    if not isinstance(sae, SAE):
        raise TypeError(f"sae must be a sparsekit.sae.SAE, got {type(sae).__name__}")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
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
                      "bandwidth": sae.bandwidth, "transcoder": sae.transcoder},
    }
    if sae.transcoder:
        cfg["d_out"] = sae.d_out
    if architecture in ("topk", "abstopk"):
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    weights = {name: getattr(sae, name).detach().contiguous().cpu()
               for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if "jumprelu" in architecture:
        threshold = sae.log_threshold.exp() if sae.activation == "jumprelu" \
            else sae.threshold.to(sae.W_enc.dtype).expand(sae.n_latents)
        weights["threshold"] = threshold.detach().contiguous().cpu()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, path / WEIGHTS_NAME)
    (path / CFG_NAME).write_text(json.dumps(cfg, indent=2))
    return path


def load(path: str | Path) -> SAE:
    """Read an SAE saved by :func:`save` or by SAELens (``SAE.save_model``) from the
    directory ``path``."""
    path = Path(path)
    for name in (CFG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(f"path: no {name} in {str(path)!r} (SAELens layout)")
    cfg = json.loads((path / CFG_NAME).read_text())
    architecture = cfg.get("architecture", "standard")
    if architecture not in _LOADABLE:
        raise ValueError(f"{path / CFG_NAME}: architecture {architecture!r} is not supported; "
                         f"accepted: {', '.join(_LOADABLE)}")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{path / CFG_NAME}: normalize_activations="
                         f"{cfg['normalize_activations']!r} is not supported; fold it first")
    weights = load_file(path / WEIGHTS_NAME)
    ours = cfg.get("sparsekit") or {}
    transcoder = "transcoder" in architecture or ours.get("transcoder", False)
    d_out = cfg.get("d_out", cfg["d_in"])
    if not transcoder and not cfg.get("apply_b_dec_to_input", True):
        raise ValueError(f"{path / CFG_NAME}: an autoencoder with apply_b_dec_to_input=false "
                         f"is not supported")
    activation = ours.get("activation") or (
        "jumprelu" if "jumprelu" in architecture or "batchtopk" in architecture
        else "l1" if architecture in ("standard", "transcoder") else architecture)
    w_enc, w_dec, b_enc = weights["W_enc"], weights["W_dec"], weights["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm", False):  # fold the norms: same codes, same output
        norms = w_dec.norm(dim=-1)
        w_enc, b_enc, w_dec = w_enc * norms, b_enc * norms, w_dec / norms[:, None]
    unit = bool(torch.allclose(w_dec.float().norm(dim=-1), torch.ones(()), atol=1e-4))
    sae = SAE(cfg["d_in"], cfg["d_sae"], activation, k=int(cfg.get("k") or ours.get("k") or 1),
              d_out=d_out, transcoder=transcoder, matryoshka=ours.get("matryoshka"),
              normalize_decoder=ours.get("normalize_decoder", unit),
              bandwidth=ours.get("bandwidth", 1e-3),
              dtype=_DTYPES.get(cfg.get("dtype", "float32"), torch.float32))
    with torch.no_grad():
        for name, value in (("W_enc", w_enc), ("W_dec", w_dec), ("b_enc", b_enc),
                            ("b_dec", weights["b_dec"])):
            getattr(sae, name).copy_(value)
        if activation == "jumprelu":
            sae.log_threshold.copy_(weights["threshold"].clamp_min(0).log())
        elif activation == "batchtopk":
            sae.threshold.fill_(float(weights["threshold"].max()) if "threshold" in weights
                                else 0.0)
    sae.eval()
    return sae

