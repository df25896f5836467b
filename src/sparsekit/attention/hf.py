"""Hugging Face switch: run a transformers model's attention through a block-sparse pattern.

transformers looks attention functions up by ``config._attn_implementation`` in its
``AttentionInterface``; :func:`register` adds one called ``"sparsekit"`` (with SDPA's
mask builder, so padding masks are still made), and :func:`apply` registers it, settles
the pattern and switches a model onto it::

    sparsekit.attention.apply(model, pattern="antidiagonal", threshold=0.9)
    model.generate(long_prompt)            # prefill and every decode step go sparse
    sparsekit.attention.remove(model)      # back to the attention it had (SDPA)

After :func:`register`, ``model.config._attn_implementation = "sparsekit"`` switches a
model too, with the default :class:`SparseAttention` settings.

Each call falls back to SDPA (softcapped scores: the model's eager attention, which SDPA
cannot compute) where sparsity cannot pay or cannot apply: where the measured
break-even says dense is faster (:class:`~sparsekit.attention.break_even.BreakEven`: both
paths timed on the first call of each shape and length octave) or, given ``min_length``,
keys shorter than it; an explicit element mask (padding, chunked prefill, sliding-window
models), dropout, or softcapped / position-biased scores. Otherwise the pattern builds a
block mask from the call's queries and keys and
:func:`~sparsekit.attention.block_sparse_attention` computes only its tiles — prefill and
single-token decode over the KV cache alike (causal attention aligns the query with the
last key).
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from sparsekit._checks import ArgumentTypeError, check_int, check_materialized, check_module
from sparsekit.attention.block_sparse import block_sparse_attention
from sparsekit.attention.break_even import BreakEven, call_class
from sparsekit.attention.patterns import Antidiagonal, AttentionPattern, resolve_pattern

__all__ = ["NAME", "SparseAttention", "apply", "register", "remove"]

NAME = "sparsekit"
"""The attention implementation name models are switched to."""

ATTRIBUTE = "sparse_attention"
"""The attribute :func:`apply` sets on the modules that read the model's config."""

_PREVIOUS = "_sparsekit_dense_attention"
"""The attribute :func:`apply` sets on the model: the attention implementation it had, which
:func:`remove` restores."""

_DENSE_ONLY = ("softcap", "position_bias", "sliding_window", "s_aux")


@dataclass(frozen=True)
class SparseAttention:
    """How a model's attention goes sparse.

    Attributes:
        pattern: chooses each call's block mask from its queries and keys.
        block_size: tile edge in tokens.
        min_length: ``None`` (the default) measures the break-even: each call class runs
            the faster of dense SDPA and the sparse path (``break_even``); an int is a
            fixed break-even instead: calls with fewer keys run SDPA, the rest sparse.
        break_even: the timings' decisions, shared by every module these settings reach.
    """

    pattern: AttentionPattern = field(default_factory=Antidiagonal)
    block_size: int = 64
    min_length: int | None = None
    break_even: BreakEven = field(default_factory=BreakEven, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, AttentionPattern):
            raise TypeError(
                "pattern must be an AttentionPattern (see sparsekit.attention.resolve_pattern), "
                f"got {type(self.pattern).__name__}"
            )
        check_int("block_size", self.block_size, minimum=1)
        if self.min_length is not None:
            check_int("min_length", self.min_length, minimum=0)
        if not isinstance(self.break_even, BreakEven):
            raise TypeError(f"break_even must be a BreakEven, got {type(self.break_even).__name__}")
        self.pattern.check(self.block_size)


_DEFAULT = SparseAttention()


def register() -> None:
    """Add the ``"sparsekit"`` attention function (and SDPA's mask builder under the same
    name) to transformers' global interfaces; calling it again changes nothing."""
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def apply(
    model: PreTrainedModel,
    pattern: str | AttentionPattern | torch.Tensor = "antidiagonal",
    *,
    block_size: int = 64,
    min_length: int | None = None,
    **options: Any,
) -> PreTrainedModel:
    """Switch ``model`` onto block-sparse attention with ``pattern`` and return it.

    Args:
        model: a transformers model whose attention uses the ``AttentionInterface``.
        pattern: a pattern name from :data:`~sparsekit.attention.ATTENTION_PATTERNS`
            (built with ``options``, e.g. ``threshold=0.9``), a pattern, or a bool block mask.
        block_size: tile edge in tokens.
        min_length: ``None`` times dense and sparse on the first call of each class and
            runs the faster; an int runs SDPA on calls with fewer keys, sparse on the rest.

    A model whose attention transformers cannot switch (it does not use the
    ``AttentionInterface``, e.g. XLNet) is a ``ValueError``, not a silent no-op.
    """
    _check_model(model)
    settings = SparseAttention(resolve_pattern(pattern, **options), block_size, min_length)
    mask = getattr(settings.pattern, "mask", None)
    if isinstance(mask, torch.Tensor) and any(not p.is_meta for p in model.parameters()):
        check_materialized("pattern", mask)  # else every forward failed, after the switch
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:  # transformers only logged a warning
        raise ValueError(
            f"model: {type(model).__name__} does not run its attention through transformers' "
            "AttentionInterface, so its attention cannot be switched to sparse attention; "
            "accepted: models whose attention implementation can be set (LLaMA, Qwen2, "
            "Mistral, GPT-2, BERT …); the model was not changed")
    if previous != NAME:  # applied again: keep what the first apply switched away from
        vars(model)[_PREVIOUS] = previous
    for module in _config_holders(model):
        setattr(module, ATTRIBUTE, settings)
    return model


