"""Hostile inputs, round 30.

- ``from_pretrained`` of a compiled GPT-2 rebuilt its compiled layers without recording
  that they had been ``Conv1D``: ``decompile`` of the reloaded model gave ``nn.Linear``
  weights of the transposed shape (which no GPT-2 loads), where ``decompile`` of the model
  before saving gave ``Conv1D``.
- A language model's ``lm_head`` tied to its input embedding, compiled by a forced format
  (a copy of the tied weight, as documented), came back from ``decompile`` untied: a
  fine-tune then trained two tensors where the model had one, and ``save_pretrained``
  kept one of them.

Each test here fails with the files before the fix.
"""

from __future__ import annotations

import pytest
import torch
from _kernels import needs_kernels

import sparsekit
from sparsekit.engine import decompile

transformers = pytest.importorskip("transformers")


def _gpt2(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()
    sparsekit.prune(model, 0.5)
    return model


IDS = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))


@needs_kernels
def test_decompile_of_a_reloaded_compiled_gpt2_gives_conv1d(tmp_path):
    from transformers.pytorch_utils import Conv1D

    compiled = sparsekit.compile(_gpt2(), IDS, formats=["csr16", "dense"], cache=False)
    sparsekit.save_pretrained(compiled, tmp_path)
    back = decompile(sparsekit.from_pretrained(tmp_path))
    layer = back.transformer.h[0].mlp.c_fc
    assert type(layer) is Conv1D and layer.weight.shape == (32, 128)
    assert torch.equal(back(IDS).logits, decompile(compiled)(IDS).logits)


@needs_kernels
@pytest.mark.parametrize("reload", [False, True])
def test_decompile_ties_a_forced_lm_head_again(tmp_path, reload):
    model = _gpt2()
    compiled = sparsekit.compile(model, IDS, formats=["csr16"], cache=False)
    assert type(compiled.lm_head).__name__ == "CompiledLinear"  # a copy, as documented
    if reload:
        sparsekit.save_pretrained(compiled, tmp_path)
        compiled = sparsekit.from_pretrained(tmp_path)
    back = decompile(compiled)
    assert back.lm_head.weight is back.transformer.wte.weight
    assert torch.allclose(back(IDS).logits, model(IDS).logits, atol=1e-5)


@needs_kernels
def test_decompile_leaves_an_int8_copy_of_a_tied_weight_untied():
    model = _gpt2()
    compiled = sparsekit.compile(model, IDS, formats=["csr16"], weight_dtype="int8",
                                 cache=False)
    back = decompile(compiled)
    # its values are the int8 grid's, not the embedding's: tying would change one of them
    assert back.lm_head.weight is not back.transformer.wte.weight
    assert torch.equal(back.transformer.wte.weight, model.transformer.wte.weight)
