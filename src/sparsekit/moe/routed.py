"""RoutedFFN: an FFN whose neurons are grouped into units, of which a router picks a few.

The neurons are stored in the order ``[hot | unit 0 | unit 1 | ...]``: ``hot`` neurons
(PowerInfer's frequently active ones) run for every token; the rest form ``units`` of
``unit_size`` neurons (MoEfication's experts; single neurons for Deja Vu), of which the
:class:`~sparsekit.moe.router.Router` (or :class:`~sparsekit.moe.lowrank.LowRankRouter`)
picks the ``k`` highest scored per token. Each neuron's writer rows (``gate`` and ``up``)
are stored next to each other, so a unit's rows are one contiguous block.

A single row (a decode step) computes the writer rows of the hot neurons and of the chosen
units only (contiguous blocks; single neurons are gathered), and the reader reads only
their columns: it is an :class:`~sparsekit.engine.activation_linear.ActivationSparseLinear`
whose kernel skips the columns of zero inputs. Several rows (a prompt, training-free
evaluation) compute every neuron and zero those not chosen for each row: the same outputs,
at dense cost. With every unit chosen the module computes the dense FFN.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_fraction,
    check_int,
    check_materialized,
    check_materialized_module,
    check_module,
)
from sparsekit.engine.activation_linear import ActivationSparseLinear
from sparsekit.moe.ffn import activate
from sparsekit.moe.router import check_features
from sparsekit.quantize import dequantize_grid

__all__ = ["RoutedFFN", "check_model", "set_keep", "set_oracle", "unit_mass"]


class RoutedFFN(nn.Module):
    """``reader(act(gate(x)) * up(x))`` (or ``reader(act(up(x)))``) over the hot neurons
    and the ``k`` units the router scores highest.

    ``w_in`` (n, writers, d) and ``b_in`` (n, writers) hold the writer rows in the stored
    neuron order, ``w_out`` (d_out, n) and ``b_out`` the reader; ``order[i]`` is the
    original index of stored neuron ``i``. Inference only: the weights are buffers.

    The ``state_dict`` holds the weights and :attr:`k` (as extra state), so loading one
    (``load_state_dict``, :func:`sparsekit.load`) restores the units run per token, and
    :attr:`norms`, which is not saved, is computed again from the loaded reader weights.
    A state saved before ``k`` was part of it still loads and keeps the layer's own ``k``;
    a state of another layout or with a k out of range is refused whole (``ValueError``).
    """

    # it reads its layers' weights itself: decompile copies it whole, compile and pruning
    # refuse it (sparsekit.engine.persist.runs_own_layers)
    sparsekit_runs_own_layers = True

    def __init__(self, w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor,
                 b_out: torch.Tensor | None, act: Callable[[torch.Tensor], torch.Tensor], *,
                 order: torch.Tensor, hot: int, unit_size: int, router: nn.Module | None,
                 k: int) -> None:
        super().__init__()
        _check_layout(w_in, b_in, w_out, b_out, order, hot, unit_size)
        # else accepted, and the first forward failed with a bare TypeError
        if not callable(act):
            raise ArgumentTypeError(f"act must be the FFN's activation, a callable such as "
                                    f"torch.relu, got {act!r}")
        if router is not None and not callable(router):
            raise ArgumentTypeError(f"router must be None or a callable scoring the units (a "
                                    f"Router or LowRankRouter), got {router!r}")
        # buffers hold values: weights given as a model's parameters kept their autograd
        # history (every forward reached back to them, and deepcopy failed)
        w_in, b_in, w_out, b_out = (None if t is None else t.detach()
                                    for t in (w_in, b_in, w_out, b_out))
        n, self.writers, self.in_features = w_in.shape
        self.out_features = w_out.shape[0]
        self.hot, self.unit_size = hot, unit_size
        self.units = (n - hot) // unit_size
        if hot + self.units * unit_size != n or (self.units and router is None):
            raise ValueError(f"{n} neurons do not split into hot={hot} and units of "
                             f"unit_size={unit_size} with a router")
        self.k = k
        self.act = act
        self.router = router
        self.register_buffer("order", order.clone())
        self.register_buffer("w_in", w_in[order].contiguous())
        self.register_buffer("b_in", None if b_in is None else b_in[order].contiguous())
        self.w_out = ActivationSparseLinear(w_out[:, order], b_out, 0.0)
        self.register_buffer("norms", self.reader_norms(), persistent=False)
        self.register_buffer("_within", torch.arange(unit_size), persistent=False)
        self.oracle = False
        # norms describe the reader's weights: computed again whenever a load replaces them
        self.register_load_state_dict_post_hook(_after_load)

    def reader_weight(self) -> torch.Tensor:
        """The reader's weight ``(out_features, n)`` in float32, as it computes (an int8
        reader's dequantized: its codes alone had been read as weights)."""
        stored, scales = self.w_out.to_dense(), self.w_out.scales
        return stored.float() if scales is None else dequantize_grid(stored, scales)

    def reader_norms(self) -> torch.Tensor:
        """The norms (n,) of the reader's columns, float32, from its current weights (an
        int8 reader's dequantized): what :attr:`norms` holds, weighting each neuron's value
        in :func:`unit_mass`."""
        return torch.linalg.vector_norm(self.reader_weight(), dim=0)

    def get_extra_state(self) -> torch.Tensor:
        """:attr:`k` in the ``state_dict`` (``<prefix>_extra_state``, an int64 scalar), so
        a saved layer comes back running as many units as it did."""
        return torch.tensor(self.k, dtype=torch.int64)

    def set_extra_state(self, state: object) -> None:
        """Set :attr:`k` from what :meth:`get_extra_state` saved (``ValueError`` unless it
        is one integer in ``[1, units]``)."""
        self.k = _saved_k(state)

    def _load_from_state_dict(  # type: ignore[no-untyped-def]
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
        error_msgs,
    ) -> None:
        """As ``nn.Module``'s, except that a state without :attr:`k` (saved before k was
        part of it) loads, keeping this layer's k, and that the whole state is checked
        first (:meth:`load_errors`): a ``ValueError`` naming the keys refuses it before
        anything of this layer or its children is copied."""
        errors = self.load_errors(state_dict, prefix, strict=strict)
        if errors:  # raised before torch copies anything of this layer or its children
            raise ValueError("; ".join(errors))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        key = prefix + _EXTRA_STATE
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)

    def load_errors(self, state: Mapping[str, object], prefix: str = "", *,
                    strict: bool = True) -> list[str]:
        """Why ``state`` (entries under ``prefix``) cannot be loaded into this layer or its
        children (empty: it can), each message naming the key.

        torch copies a state entry by entry and checks k only after the weights, so a
        state of another layout (more experts, a wrong k) used to overwrite some weights
        before failing; it is checked whole first: every entry present must be a tensor of
        its current shape (the layer's sizes are fixed at construction), the saved k an
        integer in ``[1, units]``, the reader's index valid and, with ``strict``, none of
        the layer's weights missing."""
        if not isinstance(state, Mapping):
            return [f"the state must be a mapping of names to tensors, got "
                    f"{type(state).__name__}"]
        errors = []
        for key, own in self.state_dict(prefix=prefix).items():
            if key == prefix + _EXTRA_STATE:
                continue
            if key not in state:
                if strict and not key.startswith(prefix + "w_out."):  # the reader says it
                    errors.append(f"{key} is missing from the state")
                continue
            value = state[key]
            if not isinstance(value, torch.Tensor):
                errors.append(f"{key} must be a tensor, got {type(value).__name__}")
            elif value.shape != own.shape:
                errors.append(f"{key} must have shape {tuple(own.shape)} (this layer's), got "
                              f"{tuple(value.shape)}")
            elif value.is_meta:  # torch copied the other entries, then failed on this one
                errors.append(f"{key} is on the meta device and holds no values")
        order = state.get(prefix + "order")
        if not errors and isinstance(order, torch.Tensor) and not _is_permutation(order):
            errors.append(f"{prefix}order must be a permutation of the "
                          f"{order.numel()} neurons, got {order.tolist()[:8]}...")
        if prefix + _EXTRA_STATE in state:
            try:
                self._check_k(_saved_k(state[prefix + _EXTRA_STATE]))
            except ValueError as e:
                errors.append(f"{prefix}{_EXTRA_STATE} (the saved k): {e}")
        if not errors:
            errors += self.w_out.load_errors(state, prefix + "w_out.")
        return errors

    def expected_state(self, state: dict[str, torch.Tensor],
                       prefix: str = "") -> dict[str, torch.Tensor] | None:
        """For :func:`sparsekit.load`: this layer's entries after loading ``state``; only
        a file without :attr:`k` (older than k being saved) changes them, by leaving k
        out, since such a file loads keeping this layer's k. ``None`` otherwise."""
        if prefix + _EXTRA_STATE in state:
            return None
        return {key: value for key, value in self.state_dict(prefix=prefix).items()
                if key != prefix + _EXTRA_STATE}

    @property
    def k(self) -> int:
        """Units run per token."""
        return self._k

    @property
    def oracle(self) -> bool:
        """Whether the units are chosen by their true :meth:`mass` instead of the router
        (:func:`set_oracle`)."""
        return self._oracle

    @oracle.setter
    def oracle(self, value: bool) -> None:
        # a flag read by its truth: "no" (or "False") set directly switched the oracle on
        check_bool("oracle", value)
        self._oracle = value

    @k.setter
    def k(self, value: int) -> None:
        self._check_k(value)
        self._k = value

    def _check_k(self, value: object) -> None:
        """Raise unless ``value`` is an int (not a bool) in ``[1, units]`` (0 without units)."""
        check_int("k", value)
        if not 0 <= value <= self.units or (self.units and value == 0):  # type: ignore[operator]
            raise ValueError(f"k must be in [1, {self.units}] (the routed units), got {value}")

    @property
    def kept(self) -> float:
        """Fraction of the FFN's neurons run per token."""
        return (self.hot + self.k * self.unit_size) / (self.hot + self.units * self.unit_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        rows = x.reshape(-1, self.in_features)
        h = self._one(rows[0]) if rows.shape[0] == 1 else self._many(rows)
        return self.w_out(h).view(*x.shape[:-1], self.out_features)

    def _check_input(self, x: object) -> None:
        """Raise unless ``x`` is a tensor ``(..., in_features)`` of the weights' dtype:
        torch's own errors for either (a matmul of other shapes or dtypes) name no
        argument."""
        check_features(x, self.in_features, "the layer's in_features")
        if x.dtype != self.w_in.dtype:
            raise ArgumentTypeError(f"x must be a {self.w_in.dtype} tensor (the layer's "
                                    f"dtype), got {x.dtype}")

    def chosen(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """The units chosen for rows ``x`` (T, d): a (T, k) index tensor; the router's
        choice, or with :attr:`oracle` set, the ``k`` of largest :meth:`mass` (read from
        the rows' neuron values ``h`` (T, n) where the caller has them already)."""
        if not self.oracle:
            scores = self.router(x)
            if scores.shape[-1] != self.units:  # else an IndexError, or a silent choice
                raise ValueError(f"router: it scores {scores.shape[-1]} units, but the layer "
                                 f"has {self.units}; accepted: a router of this layout")
        elif h is None:
            scores = self.mass(x)
        else:
            scores = unit_mass(h.float(), self.norms, self.hot, self.unit_size)
        return scores.topk(self.k, dim=-1).indices

    def neuron_mask(self, units: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(T, n)`` of ``dtype``: 1 for the hot neurons and those of the chosen ``units``
        (T, k) of each row, 0 elsewhere."""
        chosen = torch.zeros(units.shape[0], self.units, dtype=dtype, device=units.device)
        chosen.scatter_(1, units, 1.0)
        return F.pad(chosen.repeat_interleave(self.unit_size, dim=1), (self.hot, 0), value=1.0)

    def mass(self, x: torch.Tensor) -> torch.Tensor:
        """Each routed unit's activation mass for rows ``x`` (..., d): (..., units), the
        ground truth the router is trained to predict (:func:`unit_mass`)."""
        return unit_mass(self.hidden(x).float(), self.norms, self.hot, self.unit_size)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Every neuron's value (the reader's input, stored order) for rows ``x`` (T, d);
        ``x`` is checked as :meth:`forward` checks it (the matmul's error named nothing)."""
        self._check_input(x)
        return self._rows(x, 0, self.w_in.shape[0])

    def _rows(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Neuron values of the stored neurons ``lo:hi`` for rows ``x`` (..., d)."""
        z = F.linear(x, self.w_in[lo:hi].view(-1, self.in_features),
                     None if self.b_in is None else self.b_in[lo:hi].view(-1))
        return activate(self.act, z.view(*z.shape[:-1], hi - lo, self.writers))

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        """Neuron values for one row: zero except for the hot and chosen neurons."""
        h = x.new_zeros(self.w_in.shape[0])
        if self.hot:
            h[:self.hot] = self._rows(x, 0, self.hot)
        if not self.units:
            return h
        units = self.chosen(x)
        if self.k == self.units:
            h[self.hot:] = self._rows(x, self.hot, h.numel())
        else:  # the chosen units' writer rows, gathered into one product
            idx = (units[:, None] * self.unit_size + self._within).view(-1) + self.hot
            z = self.w_in.index_select(0, idx).view(-1, self.in_features).mv(x)
            if self.b_in is not None:
                z = z + self.b_in.index_select(0, idx).view(-1)
            h[idx] = activate(self.act, z.view(-1, self.writers))
        return h

    def _many(self, x: torch.Tensor) -> torch.Tensor:
        """Neuron values for rows ``x`` (T, d), zero where a row did not choose them."""
        h = self.hidden(x)
        if self.units and self.k < self.units:
            h *= self.neuron_mask(self.chosen(x, h), h.dtype)
        return h

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, neurons={self.w_in.shape[0]}, hot={self.hot}, "
                f"units={self.units}x{self.unit_size}, k={self.k}, kept={self.kept:.1%}")


_EXTRA_STATE = "_extra_state"  # nn.Module's state_dict key of get_extra_state()


def _saved_k(state: object) -> int:
    """The k that :meth:`RoutedFFN.get_extra_state` saved (``ValueError`` unless ``state``
    is an integer tensor of one element or an int); its range is checked by the setter."""
    if isinstance(state, torch.Tensor) and state.numel() == 1 and not (
            state.is_floating_point() or state.is_complex() or state.dtype == torch.bool):
        state = int(state.reshape(()))
    if type(state) is not int:
        raise ValueError(f"the saved k must be an integer tensor of one element, got "
                         f"{type(state).__name__} {tuple(getattr(state, 'shape', ()))}")
    return state


def _check_layout(w_in: object, b_in: object, w_out: object, b_out: object, order: object,
                  hot: object, unit_size: object) -> None:
    """Raise unless :class:`RoutedFFN`'s weights and layout agree: ``w_in`` (n, writers, d),
    ``b_in`` (n, writers) or None, ``w_out`` (d_out, n), ``b_out`` (d_out,) or None,
    ``order`` a permutation of the n neurons, ``0 ≤ hot ≤ n`` and ``unit_size ≥ 1``. An
    ``order`` of repeated or missing neurons built a layer that silently computed another
    FFN (fewer neurons, some twice), ``unit_size=0`` was a ``ZeroDivisionError`` and a
    reader of another width an ``IndexError``."""
    for name, value in (("w_in", w_in), ("w_out", w_out), ("order", order),
                        ("b_in", b_in), ("b_out", b_out)):
        if value is None and name in ("b_in", "b_out"):
            continue
        if not isinstance(value, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a tensor, got {type(value).__name__}")
        check_materialized(name, value)
    if w_in.dim() != 3:
        raise ValueError(f"w_in must be (neurons, writers, features), got {tuple(w_in.shape)}")
    # an integer weight failed at the first forward naming x, a b_in of another dtype
    # than w_in inside the product
    for name, value in (("w_in", w_in), ("w_out", w_out), ("b_in", b_in), ("b_out", b_out)):
        if value is not None and not value.is_floating_point():
            raise ArgumentTypeError(f"{name} must be floating-point, got {value.dtype}")
    if b_in is not None and b_in.dtype != w_in.dtype:
        raise ArgumentTypeError(f"b_in must be None or of w_in's dtype {w_in.dtype}, got "
                                f"{b_in.dtype}")
    n, writers, _ = w_in.shape
    if w_out.dim() != 2 or w_out.shape[1] != n:
        raise ValueError(f"w_out must be (out_features, {n}) (a column per neuron of w_in), "
                         f"got {tuple(w_out.shape)}")
    if b_in is not None and b_in.shape != (n, writers):
        raise ValueError(f"b_in must be None or ({n}, {writers}), got {tuple(b_in.shape)}")
    if b_out is not None and b_out.shape != (w_out.shape[0],):
        raise ValueError(f"b_out must be None or ({w_out.shape[0]},), got "
                         f"{tuple(b_out.shape)}")
    if order.shape != (n,) or not _is_permutation(order):
        raise ValueError(f"order must be a permutation of the {n} neurons (an int tensor of "
                         f"shape ({n},)), got {tuple(order.shape)} {order.tolist()[:8]}")
    check_int("hot", hot, minimum=0)
    if hot > n:
        raise ValueError(f"hot must be an int in [0, {n}] (w_in's neurons), got {hot}")
    check_int("unit_size", unit_size, minimum=1)


def _is_permutation(order: torch.Tensor) -> bool:
    """Whether ``order`` holds every index in ``[0, order.numel())`` once."""
    if order.is_floating_point() or order.is_complex() or order.dtype == torch.bool:
        return False
    return bool(torch.equal(order.reshape(-1).sort().values.long(),
                            torch.arange(order.numel(), device=order.device)))


def _after_load(layer: RoutedFFN, incompatible: object) -> None:
    """A load replaced the reader's weights: its :attr:`~RoutedFFN.norms` follow them."""
    with torch.no_grad():
        layer.norms = layer.reader_norms()


def unit_mass(h: torch.Tensor, norms: torch.Tensor, hot: int, unit_size: int) -> torch.Tensor:
    """The activation mass of each unit: ``sum_j |h_j| * norms_j`` over its neurons, for
    neuron values ``h`` (..., n) stored as ``[hot | unit 0 | unit 1 | ...]`` and the norms
    (n,) of the reader's columns; (..., units).

    MoEfication scores an expert by the sum of its neurons' positive (ReLU) activations;
    with GELU or a gated SiLU a neuron's value may be negative, so its magnitude counts,
    and each is weighted by the norm of the column it is read through: its share of the
    FFN output. ``unit_size`` must divide the ``n - hot`` neurons after the hot ones.
    """
    if not isinstance(h, torch.Tensor) or h.dim() == 0:
        got = "a 0-d tensor" if isinstance(h, torch.Tensor) else type(h).__name__
        raise ArgumentTypeError(f"h must be a tensor of shape (..., n), got {got}")
    n = h.shape[-1]
    if not isinstance(norms, torch.Tensor) or norms.shape != (n,):
        got = tuple(norms.shape) if isinstance(norms, torch.Tensor) else type(norms).__name__
        raise ValueError(f"norms must be a tensor of shape ({n},) (one per neuron of h), got "
                         f"{got}")
    for name, t in (("h", h), ("norms", norms)):
        if t.is_complex() or t.dtype == torch.bool:  # complex gave a complex "mass"
            raise ArgumentTypeError(f"{name} must be a real (floating-point or integer) "
                                    f"tensor, got {t.dtype}")
        check_materialized(name, t)  # a meta one failed in the product with a bare error
    check_int("hot", hot, minimum=0)
    if hot > n:
        raise ValueError(f"hot must be an int in [0, {n}] (h's neurons), got {hot}")
    check_int("unit_size", unit_size, minimum=1)
    if (n - hot) % unit_size:
        raise ValueError(f"unit_size must divide the {n - hot} neurons after the {hot} hot "
                         f"ones, got {unit_size}")
    contribution = (h[..., hot:] * norms[hot:]).abs()
    return contribution.unflatten(-1, (-1, unit_size)).sum(-1)


def set_oracle(model: nn.Module, oracle: bool = True) -> nn.Module:
    """Let every :class:`RoutedFFN` of ``model`` choose its units by their true
    :meth:`~RoutedFFN.mass` (MoEfication's ground-truth selection: computing every neuron
    first, an upper bound on what a router can reach) instead of by its router, or, with
    ``oracle=False``, by the router again. Returns ``model``."""
    check_bool("oracle", oracle)
    layers = routed_layers(model)
    for m in layers:
        m.oracle = oracle
    return model


def set_keep(model: nn.Module, keep: float) -> nn.Module:
    """Run about a ``keep`` fraction (in (0, 1]) of every :class:`RoutedFFN`'s neurons per
    token, hot neurons included: ``k = round((keep * n - hot) / unit_size)``, at least 1.
    Returns ``model``; ``ValueError`` when ``keep`` is below a layer's hot share."""
    check_fraction("keep", keep, zero=False, one=True)
    layers = routed_layers(model)
    ks = [_units_for(m, keep) for m in layers]
    for m, k in zip(layers, ks, strict=True):
        m.k = k
    return model


def _units_for(layer: RoutedFFN, keep: float) -> int:
    n = layer.hot + layer.units * layer.unit_size
    if keep * n < layer.hot:
        raise ValueError(f"keep={keep} is below the hot neurons' share {layer.hot / n:.3f}")
    # Python's round, as moefy and contextual count k (halves to even): 0.625 of 4 experts
    # was 2 there and 3 here
    return min(layer.units, max(1, round((keep * n - layer.hot) / layer.unit_size)))


def check_model(name: str, model: object) -> None:
    """Raise unless ``model`` (the argument ``name``) is an ``nn.Module`` whose parameters
    and buffers all hold values: a model on the meta device (built under
    ``init_empty_weights``, not loaded yet) failed deep inside its first forward or
    factorisation with an error naming no argument."""
    check_module(name, model)
    check_materialized_module(model, f"{name}: ")


def routed_layers(model: nn.Module) -> list[RoutedFFN]:
    """The :class:`RoutedFFN` modules of ``model``; ``ArgumentTypeError`` unless ``model``
    is an ``nn.Module`` (a bare ``AttributeError`` before), ``ValueError`` when it holds
    none."""
    check_module("model", model)
    layers = [m for m in model.modules() if isinstance(m, RoutedFFN)]
    if not layers:
        raise ValueError("model has no RoutedFFN modules (build them with moefy or contextual)")
    return layers
