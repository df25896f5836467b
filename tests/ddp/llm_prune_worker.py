"""Run under torchrun: sparsekit.llm.prune on a small LLaMA built from a config.

Arguments: output stem, then runs ``method@windows`` (``perturbed``: Wanda with a different
model on rank 1), all in one launch (start-up dominates). Every rank builds the same model
and windows; rank r writes ``<stem>.rank<r>.pt`` with, per run, the masks and pruned
weights, or the ``ValueError`` message if prune refused.
"""

import sys

import torch
import torch.distributed as dist
import transformers
from _leave import leave

import sparsekit.llm

VOCAB = 64


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def pruned(method: str, windows: int, perturb: bool = False) -> dict:
    """The masks and weights ``sparsekit.llm.prune`` gives, or the error it raises; with
    ``perturb`` rank 1 holds a slightly different model."""
    model = llama()
    if perturb and dist.get_rank() == 1:
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    tokens = torch.randint(0, VOCAB, (windows, 24), generator=torch.Generator().manual_seed(1))
    try:
        masks = sparsekit.llm.prune(model, tokens, method=method, sparsity=0.5,
                                    nsamples=windows, batch_size=2)
    except ValueError as err:
        return {"error": str(err)}
    return {"masks": masks.masks,
            "weights": {n: p.detach().clone() for n, p in masks.params.items()}}


def main(out: str, runs: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {}
    for run in runs:
        method, windows = run.split("@")
        perturb = method == "perturbed"
        results[run] = pruned("wanda" if perturb else method, int(windows), perturb)
    torch.save(results, f"{out}.rank{dist.get_rank()}.pt")
    leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
