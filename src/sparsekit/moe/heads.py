"""Contextual sparsity of attention heads: predict, per token, the heads that matter.

Deja Vu (Liu et al. 2023) finds attention as contextually sparse as the FFN: for a given
token a few heads carry most of the attention output. :func:`head_predictors` trains one
low-rank :class:`~sparsekit.moe.router.Router` per transformer block that reads the
attention input (the query projection's input) and scores its key/value heads (each with
the query heads that read it, as in structured pruning's head groups); the labels are the
``k`` heads with the largest output contribution ``||W_o[:, head] a_head||``.
:func:`head_predictors` returns them with their recall and the relative error of the
attention output when only the predicted heads are kept, on held-out data;
:func:`~sparsekit.moe.route_heads` executes them (decode steps compute only those heads).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sparsekit._checks import check_finite, check_fraction, check_int, check_seed
from sparsekit.moe.routed import check_model
from sparsekit.moe.router import Router, fit
from sparsekit.observe import run, watch
from sparsekit.structured.transformer import block_group, transformer_blocks

__all__ = ["head_predictors"]


def head_predictors(
    model: nn.Module,
    calibration: Any,
    data: Any,
    *,
    keep: float = 0.5,
    rank: int = 64,
    steps: int = 300,
    max_rows: int = 2048,
    seed: int = 0,
) -> dict[str, tuple[Router, dict[str, float]]]:
    """Per block name: a head predictor trained on ``calibration`` and its quality on
    ``data`` (``recall`` = ``precision``, ``error``, ``oracle_error``, ``kept``), keeping
    ``round(keep * heads)`` key/value heads per token (at least one). At most ``max_rows``
    rows (the first) of each block's attention input are used. ``model`` is not changed.
    """
    check_model("model", model)
    check_fraction("keep", keep, zero=False, one=True)
    for name, value in (("rank", rank), ("steps", steps), ("max_rows", max_rows)):
        check_int(name, value, minimum=1)
    check_seed("seed", seed)
    if calibration is None:
        raise ValueError("calibration must be a tensor of inputs or a list of them, got None")
    prefix, blocks = transformer_blocks(model)
    groups = [block_group(f"{prefix}.{i}", b, "heads") for i, b in enumerate(blocks)]
    out = {}
    for group in groups:
        q = next(s for s in group.slices if s.role == "out").name.removesuffix(".weight")
        o = next(s for s in group.slices if s.role == "in")
        o_proj = model.get_submodule(o.name.removesuffix(".weight"))
        columns = o.indices(torch.arange(group.channels)).view(group.channels, -1)
        k = max(1, round(keep * group.channels))
        layers = {"x": model.get_submodule(q), "a": o_proj}
        block = group.name.removesuffix(".heads")
        train = _rows(model, layers, calibration, max_rows, "calibration", block)
        test = _rows(model, layers, data, max_rows, "data", block)
        w = o_proj.weight.detach().float()
        importance = _importance(train["a"], w, columns)
        labels = torch.zeros_like(importance).scatter_(1, importance.topk(k, 1).indices, 1.0)
        router = fit(Router(train["x"].shape[1], group.channels, rank), train["x"], labels,
                     steps=steps, seed=seed)
        out[block] = (router, _quality(router, test, w, columns, k))
    return out


def _rows(model: nn.Module, layers: dict[str, nn.Module], data: Any, limit: int, param: str,
          block: str) -> dict[str, torch.Tensor]:
    """The first ``limit`` input rows of each layer of ``block`` on ``data`` (aligned: the
    same tokens); errors on ``data`` name ``param``, the argument it came from, also where
    the rows are not finite (a predictor trained or measured on NaN rows is noise, without
    an error)."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def keep(name: str, x: torch.Tensor, _out: Any) -> None:
        if sum(r.shape[0] for r in rows[name]) < limit:
            rows[name].append(x.detach().reshape(-1, x.shape[-1]).float())

    with watch(layers, keep):
        run(model, data, param)
    out = {n: torch.cat(r)[:limit] for n, r in rows.items()}
    for name, x in out.items():
        check_finite(f"{param}: the values the attention of block {block!r} reads on it "
                     f"(the inputs of {name!r})", x,
                     hint="check the inputs and the model's weights")
    return out


def _importance(a: torch.Tensor, w: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``||w[:, head] @ a[t, head]||`` per row and head: (T, heads)."""
    return torch.stack([torch.linalg.vector_norm(a[:, c] @ w[:, c].t(), dim=1)
                        for c in columns], dim=1)


@torch.no_grad()
def _quality(router: Router, rows: dict[str, torch.Tensor], w: torch.Tensor,
             columns: torch.Tensor, k: int) -> dict[str, float]:
    a = rows["a"]
    dense = a @ w.t()
    oracle = _importance(a, w, columns).topk(k, 1).indices
    chosen = router(rows["x"]).topk(k, 1).indices
    recall = float((chosen[:, :, None] == oracle[:, None, :]).any(-1).float().mean())

    def error(heads: torch.Tensor) -> float:
        mask = torch.zeros(a.shape[0], columns.shape[0]).scatter_(1, heads, 1.0)
        kept = torch.zeros_like(a)
        kept[:, columns.flatten()] = mask.repeat_interleave(columns.shape[1], dim=1)
        diff = (a * kept) @ w.t() - dense
        return float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(dense))

    return {"recall": recall, "precision": recall, "error": error(chosen),
            "oracle_error": error(oracle), "kept": k / columns.shape[0]}
