"""RoutedAttention: a decode step computes only the attention heads its predictor picks.

Deja Vu (Liu et al. 2023) executes its head predictions: for each new token a low-rank
:class:`~sparsekit.moe.router.Router` (trained by :func:`~sparsekit.moe.head_predictors`)
scores the key/value head groups of a block from the attention input, and only the ``k``
best run. :func:`route_heads` returns a copy of a Hugging Face LLaMA-style model (``q_proj``,
``k_proj``, ``v_proj``, ``o_proj``, grouped-query heads) whose attentions are
:class:`RoutedAttention` modules. On a one-token step:

- the query rows of the chosen groups' heads are computed (one contiguous block of
  ``q_proj`` per group), the others are never read;
- attention over the cache runs for those heads only;
- ``o_proj`` reads only the chosen heads' columns (its weight is stored transposed, so
  they are one contiguous block per group).

Keys and values are computed for *every* head: a later token may pick a head this one
skipped, and its cache must then hold this token's key and value exactly. (With grouped
queries ``k_proj`` and ``v_proj`` are the small part: ``2 / (group size + 1)`` of the
attention's projection bytes before ``o_proj``.) With ``skip_kv`` they are computed for the
chosen groups only, as Deja Vu does, and the cache holds zeros for the others at this
position: an approximation — a later token that picks such a group sees a key of zero
(score 0, not excluded from its softmax) and a value of zero there. Prompts (more than one
token) and batches run the dense attention. With every group kept the module computes the
dense attention.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import check_bool, check_fraction, check_int
from sparsekit.moe.routed import check_model
from sparsekit.moe.router import Router

__all__ = ["RoutedAttention", "route_heads"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


class RoutedAttention(nn.Module):
    """A LLaMA-style attention whose one-token steps run the ``k`` head groups ``router``
    scores highest (of ``groups`` = the key/value heads, each with the query heads that
    read it).

    ``attention`` (the wrapped Hugging Face module, kept as ``self.dense``) supplies the
    weights, the cache slot (``layer_idx``), the scaling and the dense path. Its
    ``o_proj.weight`` is re-stored transposed (same values and shape, a strided view), so
    that a group's columns are contiguous in memory; pass a copy if the original must keep
    its layout (:func:`route_heads` does).
    """

    # it reads its layers' weights itself: decompile copies it whole, compile and pruning
    # refuse it (sparsekit.engine.persist.runs_own_layers)
    sparsekit_runs_own_layers = True

    def __init__(self, attention: nn.Module, router: Router, k: int, *,
                 skip_kv: bool = False) -> None:
        super().__init__()
        missing = [n for n in PROJECTIONS if not isinstance(getattr(attention, n, None),
                                                            nn.Linear)]
        if missing or not hasattr(attention, "head_dim"):
            raise TypeError(f"attention must be a LLaMA-style attention with "
                            f"{', '.join(PROJECTIONS)} and head_dim, got "
                            f"{type(attention).__name__}")
        if not isinstance(router, Router):
            raise TypeError(f"router must be a sparsekit.moe.Router, got {type(router).__name__}")
        groups = attention.k_proj.out_features // attention.head_dim
        if router.score.out_features != groups:
            raise ValueError(f"router scores {router.score.out_features} head groups, the "
                             f"attention has {groups} key/value heads")
        hidden = attention.q_proj.in_features
        if router.project.in_features != hidden:  # else a shape error at the first decode
            raise ValueError(f"router reads {router.project.in_features} features, the "
                             f"attention's input has {hidden}")
        _check_k(k, groups)
        check_bool("skip_kv", skip_kv)
        self.dense = attention
        self.head_dim = attention.head_dim
        self.groups = groups
        self.group_size = attention.q_proj.out_features // (self.head_dim * self.groups)
        self.router, self.k, self.skip_kv = router, k, skip_kv
        # o_proj's columns of one group become contiguous rows: the weight is stored
        # transposed and viewed back, so the dense path reads the same values at full speed
        o_proj = attention.o_proj
        o_proj.weight = nn.Parameter(o_proj.weight.detach().t().contiguous().t(),
                                     requires_grad=o_proj.weight.requires_grad)

    @property
    def k(self) -> int:
        """Head groups a decode step runs."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        # checked on every set, as RoutedFFN.k: a k of 0, past the groups or a float set
        # after construction failed inside topk at the next decode step
        _check_k(value, self.groups)
        self._k = int(value)

    @property
    def skip_kv(self) -> bool:
        """Whether a decode step computes the keys and values of the chosen groups only."""
        return self._skip_kv

    @skip_kv.setter
    def skip_kv(self, value: bool) -> None:
        # a flag read by its truth: "no" set directly switched the skipping on
        check_bool("skip_kv", value)
        self._skip_kv = value

    @property
    def kept(self) -> float:
        """Fraction of head groups a decode step computes."""
        return self.k / self.groups

    def chosen(self, x: torch.Tensor) -> torch.Tensor:
        """The ``k`` head groups picked for each row of ``x`` (..., hidden): (..., k)."""
        return self.router(x).topk(self.k, dim=-1).indices

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, **kwargs: Any
                ) -> tuple[torch.Tensor, None]:
        cache = kwargs.pop("cache", kwargs.pop("past_key_values", None))
        if hidden_states.shape[:-1].numel() != 1 or position_embeddings is None \
                or self.training:
            return self.dense(hidden_states, position_embeddings, attention_mask,
                              cache=cache, **kwargs)
        attn = self.dense
        x = hidden_states.reshape(1, -1)
        groups = self.chosen(x)[0].sort().values.tolist()
        width = self.group_size * self.head_dim
        q_w, q_b = attn.q_proj.weight, attn.q_proj.bias
        q = torch.cat([F.linear(x, q_w[g * width:(g + 1) * width],
                                None if q_b is None else q_b[g * width:(g + 1) * width])
                       for g in groups], dim=-1)
        q = q.view(1, len(groups) * self.group_size, 1, self.head_dim)
        if self.skip_kv and len(groups) < self.groups:
            key, value = (self._project(p, x, groups) for p in (attn.k_proj, attn.v_proj))
        else:
            key = attn.k_proj(x).view(1, self.groups, 1, self.head_dim)
            value = attn.v_proj(x).view(1, self.groups, 1, self.head_dim)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, key = _rotate(q, cos, sin), _rotate(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, attn.layer_idx, kwargs=kwargs)
        index = torch.tensor(groups, device=x.device)
        mask = attention_mask[..., :key.shape[-2]] if isinstance(attention_mask, torch.Tensor) \
            else None
        # the query heads of one group share its key/value head: they are its "rows"
        out = F.scaled_dot_product_attention(
            q.view(1, len(groups), self.group_size, self.head_dim),
            key.index_select(1, index), value.index_select(1, index),
            attn_mask=mask, scale=attn.scaling).view(len(groups), width)
        o_w, o_b = attn.o_proj.weight, attn.o_proj.bias
        y = o_b.view(1, -1) if o_b is not None else x.new_zeros(1, o_w.shape[0])
        for i, g in enumerate(groups):  # the group's columns: contiguous rows of o_proj.T
            y = torch.addmm(y, out[i:i + 1], o_w[:, g * width:(g + 1) * width].t())
        return y.view_as(hidden_states), None

    def _project(self, linear: nn.Linear, x: torch.Tensor, groups: list[int]) -> torch.Tensor:
        """``linear``'s heads of ``groups`` for the row ``x``, zeros for the other heads:
        (1, groups, 1, head_dim)."""
        out = x.new_zeros(self.groups, self.head_dim)
        d = self.head_dim
        for g in groups:
            out[g] = F.linear(x[0], linear.weight[g * d:(g + 1) * d],
                              None if linear.bias is None else linear.bias[g * d:(g + 1) * d])
        return out.view(1, self.groups, 1, d)


