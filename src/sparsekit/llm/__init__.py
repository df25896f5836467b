"""Pruning large transformers one block at a time: magnitude, Wanda, SparseGPT, OWL; and
structured removal of FFN neurons, attention heads and layers (``prune_structured``).

Imported on demand (``from sparsekit import llm``); needs ``transformers`` only for the
models themselves (``pip install sparsekit[llm]``).
"""

from sparsekit.llm.calibration import byte_tokenizer, calibration_tokens
from sparsekit.llm.evaluate import embedding_similarity, perplexity
from sparsekit.llm.methods import METHODS
from sparsekit.llm.prune import prune
from sparsekit.llm.sparsegpt import sparsegpt_prune
from sparsekit.llm.structured import load_pretrained, prune_structured

__all__ = [
    "METHODS",
    "byte_tokenizer",
    "calibration_tokens",
    "embedding_similarity",
    "load_pretrained",
    "perplexity",
    "prune",
    "prune_structured",
    "sparsegpt_prune",
]
