"""The shared argument checks: one message shape, bools never numbers, NaN never in range."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sparsekit._checks import (
    ArgumentTypeError,
    check_bool,
    check_fraction,
    check_int,
    check_mapping,
    check_materialized_module,
    check_module,
    check_positive,
    check_sparsity,
    check_writable,
    is_float8,
    renamed,
    renamed_attribute,
)
from sparsekit.prune import check_sparsity as check_sparsity_from_prune


def test_is_float8_names_the_dtypes_torch_stores_but_cannot_compute_in():
    assert is_float8(torch.float8_e4m3fn) and is_float8(torch.float8_e5m2)
    assert not any(is_float8(d) for d in (torch.float16, torch.bfloat16, torch.float32,
                                          torch.int8, torch.uint8, torch.bool))


def test_check_mapping():
    import torch

    check_mapping("masks", {"a": torch.ones(1)}, torch.Tensor, "a torch.Tensor")
    check_mapping("masks", {}, torch.Tensor, "a torch.Tensor")
    with pytest.raises(ArgumentTypeError, match=r"^masks must be a mapping of name to a "
                                                r"torch.Tensor, got list$"):
        check_mapping("masks", [torch.ones(1)], torch.Tensor, "a torch.Tensor")
    with pytest.raises(ArgumentTypeError, match=r"^masks\['b'\] must be a torch.Tensor, got "
                                                r"int$"):
        check_mapping("masks", {"a": torch.ones(1), "b": 3}, torch.Tensor, "a torch.Tensor")


def test_check_module():
    from torch import nn

    check_module("model", nn.Linear(2, 2))
    for bad, name in ((None, "NoneType"), ({"weight": 1}, "dict"), ("model.pt", "str")):
        with pytest.raises(ArgumentTypeError, match=rf"^model must be an nn.Module, got {name}$"):
            check_module("model", bad)


def test_check_int():
    check_int("n", 3)
    check_int("n", np.int64(3), minimum=1)
    check_int("n", -7)
    for bad in (1.5, 2.0, True, "3", None):
        with pytest.raises(ArgumentTypeError, match=r"^n must be an int ≥ 1, got "):
            check_int("n", bad, minimum=1)
    with pytest.raises(ValueError, match=r"^n must be an int ≥ 1, got 0$") as err:
        check_int("n", 0, minimum=1)
    assert not isinstance(err.value, TypeError)


def test_argument_type_error_is_caught_as_either():
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


@pytest.mark.parametrize("value, zero, one, ok", [
    (0.0, True, False, True), (0.0, False, False, False), (1.0, True, False, False),
    (1.0, True, True, True), (0.5, False, False, True), (float("nan"), True, True, False),
    (float("inf"), True, True, False), (-0.1, True, True, False), (1, True, True, True),
])
def test_check_fraction(value, zero, one, ok):
    if ok:
        check_fraction("f", value, zero=zero, one=one)
    else:
        interval = f"{'[' if zero else '('}0, 1{']' if one else ')'}"
        with pytest.raises(ValueError, match=rf"^f must be in \{interval[0]}0, 1\{interval[-1]}"):
            check_fraction("f", value, zero=zero, one=one)


def test_check_fraction_rejects_non_numbers():
    for bad in (True, "0.5", None):
        with pytest.raises(TypeError, match=r"f must be a float in \[0, 1\)"):
            check_fraction("f", bad)


def test_check_positive():
    for good in (1e-9, 3, np.float32(0.5)):
        check_positive("lr", good)
    check_positive("clip", None, optional=True)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^lr must be a positive finite float, got "):
            check_positive("lr", bad)
    for bad in (True, "1", None):
        with pytest.raises(ArgumentTypeError, match=r"^lr must be a positive finite float, "):
            check_positive("lr", bad)
    with pytest.raises(ValueError, match=r"^clip must be a positive finite float or None, got 0"):
        check_positive("clip", 0, optional=True)


def test_check_sparsity_stays_importable_from_prune():
    assert check_sparsity_from_prune is check_sparsity
    with pytest.raises(ValueError, match=r"initial_sparsity must be in \[0, 1\), got 1.0"):
        check_sparsity(1.0, "initial_sparsity")


@renamed(old="new")
def _f(a, new=0):
    return a, new


class _C:
    old = renamed_attribute("old", "new")

    def __init__(self) -> None:
        self.new = 5


def test_renamed_passes_the_old_keyword_on_with_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _f(1, new=2) == (1, 2)
    with pytest.warns(DeprecationWarning, match=r"_f\(\): old= is deprecated, use new=") as rec:
        assert _f(1, old=2) == (1, 2)
    assert rec[0].filename == __file__
    with pytest.raises(TypeError, match=r"_f\(\) got both old= and new="):
        _f(1, 3, old=2)
    with pytest.raises(TypeError, match=r"_f\(\) got both old= and new="):
        _f(1, new=3, old=2)


def test_renamed_attribute_warns_and_reads_the_new_one():
    with pytest.warns(DeprecationWarning, match=r"_C.old is deprecated, use .new"):
        assert _C().old == 5


def test_check_materialized_module_names_the_first_tensor_without_values():
    import torch
    from torch import nn

    layer = nn.BatchNorm1d(3)
    check_materialized_module(layer, "model: ")  # every tensor holds values
    layer.running_var = torch.empty(3, device="meta")
    with pytest.raises(ValueError, match=r"^model: running_var is on the meta device"):
        check_materialized_module(layer, "model: ")


@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, np.bool_(True)])
def test_check_bool_takes_only_true_and_false(value):
    with pytest.raises(ArgumentTypeError, match=r"flag must be a bool \(True or False\), got "):
        check_bool("flag", value)
    check_bool("flag", True)
    check_bool("flag", False)


def test_check_writable_names_an_inference_tensor_outside_inference_mode():
    with torch.inference_mode():
        frozen = torch.ones(2)
        check_writable("w", frozen)  # inside inference mode PyTorch writes it
    check_writable("w", torch.ones(2))
    with pytest.raises(ValueError, match=r"^w is an inference tensor .*cannot be changed in "
                                         r"place outside it"):
        check_writable("w", frozen)
