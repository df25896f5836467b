"""LowRankRouter: score an FFN's units by the mass of approximate neuron values (Deja Vu).

Instead of learning the units' scores, compute them: the writers ``W_in`` (every writer row
of the routed neurons) are replaced by a rank-``r`` factorisation ``B A``, and a unit's score
is :func:`~sparsekit.moe.routed.unit_mass` of the neuron values ``act(B A x + b)`` it
predicts. The factorisation minimises the pre-activations' squared error on the calibration
inputs, ``E ||W_in x - B A x||^2`` (the SVD of ``W_in C^{1/2}``, ``C = E[x x^T]``, mapped
back through ``C^{-1/2}``): where the inputs are low-dimensional, a low rank loses little.
The scores are exact at full rank (the oracle's choice) and degrade smoothly as ``r``
falls; below full rank :meth:`LowRankRouter.refine` then fits the factors to the mass itself
(Adam on its relative squared error), which the pre-activations' error only approximates.
The cost is ``r * (d + writers * units * unit_size)`` multiply-adds per token.

On the ReLU-fied MiniLM (d = 384, 1536 neurons, experts of 4, 30 % kept, 32768 calibration
tokens from sentences; cosine of sentence embeddings to the original GELU model, whose
ground-truth experts reach 0.960) rank 128 costs 21 % of the FFN's MACs and chose experts
holding 94 % of the true top experts' mass (cosine 0.939; refined 1000 steps, 0.943), where
the trained rank-128 :class:`~sparsekit.moe.router.Router` (8 % of the MACs) held 88 %
(0.919) and a rank-256 one (17 %) 90 % (0.928); rank 64 (10 %): 0.911, refined 0.925;
rank 192 (31 %): 0.951.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_finite,
    check_int,
    check_materialized,
    check_positive,
    check_seed,
    seeded,
)
from sparsekit.moe.ffn import activate
from sparsekit.moe.routed import unit_mass
from sparsekit.moe.router import check_features, check_fittable, restored_on_failure

__all__ = ["LowRankRouter"]


class LowRankRouter(nn.Module):
    """Scores ``(..., units)``: the activation mass of each unit predicted through a rank-
    ``rank`` factorisation of its writer rows, for FFN inputs ``(..., features)``.

    ``w_in`` (n, writers, d) and ``b_in`` (n, writers) or None are the routed neurons'
    writer rows in stored order (``n = units * unit_size``), ``norms`` (n,) the norms of
    their reader columns, ``act`` the FFN's activation, ``x`` (T, d) calibration inputs the
    factorisation is fitted to; ``rank`` at most ``d``.
    """

    def __init__(self, w_in: torch.Tensor, b_in: torch.Tensor | None, norms: torch.Tensor,
                 act: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, rank: int,
                 unit_size: int) -> None:
        super().__init__()
        tensors = {"w_in": w_in, "norms": norms, "x": x} | ({} if b_in is None
                                                            else {"b_in": b_in})
        for name, t in tensors.items():
            _check_tensor(name, t)
        if not callable(act):  # else accepted, and every forward failed far from here
            raise TypeError(f"act must be the FFN's activation, a callable such as torch.relu, "
                            f"got {act!r}")
        if w_in.dim() != 3:
            raise ValueError(f"w_in must be (neurons, writers, features), got "
                             f"{tuple(w_in.shape)}")
        n, writers, d = w_in.shape
        check_int("rank", rank, minimum=1)
        check_int("unit_size", unit_size, minimum=1)
        if rank > d:
            raise ValueError(f"rank must be at most the {d} input features, got {rank}")
        if n % unit_size:
            raise ValueError(f"unit_size must divide the {n} routed neurons, got {unit_size}")
        if b_in is not None and b_in.shape != (n, writers):
            raise ValueError(f"b_in must be None or ({n}, {writers}) (w_in's neurons and "
                             f"writers), got {tuple(b_in.shape)}")
        if norms.shape != (n,):  # else every forward fails in unit_mass
            raise ValueError(f"norms must be ({n},) (one per neuron of w_in), got "
                             f"{tuple(norms.shape)}")
        if x.dim() != 2 or x.shape[1] != d or not x.shape[0]:
            raise ValueError(f"x must be (T, {d}) calibration inputs, got {tuple(x.shape)}")
        for name in tensors:  # else the factorisation fails inside eigh or svd, or (norms,
            # b_in) every score is NaN: a random choice; in float32, where it runs (a finite
            # float64 value past its range failed inside svd)
            check_finite(name, tensors[name], dtype=torch.float32)
        self.act, self.writers, self.unit_size = act, writers, unit_size
        # buffers hold values, no autograd history: factors of a model's parameters (which
        # require grad) were non-leaf tensors that refine could not train, nor deepcopy copy
        w_in, b_in, norms, x = (None if t is None else t.detach() for t in (w_in, b_in, norms, x))
        down, up = _factorise(w_in.reshape(n * writers, d).float(), x.float(), rank)
        self.register_buffer("down", down)  # (rank, d)
        self.register_buffer("up", up)  # (n * writers, rank)
        self.register_buffer("bias", None if b_in is None else b_in.reshape(-1).float().clone())
        self.register_buffer("norms", norms.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_features(x, self.down.shape[1], "the router's features")
        z = F.linear(F.linear(x.to(self.down.dtype), self.down), self.up, self.bias)
        h = activate(self.act, z.unflatten(-1, (-1, self.writers)))
        return unit_mass(h, self.norms, 0, self.unit_size)

    def refine(self, x: torch.Tensor, mass: torch.Tensor, *, steps: int, lr: float = 1e-3,
               batch: int = 256, seed: int = 0) -> LowRankRouter:
        """Fit the factors and bias to the true unit ``mass`` (T, units) of inputs ``x``
        (T, d): ``steps`` Adam steps on minibatches of ``batch`` rows drawn with ``seed``,
        minimising the squared error of the scores relative to the mass's. Returns self.
        Checked as :func:`~sparsekit.moe.router.fit` checks its router: a refine that
        cannot run changes nothing, one whose updates make a factor NaN or inf (a huge
        ``lr``) raises naming ``lr``, with the factors restored."""
        check_int("steps", steps, minimum=1)
        check_positive("lr", lr)
        check_int("batch", batch, minimum=1)
        check_seed("seed", seed)
        d = self.down.shape[1]
        for name, t in (("x", x), ("mass", mass)):
            _check_tensor(name, t)
        if x.dim() != 2 or x.shape[1] != d or not x.shape[0]:
            raise ValueError(f"x must be (T, {d}) FFN inputs, T ≥ 1, got {tuple(x.shape)}")
        if mass.shape != (x.shape[0], self.up.shape[0] // self.writers // self.unit_size):
            raise ValueError(f"mass must be (T, units) for x of {x.shape[0]} rows, got "
                             f"{tuple(mass.shape)}")
        # data: see Router's fit; one NaN would make every factor NaN
        x = check_finite("x", x.detach(), dtype=torch.float32)
        mass = check_finite("mass", mass.detach(), dtype=torch.float32)
        named = {name: t for name, t in (("down", self.down), ("up", self.up),
                                         ("bias", self.bias)) if t is not None}
        check_fittable("router", named, lr)
        factors = list(named.values())
        generator = seeded(seed)
        optimizer = torch.optim.Adam(factors, lr=lr)
        try:
            with torch.enable_grad(), restored_on_failure(self, factors, lr):
                for t in factors:
                    t.requires_grad_(True)
                for _ in range(steps):
                    rows = torch.randint(x.shape[0], (min(batch, x.shape[0]),),
                                         generator=generator)
                    target = mass[rows]
                    loss = (self(x[rows]) - target).square().sum() / target.square().sum(
                        ).clamp_min(1e-12)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        finally:
            for t in factors:
                t.requires_grad_(False).grad = None
        return self

    @property
    def macs(self) -> int:
        """Multiply-adds per token."""
        return self.down.numel() + self.up.numel()


def _check_tensor(name: str, t: object) -> None:
    """Raise unless ``t`` is a real tensor holding values: a complex one lost its imaginary
    part in the cast to float32 (a warning, then factors of the real part), a bool one
    holds no values, and a meta one failed inside the finiteness check."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.is_complex() or t.dtype == torch.bool:
        raise ArgumentTypeError(f"{name} must be a real (floating-point or integer) tensor, "
                                f"got {t.dtype}")
    check_materialized(name, t)


def _factorise(w: torch.Tensor, x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``down`` (rank, d), ``up`` (m, rank) minimising ``||(w - up @ down) x^T||`` over the
    rows of ``x``: the truncated SVD of ``w C^{1/2}``, ``C`` the inputs' second moment (a
    ridge of 1e-6 of its mean eigenvalue keeps it invertible)."""
    c = x.t() @ x / x.shape[0]
    # finite inputs past ~1e18 overflow it: eigh failed with a raw error naming no argument
    check_finite("x's second moment x^T x / T", c,
                 hint="the calibration inputs are too large for float32; scale them down")
    c = c + 1e-6 * c.diagonal().mean().clamp_min(1e-12) * torch.eye(c.shape[0])
    values, vectors = torch.linalg.eigh(c)
    root = values.clamp_min(0).sqrt()
    u, s, vt = torch.linalg.svd(w @ (vectors * root) @ vectors.t(), full_matrices=False)
    down = vt[:rank] @ (vectors / root.clamp_min(1e-12)) @ vectors.t()
    return down.contiguous(), (u[:, :rank] * s[:rank]).contiguous()
