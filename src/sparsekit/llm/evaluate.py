"""Quality of a pruned language model: perplexity (decoders), embedding similarity (encoders)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import check_int
from sparsekit.blocks import home_device
from sparsekit.llm.calibration import check_token_dtype, check_token_ids, tokenize
from sparsekit.llm.prune import check_seqlen
from sparsekit.observe import preserved


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokens_or_text: torch.Tensor | list[str] | str,
    *,
    seqlen: int,
    stride: int | None = None,
    tokenizer: Any = None,
    batch_size: int = 8,
) -> float:
    """exp(mean next-token NLL) of a causal LM over a token stream, a list of strings or a
    text file (a ``str`` is a path; texts need ``tokenizer``).

    Windows of ``seqlen`` tokens start every ``stride`` tokens (default ``seqlen``:
    disjoint windows); each token is scored once, in the first window that reaches it, with
    the context that window gives (the sliding-window evaluation of the HF docs).
    ``seqlen`` may not exceed the model's context; a token tensor must hold integer ids.
    """
    check_seqlen(model, seqlen, minimum=2, default=False)
    stride = seqlen if stride is None else stride
    check_int("stride", stride, minimum=1)
    if stride > seqlen:
        raise ValueError(f"stride must be an int in [1, seqlen={seqlen}], got {stride!r}")
    check_int("batch_size", batch_size, minimum=1)
    if isinstance(tokens_or_text, torch.Tensor):
        check_token_dtype(tokens_or_text, "tokens_or_text")
        ids = tokens_or_text.reshape(-1).long()
    else:
        ids = tokenize(tokens_or_text, tokenizer, "tokens_or_text")
    if ids.numel() < 2:
        raise ValueError("tokens_or_text needs at least 2 tokens")
    check_token_ids(ids, model, "tokens_or_text")

    windows: list[tuple[int, int, int]] = []  # (begin, end, tokens to score at the end)
    scored = 0
    for begin in range(0, ids.numel() - 1, stride):
        end = min(begin + seqlen, ids.numel())
        windows.append((begin, end, end - max(scored, begin + 1)))
        scored = end
        if end == ids.numel():
            break
    device = home_device(model)
    nll, count = 0.0, 0
    with preserved(model, train=False):
        for i in range(0, len(windows), batch_size):
            group = windows[i:i + batch_size]
            for length in sorted({e - b for b, e, _ in group}):  # equal lengths batch together
                same = [w for w in group if w[1] - w[0] == length]
                x = torch.stack([ids[b:e] for b, e, _ in same]).to(device)
                labels = x.clone()
                for row, (_, _, n) in enumerate(same):
                    labels[row, : length - n] = -100
                logits = model(x).logits[:, :-1].float()
                nll += float(F.cross_entropy(logits.transpose(1, 2), labels[:, 1:],
                                             ignore_index=-100, reduction="sum"))
                count += sum(n for _, _, n in same)
    return math.exp(nll / count)


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, sentences: list[str], *, batch_size: int = 32
          ) -> torch.Tensor:
    """Mean-pooled last hidden states of ``sentences`` (sentence-transformers style)."""
    device = home_device(model)
    out = []
    with preserved(model, train=False):
        for i in range(0, len(sentences), batch_size):
            enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True,
                            return_tensors="pt").to(device)
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out)


def embedding_similarity(
    model: nn.Module, tokenizer: Any, sentences: list[str], dense_model: nn.Module
) -> float:
    """Mean cosine similarity of ``model``'s sentence embeddings to ``dense_model``'s."""
    if not sentences or not all(isinstance(s, str) for s in sentences):
        raise ValueError("sentences must be a non-empty list of strings")
    a = embed(model, tokenizer, sentences)
    b = embed(dense_model, tokenizer, sentences)
    return float(F.cosine_similarity(a, b, dim=-1).mean())