def _check_k(value: object, groups: int) -> None:
    """Raise unless ``value`` is an int (not a bool) in ``[1, groups]``."""
    check_int("k", value, minimum=1)
    if value > groups:  # type: ignore[operator]
        raise ValueError(f"k must be an int in [1, {groups}], got {value!r}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` (batch, heads, tokens, head_dim)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def route_heads(model: nn.Module, predictors: dict[str, tuple[Router, Any]], *,
                keep: float = 0.5, skip_kv: bool = False) -> nn.Module:
    """A copy of ``model`` whose attentions run, at each one-token decode step, the
    ``round(keep * groups)`` head groups (at least one) their predictor picks; with
    ``skip_kv`` the keys and values of the other groups are not computed either (their
    cache entries are zeros: see :class:`RoutedAttention`).

    ``predictors`` is what :func:`~sparsekit.moe.head_predictors` returns (block name →
    ``(router, quality)``); every block named must hold one LLaMA-style attention.
    ``model`` is left untouched.
    """
    check_model("model", model)
    check_fraction("keep", keep, zero=False, one=True)
    check_bool("skip_kv", skip_kv)
    if not isinstance(predictors, dict) or not predictors:
        raise ValueError("predictors must be the non-empty dict head_predictors returns, got "
                         f"{type(predictors).__name__}")
    names = dict(model.named_modules())
    plan = {}
    for block, entry in predictors.items():
        router = entry[0] if isinstance(entry, tuple) and entry else entry
        if block not in names or not isinstance(router, Router):
            raise ValueError(f"predictors: {block!r} must name a block of model with a Router, "
                             f"got {type(router).__name__}")
        attention = [n for n, m in names[block].named_children()
                     if all(isinstance(getattr(m, p, None), nn.Linear) for p in PROJECTIONS)]
        if any(isinstance(m, RoutedAttention) for m in names[block].children()):
            raise ValueError(f"model: block {block!r} is routed already; pass the model "
                             "route_heads was given, not the copy it returned")
        if len(attention) != 1:
            raise ValueError(f"predictors: block {block!r} has no LLaMA-style attention "
                             f"(q_proj, k_proj, v_proj, o_proj)")
        own = getattr(names[block], attention[0])
        extra = [p for p in ("q_norm", "k_norm") if getattr(own, p, None) is not None]
        if getattr(getattr(own, "config", None), "clip_qkv", None):
            extra.append("clip_qkv")
        if extra:  # the decode path computes q, k and v from the projections alone
            raise ValueError(
                f"model: the attention of block {block!r} ({type(own).__name__}) applies "
                f"{extra} to q/k/v, which route_heads' decode path does not (Qwen3, OLMo, "
                "OLMo2: the routed model decoded other logits at keep=1); accepted: "
                "LLaMA-style attention (LLaMA, Mistral, Qwen2, Gemma, Granite)")
        plan[f"{block}.{attention[0]}"] = router
    routed = copy.deepcopy(model)
    for name, router in plan.items():
        parent, _, child = name.rpartition(".")
        attention = routed.get_submodule(name)
        groups = attention.k_proj.out_features // attention.head_dim
        try:
            layer = RoutedAttention(attention, copy.deepcopy(router),
                                    max(1, round(keep * groups)), skip_kv=skip_kv)
        except ValueError as e:  # a predictor of another model
            raise ValueError(f"predictors[{parent!r}]: {e}") from e
        layer.train(attention.training)
        setattr(routed.get_submodule(parent), child, layer)
    return routed
