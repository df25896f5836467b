"""Pruning large transformers one block at a time: magnitude, Wanda, SparseGPT, OWL.

Imported on demand (``from sparsekit import llm``); needs ``transformers`` only for the
models themselves (``pip install sparsekit[llm]``).
"""

from sparsekit.llm.calibration import byte_tokenizer, calibration_tokens
from sparsekit.llm.evaluate import embedding_similarity, perplexity
from sparsekit.llm.methods import METHODS
from sparsekit.llm.prune import prune
from sparsekit.llm.sparsegpt import sparsegpt_prune

__all__ = [
    "METHODS",
    "byte_tokenizer",
    "calibration_tokens",
    "embedding_similarity",
    "perplexity",
    "prune",
    "sparsegpt_prune",
]
