"""Quality of a pruned language model: perplexity (decoders), embedding similarity (encoders)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_finite,
    check_int,
    check_materialized_module,
    check_module,
    model_errors,
)
from sparsekit.blocks import home_device
from sparsekit.llm.calibration import check_token_dtype, check_token_ids, tokenize
from sparsekit.llm.prune import check_seqlen, max_positions
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
    ``seqlen`` may not exceed the model's context; a token tensor must hold integer ids, as
    one stream of shape ``(L,)`` or ``(1, L)`` (a batch of several rows is a ``ValueError``).
    ``model`` must be a causal LM whose output has ``.logits`` (a ``…ForCausalLM``): any
    other module is a ``ValueError`` naming it, not a bare error from inside the model.
    A perplexity beyond float's range (a mean NLL above ~709 nats) is ``math.inf``; logits
    holding NaN (or +inf) are a ``ValueError`` naming ``model``, not a perplexity of NaN.
    """
    check_module("model", model)
    check_materialized_module(model, "model: ")  # else a raw Tensor.item() error
    check_seqlen(model, seqlen, minimum=2, default=False)
    stride = seqlen if stride is None else stride
    check_int("stride", stride, minimum=1)
    if stride > seqlen:
        raise ValueError(f"stride must be an int in [1, seqlen={seqlen}], got {stride!r}")
    check_int("batch_size", batch_size, minimum=1)
    if isinstance(tokens_or_text, torch.Tensor):
        check_token_dtype(tokens_or_text, "tokens_or_text")
        shape = tuple(tokens_or_text.shape)
        if len(shape) > 2 or len(shape) == 2 and shape[0] > 1:
            # flattened, each row's first tokens were scored as continuing the row before it
            # (a padded batch: its pad tokens too)
            raise ValueError(
                f"tokens_or_text must be one token stream, of shape (L,) or (1, L), got a "
                f"tensor of shape {shape}; accepted: one text's ids, or "
                "tokens.reshape(-1) where the rows are pieces of one stream"
            )
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
    # eval mode without autograd changes no buffer: restoring them (copy_) failed on a model
    # built under torch.inference_mode, whose buffers cannot change outside it
    with preserved(model, train=False, buffers=False):
        for i in range(0, len(windows), batch_size):
            group = windows[i:i + batch_size]
            for length in sorted({e - b for b, e, _ in group}):  # equal lengths batch together
                same = [w for w in group if w[1] - w[0] == length]
                x = torch.stack([ids[b:e] for b, e, _ in same]).to(device)
                labels = x.clone()
                for row, (_, _, n) in enumerate(same):
                    labels[row, : length - n] = -100
                logits = _logits(model, x)[:, :-1].float()
                window = float(F.cross_entropy(logits.transpose(1, 2), labels[:, 1:],
                                               ignore_index=-100, reduction="sum"))
                if math.isnan(window):  # was returned as the perplexity, nan
                    _refuse_nan_logits(logits, same[0][0])
                nll += window
                count += sum(n for _, _, n in same)
    try:
        return math.exp(nll / count)
    except OverflowError:  # a mean NLL above ~709 nats: past float's range, not an error
        return math.inf


