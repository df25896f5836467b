"""The sparse autoencoder (and transcoder) module.

``SAE(d_in, n_latents, activation="topk", k=32)`` encodes ``x`` into ``n_latents`` codes of
which few are non-zero and decodes them back::

    pre  = (x - b_dec) @ W_enc + b_enc          # (b_dec subtracted only for autoencoders)
    z    = activation(pre)                       # see sparsekit.sae.activations
    x̂    = z @ W_dec + b_dec

Parameters carry SAELens's names and shapes (``W_enc`` ``(d_in, n_latents)``, ``W_dec``
``(n_latents, d_out)``), so the state dict is the file layout. A *transcoder* is the same
module with ``d_out`` set (or ``transcoder=True``): it reads one module's input and
reconstructs another's output, and does not centre its input on ``b_dec``.

The decoder reads only the rows of ``W_dec`` that a code uses. In training a TopK decode is
an ``embedding_bag`` over the ``k`` kept rows of every token (differentiable); at inference,
when the native kernels are built, any number of tokens decode through sparsekit's
sparse-input kernel ``spmm_rows`` (the codes as a CSR matrix of ``k`` entries per row times
``W_dec``), and one dense code row through the activation-sparse GEMV. Both were measured
faster than ``embedding_bag`` and the dense product at 1 to 512 tokens on the EPYC (AVX-512
and AVX2 paths; ``benchmarks/sae.py`` prints the table). :meth:`SAE.decode` falls back to
the dense product when codes are not sparse (an L1 SAE early in training).

Training state lives here too, because every objective needs it: the decoder-norm
constraint (:meth:`SAE.normalize_decoder_`, :meth:`SAE.project_decoder_grad_`), the count of
tokens since each latent last fired (:meth:`SAE.dead_latents`), BatchTopK's inference
threshold and JumpReLU's learned one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsekit._checks import (
    MAX_SEED,
    ArgumentTypeError,
    check_bool,
    check_device,
    check_finite,
    check_fits_memory,
    check_int,
    check_materialized,
    check_positive,
    check_recordable,
    check_writable,
    seeded,
)
from sparsekit.engine import kernels
from sparsekit.sae.activations import ACTIVATIONS, select_topk

__all__ = ["SAE"]

SPARSE_DECODE_DENSITY = 0.125  # codes denser than this decode with the dense product
THRESHOLD_EMA = 0.01  # BatchTopK: weight of each batch's smallest kept activation


class SAE(nn.Module):
    """A sparse autoencoder, or with ``d_out`` a transcoder.

    Args:
        d_in: width of the activations encoded.
        n_latents: dictionary size.
        activation: a name in :data:`~sparsekit.sae.activations.ACTIVATIONS`
            (``"topk"``, ``"batchtopk"``, ``"abstopk"``, ``"jumprelu"``, ``"l1"``).
        k: latents kept per token (TopK, AbsTopK) or on average (BatchTopK); ignored by
            the others.
        d_out: width reconstructed (default ``d_in``); setting it makes a transcoder.
        transcoder: a transcoder even when ``d_out == d_in`` (the target is another
            module's output, so the input is not centred on ``b_dec``).
        matryoshka: increasing prefix sizes ending at ``n_latents``: training also
            reconstructs from every prefix of the dictionary alone, so the first latents
            learn the coarse features (Bussmann et al. 2025; Nabeshima 2024).
        normalize_decoder: keep every row of ``W_dec`` at unit norm (training projects the
            parallel part out of its gradient and renormalises after every step).
        init_norm: the norm of every row of ``W_dec`` at initialisation. An unconstrained
            decoder (``normalize_decoder=False``) learns better from small rows: 0.1 is
            Anthropic's heuristic (Conerly et al. 2024) and SAELens's default; with
            ``normalize_decoder`` training starts from unit rows whatever this is.
        threshold: JumpReLU's initial threshold (learned as its log).
        bandwidth: JumpReLU's straight-through kernel width.
        seed: seed of the initial weights, an int in ``[-2**63, 2**63 - 1]`` (random
            rows of ``W_dec`` of norm ``init_norm``, ``W_enc = W_decᵀ`` for an
            autoencoder).
        dtype: a floating-point dtype of the parameters (default: PyTorch's default).
        device: where the parameters live (default: PyTorch's default).
    """

    def __init__(
        self,
        d_in: int,
        n_latents: int,
        activation: str = "topk",
        *,
        k: int = 32,
        d_out: int | None = None,
        transcoder: bool = False,
        matryoshka: Sequence[int] | None = None,
        normalize_decoder: bool = True,
        init_norm: float = 1.0,
        threshold: float = 1e-3,
        bandwidth: float = 1e-3,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_int("d_in", d_in, minimum=1)
        check_int("n_latents", n_latents, minimum=1)
        ACTIVATIONS.get(activation)  # the registry's error lists the accepted names
        uses_k = ACTIVATIONS.meta(activation)["uses_k"]
        if uses_k:
            check_int("k", k, minimum=1)
            if k > n_latents:
                raise ValueError(f"k must be an int in [1, n_latents={n_latents}], got {k!r}")
        d_out = d_in if d_out is None else d_out
        check_int("d_out", d_out, minimum=1)
        prefixes = self._check_matryoshka(matryoshka, n_latents)
        for name, value in (("threshold", threshold), ("bandwidth", bandwidth),
                            ("init_norm", init_norm)):
            check_positive(name, value)
        for name, flag in (("transcoder", transcoder), ("normalize_decoder", normalize_decoder)):
            check_bool(name, flag)
        self._check_seed(seed)
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ArgumentTypeError(f"dtype must be a floating-point torch.dtype or None, got "
                                    f"{dtype!r}")
        check_device(device)
        if activation == "jumprelu":
            self._check_threshold(threshold, dtype or torch.get_default_dtype())
        self._check_size(int(d_in), int(n_latents), int(d_out), activation,
                         dtype or torch.get_default_dtype())

        # plain ints (a numpy int passes check_int, then failed json.dumps in save, which
        # blamed the metadata, and manual_seed)
        d_in, n_latents, d_out, seed = int(d_in), int(n_latents), int(d_out), int(seed)
        self.d_in, self.n_latents, self.d_out = d_in, n_latents, d_out
        self.activation = activation
        self._k = int(k) if uses_k else None
        self.transcoder = transcoder or d_out != d_in
        self.matryoshka = prefixes
        self.normalize_decoder = normalize_decoder
        self.bandwidth = float(bandwidth)
        factory = {"dtype": dtype, "device": device}
        generator = seeded(seed)
        w_dec = torch.randn(n_latents, d_out, generator=generator).to(**factory)
        w_dec *= init_norm / w_dec.norm(dim=-1, keepdim=True)
        if not w_dec.is_meta and not bool((w_dec.norm(dim=-1) > 0).all()
                                          & torch.isfinite(w_dec).all()):
            # rows of inf (NaN codes) or of zeros (latents that never fire, and that
            # normalize_decoder_ cannot rescale) trained nothing, silently
            raise ValueError(f"init_norm must give finite, non-zero rows of W_dec in "
                             f"{w_dec.dtype}, got {init_norm!r}")
        self.W_dec = nn.Parameter(w_dec)
        w_enc = w_dec.t().clone() if d_out == d_in else \
            torch.randn(d_in, n_latents, generator=generator).to(**factory) / math.sqrt(d_in)
        self.W_enc = nn.Parameter(w_enc.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(n_latents, **factory))
        self.b_dec = nn.Parameter(torch.zeros(d_out, **factory))
        if activation == "jumprelu":
            self.log_threshold = nn.Parameter(
                torch.full((n_latents,), math.log(threshold), **factory))
        if activation == "batchtopk":
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float64,
                                                          device=device))
            # how far the running threshold has run: in the state dict, so that a resume
            # from it weighs the next batch as the run would have (a plain attribute, it
            # restarted at 0, and the next batch's smallest value replaced the threshold)
            self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.int64,
                                                                  device=device))
        self.register_buffer("tokens_since_fired",
                             torch.zeros(n_latents, dtype=torch.int64, device=device))

    @staticmethod
    def _check_seed(seed: Any) -> None:
        """Raise unless ``seed`` is an int in ``[-2**63, 2**63 - 1]``: a larger one was a
        raw ``OverflowError`` from ``manual_seed``. :func:`~sparsekit._checks.check_seed`'s
        range, widened to the negative seeds the SAE has always taken."""
        check_int("seed", seed)
        if not -MAX_SEED - 1 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an int in [-2**63, 2**63 - 1], got {seed!r}")

    @staticmethod
    def _check_size(d_in: int, n_latents: int, d_out: int, activation: str,
                    dtype: torch.dtype) -> None:
        """Raise ``ValueError`` naming the widths unless the parameters they make fit in
        this machine's memory: a huge ``n_latents`` (or ``d_in``) failed inside the
        allocator with a raw ``RuntimeError`` naming no argument."""
        per_latent = d_in + d_out + 1 + (activation == "jumprelu")  # W_enc, W_dec, b_enc
        check_fits_memory((n_latents * per_latent + d_out) * dtype.itemsize + n_latents * 8,
                          f"n_latents={n_latents} with d_in={d_in} and d_out={d_out} makes "
                          f"parameters in {dtype} of",  # + the firing counts (int64)
                          "accepted: widths whose parameters fit in memory")

    @staticmethod
    def _check_threshold(threshold: float, dtype: torch.dtype) -> None:
        """Raise unless JumpReLU's ``threshold`` (stored as its log) is positive and finite
        in ``dtype``: one past the dtype's range was an inf threshold that zeroed every code
        for good (no gradient reaches it), one below it a zero threshold, a plain ReLU."""
        if not 0 < float(torch.tensor(math.log(threshold), dtype=dtype).exp()) < math.inf:
            raise ValueError(f"threshold must be positive and finite in {dtype} (JumpReLU's "
                             f"learned threshold), got {threshold!r}")

    @staticmethod
    def _check_matryoshka(matryoshka: Sequence[int] | None, n_latents: int) -> tuple[int, ...]:
        if matryoshka is None:
            return ()
        if not isinstance(matryoshka, Sequence) or isinstance(matryoshka, str):
            raise ArgumentTypeError(
                f"matryoshka must be a sequence of increasing positive prefix sizes ending at "
                f"n_latents={n_latents}, or None, got {matryoshka!r}")
        prefixes = tuple(matryoshka)
        integral = all(isinstance(m, numbers.Integral) and not isinstance(m, bool)
                       for m in prefixes)
        prefixes = tuple(int(m) for m in prefixes) if integral else prefixes  # numpy ints too
        ok = prefixes and integral \
            and all(0 < a < b for a, b in zip(prefixes, prefixes[1:], strict=False)) \
            and prefixes[0] > 0 and prefixes[-1] == n_latents
        if not ok:
            raise ValueError(
                f"matryoshka must be increasing positive prefix sizes ending at "
                f"n_latents={n_latents}, got {matryoshka!r}")
        return prefixes

    # -- encode -----------------------------------------------------------------------

    def _check_width(self, x: torch.Tensor, width: int, param: str = "x") -> None:
        """Raise unless ``x`` is a tensor ``(..., width)`` holding values (a meta tensor
        failed inside the matmul, or at ``.item()``, with an error naming no argument)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{param} must be a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != width:
            raise ValueError(
                f"{param} must have shape (..., {width}), got shape {tuple(x.shape)}")
        check_materialized(param, x)

    @staticmethod
    def _check_real(x: torch.Tensor, param: str = "x") -> None:
        """Raise unless ``x`` is of a real dtype: the cast to the weights' dtype would drop
        a complex tensor's imaginary part silently, and a bool one holds no values."""
        if x.is_complex() or x.dtype == torch.bool:
            raise ArgumentTypeError(f"{param} must be a real (floating-point or integer) "
                                    f"tensor, got {x.dtype}")

    def _check_autograd(self) -> None:
        """:func:`~sparsekit._checks.check_recordable` of this SAE's parameters."""
        check_recordable(self, "sae.", "SAE")

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_dec) @ W_enc + b_enc`` (an autoencoder centres on ``b_dec``); ``x`` of
        a real dtype (the cast to the weights' dtype would drop a complex input's imaginary
        part, and a bool input means no activations), finite after that cast: a NaN or inf
        input made NaN codes that passed on silently (and, in training mode, counted as
        firing); so did finite inputs whose pre-activations overflow the SAE's dtype (a
        float16 SAE), refused too. Every encode, and so :meth:`forward`, checks its input here."""
        self._check_width(x, self.d_in)
        self._check_real(x)
        self._check_autograd()
        x = check_finite("x", x, dtype=self.W_enc.dtype)
        pre = self._pre_activations(x)
        # finite inputs may still overflow the product (float16 tops out at 65504): inf
        # codes, and NaN ones after TopK, passed on silently
        check_finite("x's pre-activations (x - b_dec) @ W_enc + b_enc", pre,
                     hint=f"the inputs are too large for the SAE's {self.W_enc.dtype} (scale "
                          f"them down), or its weights are not finite")
        return pre

    def _pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`pre_activations` of inputs already checked and cast (the training
        objective's: :func:`~sparsekit.sae.train` checks every batch as it reads it)."""
        if not self.transcoder:
            x = x - self.b_dec
        return torch.addmm(self.b_enc, x.reshape(-1, self.d_in), self.W_enc) \
            .view(*x.shape[:-1], self.n_latents)

    @property
    def k(self) -> int | None:
        """Latents kept per token (per token on average for BatchTopK); None for an
        activation without one."""
        return self._k

    @k.setter
    def k(self, value: int | None) -> None:
        # checked on every set: a k of 0 gave all-zero codes silently, one past n_latents
        # or a float failed inside topk with a raw error naming no argument
        if not ACTIVATIONS.meta(self.activation)["uses_k"]:
            if value is not None:
                raise ValueError(f"k must be None for activation={self.activation!r} (it "
                                 f"keeps no fixed count), got {value!r}")
            return
        check_int("k", value, minimum=1)
        if value > self.n_latents:  # type: ignore[operator]
            raise ValueError(f"k must be an int in [1, n_latents={self.n_latents}], got "
                             f"{value!r}")
        self._k = int(value)  # type: ignore[arg-type]

    @property
    def jump_threshold(self) -> torch.Tensor | None:
        """The threshold below which a latent is zero at inference (JumpReLU: learned;
        BatchTopK: the running minimum kept activation), or None (the TopK family, L1)."""
        if self.activation == "jumprelu":
            # a log threshold of +inf (a latent that never fires, as load takes it) has the
            # gradient exp(inf) × 0 = NaN, which clipping spread to every weight: none
            never = self.log_threshold == math.inf
            return torch.where(never, math.inf, self.log_threshold.masked_fill(never, 0).exp())
        if self.activation == "batchtopk" and not self.training:
            return self.threshold.to(self.W_enc.dtype)
        return None

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Codes from pre-activations (the registered activation, dense result)."""
        return ACTIVATIONS.get(self.activation)(
            pre, k=self.k, threshold=self.jump_threshold, bandwidth=self.bandwidth)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Codes ``(..., n_latents)`` of ``x`` ``(..., d_in)``; most entries are zero."""
        return self.activate(self.pre_activations(x))

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)``, each ``(..., width)``: every row's non-zero codes and the
        latents they belong to (padded with zero values where a row has fewer). TopK and
        AbsTopK select them directly, without a dense code tensor."""
        pre = self.pre_activations(x)
        if self.activation in ("topk", "abstopk"):
            return select_topk(pre, self.k, signed=self.activation == "abstopk")
        return _nonzeros(self.activate(pre))

    # -- decode -----------------------------------------------------------------------

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z @ W_dec + b_dec``, reading only the ``W_dec`` rows of non-zero codes when
        they are sparse (a dense product otherwise); ``z`` of a real dtype, as
        :meth:`pre_activations` takes ``x``, and finite in the SAE's dtype (a NaN code, or a
        float64 one past float32, decoded to NaN); a reconstruction that overflows that dtype
        is refused too."""
        self._check_width(z, self.n_latents, "z")
        self._check_real(z, "z")
        self._check_autograd()
        check_finite("z", z, dtype=self.W_dec.dtype)
        return self._check_reconstruction(self._decode(z), "z")

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` of codes not checked for finite values: the training objective's,
        whose loss :func:`~sparsekit.sae.train` checks at every step, naming the step."""
        rows = z.reshape(-1, self.n_latents)
        if rows.shape[0] == 1 and not torch.is_grad_enabled() and self._gemv_ready(rows):
            y = torch.ops.sparsekit.act_gemv(
                self.W_dec, rows[0].contiguous(), self._zeros, self.b_dec,
                kernels.num_threads(), None)
            return y.view(*z.shape[:-1], self.d_out)
        width = int((rows != 0).sum(-1).max()) if rows.numel() else 0
        if width > SPARSE_DECODE_DENSITY * self.n_latents:
            return torch.addmm(self.b_dec, rows.to(self.W_dec.dtype), self.W_dec) \
                .view(*z.shape[:-1], self.d_out)
        return self._decode_sparse(*_nonzeros(z, width))

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``Σ_j values[..., j] · W_dec[indices[..., j]] + b_dec``: reads ``values.shape[-1]``
        rows of ``W_dec`` per token — at inference (no gradient, float32 on CPU, kernels
        built) through the native ``spmm_rows`` kernel, the fastest measured from 1 to 512
        tokens (``benchmarks/sae.py``), otherwise an ``embedding_bag``, differentiable in
        ``values`` and ``W_dec``. ``values`` must be finite, as :meth:`decode`'s codes."""
        self._check_codes(values, indices)
        self._check_autograd()
        check_finite("values", values, dtype=self.W_dec.dtype)
        return self._check_reconstruction(self._decode_sparse(values, indices), "values")

    def _check_reconstruction(self, y: torch.Tensor, param: str) -> torch.Tensor:
        """``y``, the reconstruction from the codes ``param``, once it is finite: finite
        codes may still overflow the product (a float16 SAE), which passed on silently."""
        check_finite(f"the reconstruction from {param}", y,
                     hint=f"the codes are too large for the SAE's {self.W_dec.dtype} (scale "
                          f"them down), or its weights are not finite")
        return y

    def _decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """:meth:`decode_sparse` of codes not checked (the training objective's: see
        :meth:`_decode`)."""
        if values.shape[-1] == 0:  # no codes: every row decodes to the bias alone
            rows = math.prod(values.shape[:-1])
            return self.b_dec.expand(rows, self.d_out).clone().view(
                *values.shape[:-1], self.d_out)
        flat_i = indices.reshape(-1, indices.shape[-1])
        if flat_i.dtype not in (torch.int32, torch.int64):  # embedding_bag takes no other
            flat_i = flat_i.long()
        flat_v = values.reshape(-1, values.shape[-1]).to(self.W_dec.dtype)
        if not torch.is_grad_enabled() and self._gemv_ready(flat_v):
            y = self._spmm_decode(flat_v, flat_i)
        else:
            y = F.embedding_bag(flat_i, self.W_dec, per_sample_weights=flat_v, mode="sum")
            y = y + self.b_dec
        return y.view(*values.shape[:-1], self.d_out)

    def _spmm_decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``values`` ``(n, width)`` at latents ``indices`` decoded by the native
        sparse-input kernel: row ``t`` reads the ``width`` rows of ``W_dec`` it names."""
        n, width = values.shape
        rowptr = torch.arange(0, n * width + 1, width, dtype=torch.int32) if width else \
            torch.zeros(n + 1, dtype=torch.int32)
        y = torch.ops.sparsekit.spmm_rows(
            rowptr, indices.reshape(-1).to(torch.int32), values.reshape(-1).contiguous(), None,
            self.W_dec.detach(), None, self.n_latents, kernels.num_threads())
        return y.add_(self.b_dec)

    def _check_codes(self, values: Any, indices: Any) -> None:
        """Raise unless ``values`` and ``indices`` are tensors of one shape ``(..., width)``,
        ``indices`` integers in ``[0, n_latents)``: the native kernel trusts its indices,
        ``embedding_bag`` raises a bare error and a float index would be truncated;
        ``values`` real (see :meth:`_check_real`), neither on the meta device."""
        for name, tensor in (("values", values), ("indices", indices)):
            if not isinstance(tensor, torch.Tensor):
                raise ArgumentTypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
            check_materialized(name, tensor)
        self._check_real(values, "values")
        if values.shape != indices.shape or values.dim() == 0:
            raise ValueError(
                f"values and indices must have one shape (..., width), got "
                f"{tuple(values.shape)} and {tuple(indices.shape)}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise ArgumentTypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if indices.numel():
            low, high = torch.aminmax(indices)
            if int(low) < 0 or int(high) >= self.n_latents:
                raise ValueError(f"indices must lie in [0, n_latents={self.n_latents}), got "
                                 f"values from {int(low)} to {int(high)}")

    def _gemv_ready(self, rows: torch.Tensor) -> bool:
        return (rows.dtype == self.W_dec.dtype == torch.float32 and rows.is_cpu
                and self.W_dec.is_contiguous() and kernels.available())

    @property
    def _zeros(self) -> torch.Tensor:
        return self.W_dec.new_zeros(self.n_latents)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of ``x`` (for a transcoder: the prediction of its target)."""
        values, indices = self.encode_sparse(x)
        if self.training:
            self.record_firing(values, indices)
        return self.decode_sparse(values, indices)

    # -- training state ---------------------------------------------------------------

    @torch.no_grad()
    def record_firing(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        """Count the tokens since each latent last fired (for :meth:`dead_latents`) and,
        for BatchTopK, move the inference threshold towards the smallest kept value. Both
        change in place: an SAE built in inference mode is refused here (a training-mode
        :meth:`forward` of one failed with PyTorch's raw error)."""
        self._check_codes(values, indices)
        for name, tensor in self.named_buffers():
            check_writable(f"sae.{name}", tensor)
        kept = values != 0
        smallest = values[kept].abs().min().to(self.threshold.dtype) \
            if self.activation == "batchtopk" and kept.any() else None
        if smallest is not None and not bool(torch.isfinite(smallest)):
            # checked before anything is counted: the threshold would keep the NaN for good
            raise ValueError(f"values must be finite where kept: BatchTopK's inference "
                             f"threshold moves towards the smallest kept value, got "
                             f"{float(smallest)}")
        fired = torch.zeros(self.n_latents, dtype=torch.bool, device=indices.device)
        fired[indices[kept]] = True
        self.tokens_since_fired += values[..., 0].numel()
        self.tokens_since_fired[fired] = 0
        if smallest is not None:
            # a running mean over the first 1/THRESHOLD_EMA batches, an average over the
            # recent ones after: early batches (random weights) must not linger
            self.threshold_updates += 1
            weight = max(THRESHOLD_EMA, 1 / int(self.threshold_updates))
            self.threshold.mul_(1 - weight).add_(weight * smallest)

    def _non_finite_weights(self) -> list[str]:
        """The names of the parameters holding a NaN or inf (a diverged training), except
        the +inf or -inf of a JumpReLU ``log_threshold``: a latent that never or always
        fires, which :func:`~sparsekit.sae.load` takes too."""
        with torch.no_grad():
            return [name for name, p in self.named_parameters()
                    if not bool((~p.isnan() if name == "log_threshold" else p.isfinite()).all())]

    def _check_weights(self) -> None:
        """Raise ``ValueError`` naming ``sae`` and the first of :meth:`_non_finite_weights`:
        every code, score and training step of such an SAE is NaN, silently."""
        bad = self._non_finite_weights()
        if bad:
            tensor = getattr(self, bad[0]).detach()
            if bad[0] == "log_threshold":  # its ±inf are taken: count the NaN only
                tensor = tensor.masked_fill(tensor.isinf(), 0)
            check_finite(f"sae.{bad[0]}", tensor, hint="the SAE's weights diverged or were "
                                                      "set so; train or load it again")

    def dead_latents(self, window: int) -> torch.Tensor:
        """Boolean ``(n_latents,)``: latents that fired on none of the last ``window``
        training tokens."""
        check_int("window", window, minimum=1)
        return self.tokens_since_fired >= window

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale every row of ``W_dec`` to unit norm (in place: ``W_dec`` must not be an
        inference tensor)."""
        check_writable("sae.W_dec", self.W_dec)
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove from ``W_dec.grad`` its component along each (unit) row, so a step moves
        rows along the sphere rather than changing their norms."""
        grad = self.W_dec.grad
        if grad is not None:
            grad -= (grad * self.W_dec).sum(-1, keepdim=True) * self.W_dec

    def extra_repr(self) -> str:
        kind = "transcoder" if self.transcoder else "autoencoder"
        k = f", k={self.k}" if self.k is not None else ""
        nest = f", matryoshka={list(self.matryoshka)}" if self.matryoshka else ""
        return (f"{kind}, d_in={self.d_in}, n_latents={self.n_latents}, d_out={self.d_out}, "
                f"activation={self.activation!r}{k}{nest}")


def _nonzeros(z: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's ``width`` largest-magnitude codes and their latents (by default the
    largest non-zero count of any row: no non-zero code is dropped)."""
    if width is None:
        width = int((z != 0).sum(-1).max()) if z.numel() else 0
    indices = z.abs().topk(max(width, 1), dim=-1, sorted=False).indices
    return z.gather(-1, indices), indices