def remove(model: PreTrainedModel) -> PreTrainedModel:
    """Switch ``model`` back to the attention it had before :func:`apply` (SDPA where that
    is unknown: a model switched by setting its config) and drop its sparse settings;
    return it. A model loaded with eager attention (for ``output_attentions``) stays eager.
    """
    _check_model(model)
    if model.config._attn_implementation == NAME:
        model.set_attn_implementation(vars(model).get(_PREVIOUS) or "sdpa")
    vars(model).pop(_PREVIOUS, None)
    for module in _config_holders(model):
        if ATTRIBUTE in vars(module):
            delattr(module, ATTRIBUTE)
    return model


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``(batch, heads, seq, head_dim)`` in,
    ``(batch, seq, heads, head_dim)`` out, with no attention weights."""
    settings: SparseAttention = getattr(module, ATTRIBUTE, _DEFAULT)
    if kwargs.get("output_attentions"):  # the model's attentions came back as () unsaid
        warnings.warn("output_attentions=True: the 'sparsekit' attention computes no attention "
                      "weights (neither does 'sdpa'); load the model with "
                      "attn_implementation='eager' to get them", UserWarning, stacklevel=2)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len, kv_len = query.shape[2], key.shape[2]
    if causal and attention_mask is None and 1 < q_len < kv_len:
        # prefill into an empty static cache: the keys past the queries are unused slots
        key, value, kv_len = key[:, :, :q_len], value[:, :, :q_len], q_len

    def dense() -> tuple[torch.Tensor, None]:
        eager = _softcap_eager(module, kwargs)
        if eager is not None:
            mask = _additive(attention_mask, query, kv_len, causal)
            return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                         **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)

    def sparse() -> tuple[torch.Tensor, None]:
        # the patterns score q·k / sqrt(head_dim): a model of another scale (Granite's
        # attention_multiplier, Gemma 3's query_pre_attn_scalar) had its tiles chosen on
        # another softmax than it computes (58 % of the mass kept where Exact promised 95)
        dim = query.shape[-1]
        scored = query if scaling is None or scaling * math.sqrt(dim) == 1.0 else (
            query * (scaling * math.sqrt(dim)))
        mask = settings.pattern.block_mask(scored, key, block_size=settings.block_size,
                                           causal=causal)
        out = block_sparse_attention(query, key, value, mask, causal=causal,
                                     block_size=settings.block_size, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    if (
        attention_mask is not None
        or dropout > 0.0
        or query.dtype not in (torch.float32, torch.bfloat16)
        or any(kwargs.get(name) is not None for name in _DENSE_ONLY)
    ):
        return dense()
    if settings.min_length is not None:
        return dense() if kv_len < settings.min_length else sparse()
    if kv_len < 2 * settings.block_size:  # one key block: nothing a mask could skip
        return dense()
    call = call_class(query, key, causal=causal, block_size=settings.block_size)
    return settings.break_even.run(call, dense, sparse)


def _softcap_eager(module: nn.Module, kwargs: dict[str, Any]) -> Any:
    """For softcapped scores (Gemma 2), the eager attention of the module's own modeling
    file, the dense fallback there (``None`` elsewhere: SDPA is): transformers' SDPA refuses
    a softcap, so a softcapped model failed on every call once switched."""
    if kwargs.get("softcap") is None:
        return None
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    return eager if callable(eager) else None


def _additive(mask: torch.Tensor | None, query: torch.Tensor, kv_len: int,
              causal: bool) -> torch.Tensor | None:
    """SDPA's mask (bool, True attends; ``None`` for plain causal attention) as the additive
    float mask eager attention adds to its scores."""
    if mask is None and causal:  # the last query aligned with the last key
        q_len = query.shape[2]
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(
            kv_len - q_len)
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min)


def _check_model(model: Any) -> None:
    """Raise :class:`~sparsekit._checks.ArgumentTypeError` (a ``TypeError`` that ``except
    ValueError`` also catches) unless ``model`` is a transformers model: an ``nn.Module``
    (the check of every ``model=``) that is also a ``PreTrainedModel``, whose config and
    ``set_attn_implementation`` the switch uses."""
    check_module("model", model)
    if not isinstance(model, PreTrainedModel):
        raise ArgumentTypeError(f"model must be a transformers PreTrainedModel, got "
                                f"{type(model).__name__}")


def _config_holders(model: PreTrainedModel) -> list[nn.Module]:
    """The submodules that read a config (attention modules among them), models excepted."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "config", None), PretrainedConfig)
            and not isinstance(m, PreTrainedModel)]
