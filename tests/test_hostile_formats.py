"""Hostile states and arguments to the compressed weight formats.

A format's ``load_state_dict`` is refused whole or done whole: torch copies the entries one
by one and the kernels trust the buffers, so a state whose entries do not all fit (another
number of nonzeros, float values into int8 codes, a tampered index) must leave every buffer
as it was, and the product as before.
"""

from __future__ import annotations

import pytest
import torch
from _kernels import needs_kernels
from _state import snapshot, unchanged

from sparsekit.engine.formats import FORMATS, Format, format_from_state

OUT, IN = 8, 64
NATIVE = ("csr16", "bitmap", "nm", "bsr", "fanin", "dense_lowp")
INT8 = ("csr16", "bitmap", "nm", "dense_lowp")


def _weight(name: str, seed: int, density: float) -> torch.Tensor:
    """A random ``(OUT, IN)`` weight the format ``name`` holds, about ``density`` kept."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(OUT, IN, generator=g)
    if name == "nm":  # 1:4 or 2:4 by density
        return w * (torch.arange(IN) % 4 < (2 if density > 0.4 else 1))
    if name == "bsr":  # whole 4x16 blocks
        keep = torch.rand(OUT // 4, IN // 16, generator=g) < density
        return w * keep.repeat_interleave(4, 0).repeat_interleave(16, 1)
    if name == "fanin":  # the same number of inputs per row
        k = int(IN * density)
        keep = torch.zeros(OUT, IN, dtype=torch.bool)
        keep.scatter_(1, torch.rand(OUT, IN, generator=g).argsort(1)[:, :k], True)
        return w * keep
    return w * (torch.rand(OUT, IN, generator=g) < density)


def _format(name: str, seed: int = 0, density: float = 0.2, **kwargs: object) -> Format:
    options = {"block": (4, 16)} if name == "bsr" else {}
    if name == "dense_lowp" and "value_dtype" not in kwargs:
        kwargs["value_dtype"] = torch.bfloat16
    return FORMATS[name].from_dense(_weight(name, seed, density), **options, **kwargs)


def _param(name: str):  # type: ignore[no-untyped-def]
    return pytest.param(name, marks=[needs_kernels] if name in NATIVE else [], id=name)


def _assert_refused(fmt: Format, state: dict[str, object], match: str, strict: bool = True,
                    ) -> None:
    """``fmt.load_state_dict(state)`` raises naming ``match`` and changes nothing."""
    before, x = snapshot(fmt), torch.randn(3, fmt.in_features)
    y = fmt.matmul(x)
    with pytest.raises(RuntimeError, match=match):
        fmt.load_state_dict(state, strict=strict)
    assert unchanged(fmt, before)
    torch.testing.assert_close(fmt.matmul(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("name", [_param(n) for n in ("torch_csr", *NATIVE[:-1])])
@pytest.mark.parametrize("strict", [True, False])
def test_load_state_of_other_nnz_copies_nothing(name: str, strict: bool) -> None:
    """Another number of nonzeros: refused before any buffer is copied (torch_csr's row
    pointers, copied before the values' size mismatch, made its product segfault)."""
    fmt, other = _format(name), _format(name, seed=1, density=0.6)
    assert fmt.nnz != other.nnz
    _assert_refused(fmt, other.state_dict(), match=f"{name}: .* of shape", strict=strict)


@pytest.mark.parametrize("name", [_param(n) for n in INT8])
@pytest.mark.parametrize("strict", [True, False])
def test_load_float_state_into_int8_format_is_refused(name: str, strict: bool) -> None:
    """Float values are not cast into int8 codes (kept with the old scales), with or
    without ``strict``."""
    q = _format(name, value_dtype=torch.int8)
    values = q.values_name or q.buffer_names[0]
    _assert_refused(q, _format(name).state_dict(), match=f"{values} must be torch.int8",
                    strict=strict)


@pytest.mark.parametrize("name", [_param(n) for n in INT8])
def test_load_int8_state_into_float_format_is_refused(name: str) -> None:
    """int8 codes are not kept as floats, and their ``scales`` are named."""
    fmt = _format(name)
    state = _format(name, value_dtype=torch.int8).state_dict()
    _assert_refused(fmt, state, match="scales is not a buffer", strict=False)


@pytest.mark.parametrize("name", [_param(n) for n in ("bitmap", "nm", "dense_lowp")])
def test_load_w8a8_state_into_weight_only_int8_format_is_refused(name: str) -> None:
    """The W8A8 mark is part of the format: not dropped by ``strict=False``."""
    fmt = _format(name, value_dtype=torch.int8)
    state = _format(name, value_dtype=torch.int8, activation_dtype=torch.int8).state_dict()
    _assert_refused(fmt, state, match="int8_inputs is not a buffer", strict=False)


@pytest.mark.parametrize("name", [_param(n) for n in ("dense", "torch_csr", *NATIVE)])
def test_load_state_with_non_tensor_entry_copies_nothing(name: str) -> None:
    """An entry that is no tensor is named; the others are not copied."""
    fmt = _format(name)
    state = _format(name, seed=1).state_dict()
    key = list(state)[-1]
    _assert_refused(fmt, state | {key: state[key].tolist()}, match=f"{key} must be a tensor")


def _negated(fmt: Format) -> dict[str, torch.Tensor]:
    """``fmt``'s state with its floating values negated: the same layout, other weights."""
    return {k: -v if v.is_floating_point() else v for k, v in fmt.state_dict().items()}


@pytest.mark.parametrize("name", [_param(n) for n in ("dense", "torch_csr", *NATIVE)])
def test_load_state_missing_an_entry_copies_nothing(name: str) -> None:
    """A partial state is reported missing and loads nothing, even with ``strict=False``."""
    fmt = _format(name)
    before, state = snapshot(fmt), _negated(fmt)
    key = next(iter(state))
    del state[key]
    assert fmt.load_state_dict(state, strict=False).missing_keys == [key]
    assert unchanged(fmt, before)


@needs_kernels
def test_load_state_with_0d_nm_pattern_is_collected() -> None:
    """A 0-d ``nm_pattern`` is an error of the load, not a bare ``TypeError``, and of
    :func:`format_from_state` a ``ValueError``."""
    fmt = _format("nm")
    state = fmt.state_dict() | {"nm_pattern": torch.tensor(4, dtype=torch.int32)}
    _assert_refused(fmt, state, match="nm_pattern must be torch.int32 of shape")
    with pytest.raises(ValueError, match="nm_pattern must be int32"):
        format_from_state(state, (OUT, IN))


@pytest.mark.parametrize("name", [_param(n) for n in ("dense", "torch_csr", *NATIVE)])
def test_load_of_valid_state_still_loads(name: str) -> None:
    """A state of the same layout is copied whole."""
    fmt = _format(name)
    x = torch.randn(3, IN)
    y = fmt.matmul(x)
    fmt.load_state_dict(_negated(fmt))
    torch.testing.assert_close(fmt.matmul(x), -y)


@pytest.mark.parametrize(("name", "dtype"), [
    ("dense", torch.int32), ("torch_csr", torch.int32), ("torch_csr", torch.float16),
    ("torch_csr", torch.bfloat16),
])
def test_from_dense_refuses_a_weight_dtype_it_cannot_multiply(name: str, dtype: torch.dtype,
                                                              ) -> None:
    """A weight the product could not multiply is refused when it is compressed."""
    with pytest.raises(TypeError, match=f"needs a weight of .*got {dtype}"):
        FORMATS[name].from_dense(torch.ones(OUT, IN, dtype=dtype))


@pytest.mark.parametrize("shape", [(8.0, 16.0), (8, 16, 1), "8x16", (-8, 16), (True, 16)])
def test_format_from_state_checks_the_shape(shape: object) -> None:
    """A shape of other than two ints ≥ 0 is named, not unpacked or passed to a kernel."""
    state = FORMATS["torch_csr"].from_dense(_weight("torch_csr", 0, 0.2)).state_dict()
    with pytest.raises(ValueError, match="shape"):
        format_from_state(state, shape)  # type: ignore[arg-type]


@needs_kernels
def test_format_from_state_checks_entries_are_tensors() -> None:
    state = {k: v.tolist() for k, v in _format("csr16").state_dict().items()}
    with pytest.raises(TypeError, match="'rowptr' must be a tensor, got list"):
        format_from_state(state, (OUT, IN))


@needs_kernels
@pytest.mark.parametrize("threads", [0, 65537, 10**6])
def test_native_from_dense_checks_threads(threads: int) -> None:
    """More threads than the kernels take are refused when the format is built."""
    with pytest.raises(ValueError, match=f"threads must be an int .*got {threads}"):
        _format("nm", threads=threads)


@pytest.mark.parametrize("name", [_param(n) for n in ("dense", "torch_csr", *NATIVE)])
@pytest.mark.parametrize("shape", [(0, IN), (OUT, 0), (0, 0), (0, 10)])
def test_degenerate_shapes_give_empty_products(name: str, shape: tuple[int, int]) -> None:
    """An empty weight compresses, multiplies to zeros (plus the bias) and round-trips."""
    kwargs = {"value_dtype": torch.bfloat16} if name == "dense_lowp" else {}
    fmt = FORMATS[name].from_dense(torch.zeros(shape), **kwargs)
    x, bias = torch.randn(3, shape[1]), torch.randn(shape[0])
    assert torch.equal(fmt.matmul(x), torch.zeros(3, shape[0]))
    torch.testing.assert_close(fmt.matmul(x, bias), bias.expand(3, -1))
    assert torch.equal(format_from_state(fmt.state_dict(), shape).to_dense(), fmt.to_dense())


@pytest.mark.parametrize("name", [_param(n) for n in ("dense", "torch_csr", *NATIVE)])
@pytest.mark.parametrize("mask", [
    torch.full((OUT, IN), 0.3), torch.ones(OUT, IN, dtype=torch.int64), [[True] * IN] * OUT,
], ids=["float", "int", "list"])
def test_from_dense_takes_only_bool_masks(name: str, mask: object) -> None:
    """A float mask of 0.3 kept every weight; a list raised AttributeError."""
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        FORMATS[name].from_dense(_weight(name, 0, 0.2), mask)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [_param(n) for n in ("dense", "torch_csr", *NATIVE)])
def test_from_dense_refuses_a_list_weight(name: str) -> None:
    with pytest.raises(TypeError, match="weight must be a 2-D tensor .*got list"):
        FORMATS[name].from_dense([[1.0] * IN] * OUT)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [_param(n) for n in NATIVE])
@pytest.mark.parametrize("bias", [torch.randn(OUT + 1), torch.randn(2, OUT)], ids=["long", "2d"])
def test_native_matmul_names_a_bias_of_the_wrong_shape(name: str, bias: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=f"bias must be None or a tensor of shape \\({OUT},\\)"):
        _format(name).matmul(torch.randn(2, IN), bias)