def _refuse_nan_logits(logits: torch.Tensor, begin: int) -> None:
    """Raise ``ValueError`` naming ``model`` for ``logits`` (of the windows from token
    ``begin``) whose negative log-likelihood is NaN: logits holding NaN, or +inf (which
    softmax turns into NaN). A label's -inf logit is no error (an infinite perplexity)."""
    bad = int((logits.isnan() | logits.isposinf()).sum())
    raise ValueError(
        f"model: its logits on the window of tokens_or_text from token {begin} hold {bad} NaN "
        "or +inf value(s), which give no perplexity; accepted: a model whose logits are "
        "finite (check its parameters for NaN or inf, or evaluate a half-precision model in "
        "float32)"
    )


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x).logits``, or a ``ValueError`` naming ``model`` when it cannot run on token
    ids or returns no logits (an encoder such as ``BertModel``)."""
    with model_errors("model", "it cannot run on token ids (perplexity needs a causal LM)"):
        out = model(x)
    logits = getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"model must be a causal language model whose output has .logits of "
                         f"shape (batch, seqlen, vocab) (a …ForCausalLM), got a "
                         f"{type(out).__name__} from {type(model).__name__}")
    return logits


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, sentences: list[str], *, batch_size: int = 32
          ) -> torch.Tensor:
    """Mean-pooled last hidden states of ``sentences`` (sentence-transformers style)."""
    device = home_device(model)
    out = []
    with preserved(model, train=False, buffers=False):  # as in perplexity: none changes
        for i in range(0, len(sentences), batch_size):
            enc = _encode(tokenizer, sentences[i:i + batch_size], model, device)
            hidden = model(**enc, output_hidden_states=True).hidden_states[-1].float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out)


def _encode(tokenizer: Any, sentences: list[str], model: nn.Module, device: torch.device
            ) -> dict[str, Any]:
    """``tokenizer``'s padded batch of ``sentences``, its tensors on ``device``, once its
    token ids are ones ``model`` embeds and fit its context: an id past the vocabulary
    failed with a bare ``IndexError`` inside the embedding, a batch longer than the
    position embeddings (a tokenizer that does not truncate to the model's length) or
    without any token with a raw ``RuntimeError``, and a sentence of no tokens embedded as
    zeros (a similarity of 0 between identical models)."""
    returned = ("the tokenizer must return a batch with 'input_ids' and 'attention_mask' "
                "tensors (a Hugging Face tokenizer)")
    try:
        enc = dict(tokenizer(sentences, padding=True, truncation=True, return_tensors="pt"))
        ids, mask = enc["input_ids"], enc["attention_mask"]
    except (KeyError, TypeError, IndexError, ValueError, RuntimeError, AttributeError) as e:
        raise ValueError(f"tokenizer: tokenizing sentences failed ({type(e).__name__}: "
                         f"{e}); {returned}") from e
    if not (isinstance(ids, torch.Tensor) and isinstance(mask, torch.Tensor)
            and ids.dim() == 2 and mask.shape == ids.shape):
        raise ValueError(f"tokenizer: {returned}, got {type(ids).__name__} input_ids")
    check_token_ids(ids, model, "sentences")
    limit, lengths = max_positions(model), mask.sum(1)
    if bool((lengths == 0).any()) or (limit is not None and ids.shape[1] > limit):
        # a sentence of no tokens embedded as zeros: a cosine of 0 to its dense embedding
        at = int(lengths.argmin()) if bool((lengths == 0).any()) else int(lengths.argmax())
        raise ValueError(
            f"sentences: {sentences[at][:50]!r} tokenizes to {int(lengths[at])} tokens; "
            f"accepted: 1 to {limit or 'any number of'} tokens (the context of "
            f"{type(model).__name__}, config.max_position_embeddings: a tokenizer whose "
            "model_max_length truncates to it)"
        )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in enc.items()}


def embedding_similarity(
    model: nn.Module, tokenizer: Any, sentences: list[str], dense_model: nn.Module
) -> float:
    """Mean cosine similarity of ``model``'s sentence embeddings to ``dense_model``'s.

    ``sentences`` is a non-empty list (or tuple) of strings: a single string would be
    embedded character by character; ``tokenizer`` a callable Hugging Face tokenizer.
    Embeddings holding NaN or inf (of either model) are a ``ValueError`` naming the model.
    """
    check_module("model", model)
    check_module("dense_model", dense_model)
    check_materialized_module(model, "model: ")
    check_materialized_module(dense_model, "dense_model: ")
    if not isinstance(sentences, (list, tuple)):
        raise ArgumentTypeError(f"sentences must be a non-empty list of strings, got "
                                f"{type(sentences).__name__}")
    if not sentences or not all(isinstance(s, str) for s in sentences):
        raise ValueError("sentences must be a non-empty list of strings")
    if not callable(tokenizer):
        raise ArgumentTypeError(f"tokenizer must be callable (a Hugging Face tokenizer), got "
                                f"{type(tokenizer).__name__}")
    a = embed(model, tokenizer, sentences)
    b = embed(dense_model, tokenizer, sentences)
    if a.shape != b.shape:  # was a raw broadcasting RuntimeError
        raise ValueError(f"dense_model embeds in {b.shape[-1]} dimensions, model in "
                         f"{a.shape[-1]}; accepted: the dense model that model was pruned from "
                         "(the same width)")
    for name, embeddings in (("model", a), ("dense_model", b)):  # NaN was the similarity
        check_finite(f"{name}'s sentence embeddings", embeddings,
                     hint=f"check {name}'s parameters for NaN or inf, or embed a "
                          "half-precision model in float32")
    return float(F.cosine_similarity(a, b, dim=-1).mean())
