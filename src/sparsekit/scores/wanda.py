"""Wanda: weight magnitude times input-activation norm (Sun et al. 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit.scores import CRITERIA
from sparsekit.scores._context import ScoreContext, preserved


@CRITERIA.register("wanda", data_driven=True)
def wanda(ctx: ScoreContext) -> dict[str, torch.Tensor]:
    """|W_ij| · ‖X_j‖₂, where X_j is input feature j of the layer over all calibration data.

    For convolutions the input features are the unfolded patches (channel × kernel
    position), matching the flattened weight layout.
    """
    for t in ctx.targets:
        if not isinstance(t.module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or (
            t.param is not t.module.weight
        ):
            raise ValueError(
                f"criterion 'wanda' scores Linear/Conv weights only; target {t.name!r} is not one"
            )
    data = ctx.require_data("wanda", labels=False)
    norms = input_sq_norms(ctx.model, ctx.targets, [x for x, _ in data])
    return {
        t.name: (t.param.detach().abs().float().flatten(1) * norms[t.name].sqrt())
        .reshape(t.param.shape)
        for t in ctx.targets
    }


def input_sq_norms(model: nn.Module, targets, inputs) -> dict[str, torch.Tensor]:
    """Sum of squares of each target layer's input features over ``inputs``.

    Each result broadcasts against ``weight.flatten(1)``: shape ``(in_features,)``, or
    ``(out, in_per_group · k)`` for grouped convolutions.
    """
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for t in targets:
        def hook(module, args, _out, name=t.name):
            sq = _sq_norms(module, args[0].detach().float())
            sums[name] = sums[name] + sq if name in sums else sq

        handles.append(t.module.register_forward_hook(hook))
    try:
        with preserved(model, train=False), torch.no_grad():
            for x in inputs:
                model(x)
    finally:
        for h in handles:
            h.remove()
    missing = [t.name for t in targets if t.name not in sums]
    if missing:
        raise ValueError(f"data never reached these targets during the forward pass: {missing}")
    return sums


def _sq_norms(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Linear):
        x = x.reshape(-1, module.in_features)
        return (x * x).sum(0)
    if _unfoldable(module):  # exact: features are the unfolded patches (channel × position)
        if isinstance(module, nn.Conv1d):  # a height-1 image
            x = x.unsqueeze(2)
            ks, dil, pad, st = ((1, *module.kernel_size), (1, *module.dilation),
                                (0, *module.padding), (1, *module.stride))
        else:
            ks, dil, pad, st = module.kernel_size, module.dilation, module.padding, module.stride
        cols = F.unfold(x, ks, dilation=dil, padding=pad, stride=st)  # (N, C·k, L)
        return (cols * cols).sum((0, 2))
    # Other convolutions: each channel's norm, shared by all its kernel positions.
    w = module.weight
    per_channel = (x * x).transpose(0, 1).reshape(x.shape[1], -1).sum(1)
    groups = getattr(module, "groups", 1)
    cols = per_channel.reshape(groups, w.shape[1]).repeat_interleave(w[0, 0].numel(), dim=1)
    return cols.repeat_interleave(w.shape[0] // groups, dim=0) if groups > 1 else cols[0]


def _unfoldable(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1
        and module.padding_mode == "zeros" and not isinstance(module.padding, str)
    )
