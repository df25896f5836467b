"""The sparsity lifecycle on a CUDA model: LLM pruning (Wanda, SparseGPT, 2:4, int8, OWL,
offloading), masks held through fused AdamW steps, checkpoints, pruning with gradients.

CI has no GPU, so these skip there; they ran on an NVIDIA H200 (session 22), where they
found that ``prune_structured`` left CPU calibration tokens on the CPU. The CUDA formats
have their own tests (test_formats_cuda.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsekit
from sparsekit import llm

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def llama(device: str = "cuda", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval().to(device, dtype)


def calibration() -> torch.Tensor:  # made on the CPU, as tokenized texts are
    return torch.randint(0, 128, (8, 32), generator=torch.Generator().manual_seed(1))


def zeros_held(masks: sparsekit.MaskSet) -> bool:
    return all(not p[~masks.masks[n]].any() for n, p in masks.params.items())


@pytest.mark.parametrize("tokens_on", ["cuda", "cpu"])
def test_wanda_on_a_gpu_chooses_the_masks_of_the_cpu(tokens_on: str) -> None:
    masks = llm.prune(llama(), calibration().to(tokens_on), method="wanda", nsamples=8)
    reference = llm.prune(llama("cpu"), calibration(), method="wanda", nsamples=8)
    assert masks.sparsity() == pytest.approx(0.5)
    for name, mask in reference.masks.items():
        agree = (masks.masks[name].cpu() == mask).float().mean().item()
        assert agree > 0.999, name  # summation order may flip a near tie, no more


@pytest.mark.parametrize(("pattern", "quantize"), [("2:4", None), ("unstructured", "int8")])
def test_sparsegpt_on_a_gpu_keeps_its_pattern(pattern: str, quantize: str | None) -> None:
    model = llama()
    masks = llm.prune(model, calibration(), method="sparsegpt", pattern=pattern, nsamples=8,
                      quantize=quantize)
    assert masks.sparsity() == pytest.approx(0.5) and zeros_held(masks)
    if pattern == "2:4":
        for name, mask in masks.masks.items():
            assert (mask.view(mask.shape[0], -1, 4).sum(-1) == 2).all(), name


def test_a_cpu_model_pruned_block_by_block_on_the_gpu_stays_on_the_cpu() -> None:
    model = llama("cpu")
    masks = llm.prune(model, calibration(), method="sparsegpt", nsamples=8, device="cuda")
    assert masks.sparsity() == pytest.approx(0.5)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_owl_on_a_bf16_gpu_model() -> None:
    masks = llm.prune(llama(dtype=torch.bfloat16), calibration(), method="wanda",
                      allocation="owl", nsamples=8)
    assert masks.sparsity() == pytest.approx(0.5, abs=0.01)


def test_masks_hold_through_fused_adamw_and_reload_bit_identical(tmp_path) -> None:
    model = llama()
    masks = sparsekit.prune(model, 0.7, allocation="global")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    masks.attach(optimizer)
    x = calibration().cuda()
    model.train()
    for _ in range(3):
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert zeros_held(masks)
    sparsekit.save(model, tmp_path / "m.safetensors", masks)
    fresh = llama()
    back = sparsekit.load(fresh, tmp_path / "m.safetensors")
    assert back.sparsity() == pytest.approx(masks.sparsity())
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_taylor_pruning_with_gpu_data() -> None:
    model, x = llama(), calibration().cuda()
    masks = sparsekit.prune(
        model, 0.5, method="taylor", data=[(x, x)],
        loss_fn=lambda out, y: F.cross_entropy(out.logits.flatten(0, 1), y.flatten()))
    assert masks.sparsity() == pytest.approx(0.5) and zeros_held(masks)
