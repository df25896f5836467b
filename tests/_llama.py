"""A tiny LLaMA for the tests: one decoder layer of a 64-token vocabulary, seeded."""

from __future__ import annotations

import pytest
import torch


def tiny_llama(**overrides: object):
    """A ``LlamaForCausalLM`` (eval mode, built after ``torch.manual_seed(0)``) of hidden
    width 32, FFN width 64, one layer and two attention heads; ``overrides`` replace any
    ``LlamaConfig`` field. Skips the test without ``transformers``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64,
        **overrides})
    return transformers.LlamaForCausalLM(config).eval()
