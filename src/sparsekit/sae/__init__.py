"""Sparse autoencoders and transcoders: make representations sparse, not weights.

- :class:`SAE` — the module (TopK, BatchTopK, AbsTopK, JumpReLU, L1; Matryoshka nesting;
  transcoders), with a decoder that reads only the dictionary rows a code uses;
- :func:`train` — Adam over any iterable of activation tensors;
- :func:`resample` — dead latents reinitialised from the worst-reconstructed inputs;
- :func:`capture` — stream the activations of any module of a model, in chunks;
- :func:`metrics` and :func:`loss_recovered` — FVU, L0, dead and dense latents, feature
  density, and the model's quality with the reconstruction spliced back in;
- :func:`save` and :func:`load` — SAELens's on-disk layout (``cfg.json`` +
  ``sae_weights.safetensors``).
"""

from sparsekit.sae.activations import ACTIVATIONS
from sparsekit.sae.capture import capture
from sparsekit.sae.files import load, save
from sparsekit.sae.metrics import loss_recovered, metrics
from sparsekit.sae.resample import resample
from sparsekit.sae.sae import SAE
from sparsekit.sae.train import objective, train

__all__ = [
    "ACTIVATIONS", "SAE", "capture", "load", "loss_recovered", "metrics", "objective",
    "resample", "save", "train",
]
