"""Calibration data: token ids, texts or a text file → ``(nsamples, seqlen)`` token windows.

Under ``torchrun`` every rank builds the same windows and calibrates on its own share of
them (:func:`rank_share`); the statistics are then summed over the ranks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_fits_memory,
    check_int,
    check_materialized,
    check_seed,
    seeded,
)
from sparsekit.distributed import check_same_on_ranks, rank_slice, world_size

Calibration = torch.Tensor | list[str] | str | os.PathLike


def calibration_tokens(
    calibration: Calibration,
    *,
    tokenizer: Any = None,
    nsamples: int = 128,
    seqlen: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Token windows to calibrate on, shape ``(n, L)``.

    A 2-D tensor is used as given (its first ``nsamples`` rows, first ``seqlen`` columns).
    A 1-D tensor, a list of strings or the path of a text file (tokenised with
    ``tokenizer``) is one token stream, from which ``nsamples`` random windows of ``seqlen``
    tokens are drawn with ``seed`` (the whole stream when it is shorter than ``seqlen``).
    """
    check_int("nsamples", nsamples, minimum=1)
    if seqlen is not None:
        check_int("seqlen", seqlen, minimum=1)
    check_seed("seed", seed)
    if isinstance(calibration, torch.Tensor):
        check_token_dtype(calibration)
        if calibration.dim() not in (1, 2):
            raise ValueError(
                "calibration tensor of token ids must have shape (N, L) or (L,), got "
                f"{tuple(calibration.shape)}"
            )
        if calibration.dim() == 2:
            if calibration.numel() == 0:
                raise ValueError("calibration: the token tensor is empty")
            return calibration[:nsamples, :seqlen].long()
        stream = calibration.long()
    else:
        stream = tokenize(calibration, tokenizer)
    if stream.numel() < 2:
        raise ValueError(f"calibration holds {stream.numel()} tokens; it needs at least 2")
    seqlen = min(seqlen or stream.numel(), stream.numel())
    # int64 token ids; else the allocator's raw error, after loading
    check_fits_memory(nsamples * seqlen * 8,
                      f"nsamples={nsamples} windows of {seqlen} tokens take", "ask for fewer")
    gen = seeded(seed)
    starts = torch.randint(0, stream.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([stream[s:s + seqlen] for s in starts.tolist()])


def check_token_dtype(ids: torch.Tensor, param: str = "calibration") -> None:
    """Raise unless the tensor ``ids`` holds integers: ``.long()`` would silently truncate
    float ids (3.7 to 3) and turn bools into ids 0 and 1; and unless it holds values (one
    on the meta device failed in the vocabulary check with a raw ``RuntimeError``)."""
    dtype = ids.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ArgumentTypeError(
            f"{param} tensor must hold token ids, an integer dtype (torch.long), got {dtype}"
        )
    check_materialized(param, ids)


def rank_share(tokens: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows ``tokens`` (all of them in a
    single process).

    Every rank must hold the same windows (checked: give every rank the same
    ``calibration``, ``nsamples``, ``seqlen`` and ``seed``), and their number must be a
    multiple of the number of ranks, so that each rank calibrates on as many as the others.
    """
    ranks = world_size()
    if ranks == 1:
        return tokens
    check_same_on_ranks({"tokens": tokens}, "calibration windows",
                        "pass every rank the same calibration, nsamples, seqlen and seed")
    return tokens[rank_slice(tokens.shape[0], "calibration", "windows", "nsamples")]


def tokenize(
    text: list[str] | str | os.PathLike, tokenizer: Any, param: str = "calibration"
) -> torch.Tensor:
    """Token ids of a list of texts (concatenated) or of a text file, as one 1-D tensor.

    ``param`` names the argument in error messages. A file that is not UTF-8 text, and a
    ``tokenizer`` that fails or returns anything but integer ids under ``"input_ids"`` (a
    float id was truncated, 1.7 to 1), are a ``ValueError`` naming them.
    """
    if isinstance(text, (str, os.PathLike)):
        path = Path(text)
        try:
            found = path.is_file()
        except OSError:  # a name too long for a path: a text passed as a string
            found = False
        if not found:
            raise FileNotFoundError(f"{param}: no such text file {str(path)[:100]!r} (pass "
                                    "texts as a list of strings)")
        try:
            text = [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError as e:
            raise ValueError(f"{param}: the text file {str(path)[:100]!r} is not UTF-8 text "
                             f"({e})") from None
    if not isinstance(text, list) or not all(isinstance(t, str) for t in text):
        # "got list" for a list of tokenizer outputs: it was the list's items that were wrong
        got = (f"a list holding a {type(next(t for t in text if not isinstance(t, str))).__name__}"
               if isinstance(text, list) else type(text).__name__)
        raise ArgumentTypeError(
            f"{param} must be a token tensor, a list of strings or a text file path, got {got}"
            " (batches with an attention_mask are not read: padded positions would enter the "
            "statistics; pass the texts, or unpadded windows of token ids)"
        )
    if not any(t.strip() for t in text):
        raise ValueError(f"{param}: the text is empty")
    if tokenizer is None:
        raise ValueError(f"tokenizer is required when {param} is text (pass tokenizer=)")
    if not callable(tokenizer):
        raise ArgumentTypeError(f"tokenizer must be callable (a Hugging Face tokenizer), got "
                        f"{type(tokenizer).__name__}")
    returned = "the tokenizer must return token ids under 'input_ids' (lists of ints)"
    try:
        flat = [i for seq in tokenizer(text)["input_ids"] for i in seq]
        ids = torch.tensor(flat) if flat else torch.zeros(0, dtype=torch.long)
    except (KeyError, TypeError, IndexError, ValueError, RuntimeError, OverflowError) as e:
        raise ValueError(f"tokenizer: tokenizing {param} failed ({type(e).__name__}: {e}); "
                         f"{returned}") from e
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ArgumentTypeError(f"tokenizer: {returned}, got {ids.dtype} values for {param}")
    return ids.long()


def vocab_size(model: nn.Module) -> int | None:
    """How many token ids ``model`` embeds: its input embedding's rows (else
    ``config.vocab_size``); ``None`` when the model says neither."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if isinstance(embedding, nn.Embedding):
        return embedding.num_embeddings
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return size if isinstance(size, int) else None


def check_token_ids(ids: torch.Tensor, model: nn.Module, param: str = "calibration") -> None:
    """Raise unless every id in ``ids`` is one ``model`` embeds (``0 ≤ id < vocab_size``);
    an id outside would fail deep in the embedding with a bare ``IndexError``."""
    size = vocab_size(model)
    if size is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= size:
        bad = low if low < 0 else high
        raise ValueError(
            f"{param} holds token id {bad}, outside the model's vocabulary; accepted: ids in "
            f"[0, {size}) (tokenize with the model's own tokenizer)"
        )


def byte_tokenizer() -> Any:
    """A 256-token byte-level tokenizer (token id = byte value), built locally.

    For models trained from scratch on raw bytes; needs ``transformers``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=1 << 30)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}
