"""Hostile inputs to recipes, diff, top-k selection and transformer-block capture."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from sparsekit._checks import ArgumentTypeError
from sparsekit.blocks import BlockReplay, capture_inputs, find_blocks
from sparsekit.diff import diff
from sparsekit.select import top_k, top_k_counts

pytest.importorskip("pydantic")
pytest.importorskip("yaml")

from sparsekit.recipe import load_recipe, run_recipe  # noqa: E402


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


# --- recipe -----------------------------------------------------------------------------


def test_recipe_unhashable_yaml_key_is_a_yaml_error(tmp_path):
    """A ``? [a]`` mapping key was a raw TypeError (unhashable type: 'list')."""
    path = _write(tmp_path, "? [a]\n: 1\nmodel: lenet_300_100\n")
    with pytest.raises(ValueError, match="not valid YAML.*mapping key must be a name"):
        load_recipe(path)


def test_recipe_alias_bomb_error_is_short_and_fast(tmp_path):
    """Nested YAML aliases made each error repr exponentially long (seconds, megabytes)."""
    lines = ["x0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 8)]
    path = _write(tmp_path, "\n".join(lines) + "\nmodel: lenet_300_100\n"
                  "prune: {sparsity: 0.5, exclude: *a7}\n")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="prune.exclude.0: Input should be a valid string") as e:
        load_recipe(path)
    assert time.perf_counter() - start < 2.0
    assert len(str(e.value)) < 20_000


def test_recipe_many_problems_are_capped(tmp_path):
    """Fifty bad list entries gave fifty error clauses in one message (one per entry)."""
    path = _write(tmp_path, "model: lenet_300_100\nprune: {sparsity: 0.5, exclude: ["
                  + ", ".join(["1"] * 50) + "]}\n")
    with pytest.raises(ValueError, match="… and 30 more") as e:
        load_recipe(path)
    assert str(e.value).count("prune.exclude.") == 20


def test_recipe_huge_input_shape_names_what_is_accepted(tmp_path):
    """A dimension past 2**63 gave torch's bare 'Overflow when unpacking long long'."""
    path = _write(tmp_path, "model: lenet_300_100\ninput_shape: [1, 99999999999999999999999]\n")
    with pytest.raises(ValueError, match="input_shape: must be dimensions ≥ 1 with at most"):
        load_recipe(path)


def test_recipe_out_directory_refused_at_load(tmp_path):
    """``out`` naming a directory was accepted and failed only after every stage had run."""
    path = _write(tmp_path, f"model: lenet_300_100\nprune: {{sparsity: 0.5}}\nout: '{tmp_path}'\n")
    with pytest.raises(ValueError, match="out: .*an existing directory"):
        load_recipe(path)


def test_recipe_out_under_a_file_refused_at_load(tmp_path):
    """``out`` under an existing file passed validation, then was a raw FileExistsError."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "sub" / "x.safetensors"
    path = _write(tmp_path, f"model: lenet_300_100\nout: '{out}'\n")
    with pytest.raises(ValueError, match="out: cannot write .* is a file, not a directory"):
        load_recipe(path)
    assert (tmp_path / "file").read_text() == "x"


def test_recipe_out_in_a_new_folder_still_accepted(tmp_path):
    """(Control) a missing folder on the way of ``out`` is created by the save."""
    out = tmp_path / "new" / "x.safetensors"
    assert load_recipe(_write(tmp_path, f"model: lenet_300_100\nout: '{out}'\n")).out == str(out)


def test_load_recipe_non_path_is_argument_type_error():
    """``load_recipe(None)`` was a raw TypeError from pathlib."""
    with pytest.raises(ArgumentTypeError, match="path must be the path of a YAML recipe"):
        load_recipe(None)  # type: ignore[arg-type]


def test_run_recipe_refuses_a_path_and_a_bad_log(tmp_path):
    """``run_recipe('r.yaml')`` was a raw AttributeError; a non-callable log a raw TypeError
    after the model had been pruned."""
    with pytest.raises(ArgumentTypeError, match="recipe must be a Recipe"):
        run_recipe("recipe.yaml")  # type: ignore[arg-type]
    recipe = load_recipe(_write(tmp_path, "model: lenet_300_100\nprune: {sparsity: 0.5}\n"))
    with pytest.raises(ArgumentTypeError, match="log must be a callable"):
        run_recipe(recipe, log=3)


# --- diff -------------------------------------------------------------------------------


def test_diff_complex_update_counts():
    """Complex tensors were compared as .double(): an imaginary update counted 0 changed."""
    d = diff({"a": torch.tensor([1 + 1j, 2 + 0j])}, {"a": torch.tensor([1 + 5j, 2 + 0j])})
    (row,) = d.rows
    assert row.changed == 1 and row.norm == pytest.approx(4.0)


def test_diff_totals_of_large_float64_norms():
    """Finite float64 weights near 1e200 made the totals a raw OverflowError."""
    a = {"w": torch.tensor([1e200], dtype=torch.float64)}
    b = {"w": torch.tensor([3e200], dtype=torch.float64)}
    totals = diff(a, b).totals
    assert totals["relative_norm"] == pytest.approx(2.0)
    assert "total" in str(diff(a, b))


def test_diff_wrong_types_are_argument_type_errors():
    """atol='1', a non-tensor value and a non-model side were plain TypeErrors; numpy atol
    was refused."""
    m = nn.Linear(3, 2)
    with pytest.raises(ArgumentTypeError, match="atol"):
        diff(m, m, atol="1")  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="are not tensors"):
        diff({"a": 1}, {"a": 1})  # type: ignore[dict-item]
    with pytest.raises(ArgumentTypeError, match="b must be a model"):
        diff(m, 3)  # type: ignore[arg-type]
    np = pytest.importorskip("numpy")
    assert diff(m, m, atol=np.float32(0.1)).totals["changed"] == 0
    with pytest.raises(ValueError, match="atol"):
        diff(m, m, atol=float("nan"))


def test_diff_non_str_keys():
    """Mixed int and str keys were a raw TypeError from sorting them."""
    with pytest.raises(ArgumentTypeError, match=r"keys \[0\] are not str"):
        diff({"a": torch.ones(1), 0: torch.ones(1)}, {"b": torch.ones(1), 1: torch.ones(1)})


def test_diff_meta_and_sparse_tensors():
    """Meta tensors were a raw NotImplementedError ('Cannot copy out of meta tensor'), and
    so were sparse ones."""
    with pytest.raises(ValueError, match="a: the tensors .* meta device"):
        diff(nn.Linear(2, 2, device="meta"), nn.Linear(2, 2))
    d = diff({"a": torch.eye(2).to_sparse()}, {"a": (2 * torch.eye(2)).to_sparse()})
    assert d.rows[0].changed == 2


class _WithExtra(nn.Linear):
    def get_extra_state(self) -> dict:
        return {"step": 3}

    def set_extra_state(self, state: dict) -> None:
        pass


def test_diff_skips_non_tensor_extra_state():
    """A module's get_extra_state() entry (a dict) reached the tensor checks: AttributeError."""
    a, b = _WithExtra(2, 2), _WithExtra(2, 2)
    assert [r.name for r in diff(a, b).rows] == ["weight", "bias"]


# --- select -----------------------------------------------------------------------------


def test_top_k_int64_is_exact():
    """int64 scores were ranked as doubles: 2**53 + 1 tied 2**53 and lost to it."""
    scores = torch.tensor([2**53, 2**53 + 1, -(2**62)])
    assert top_k(scores, 1).tolist() == [False, True, False]
    allowed = torch.tensor([True, False, True])
    assert top_k(scores, 2, allowed=allowed).tolist() == [True, False, True]
    rows = torch.tensor([[2**60, 2**60 + 1], [5, 4]])
    assert top_k(rows, 1, dim=1).tolist() == [[False, True], [True, False]]


def test_top_k_huge_k_with_allowed():
    """k past 2**63 with ``allowed`` was a raw RuntimeError (int64 overflow in clamp)."""
    mask = top_k(torch.tensor([1.0, 2.0]), 2**63, allowed=torch.tensor([True, False]))
    assert mask.tolist() == [True, False]


def test_top_k_allowed_on_another_device():
    """``allowed`` on another device was a raw RuntimeError deep inside."""
    with pytest.raises(ValueError, match="allowed must be on the device of scores"):
        top_k(torch.ones(3), 1, allowed=torch.ones(3, dtype=torch.bool, device="meta"))


def test_top_k_counts_checks_parts():
    """A list of lists was a raw AttributeError, None a raw TypeError, a complex part lost
    its imaginary part silently."""
    with pytest.raises(ArgumentTypeError, match=r"parts\[0\] must be a real tensor"):
        top_k_counts([[1.0, 2.0]], 1)  # type: ignore[list-item]
    with pytest.raises(ArgumentTypeError, match="parts must be a sequence"):
        top_k_counts(None, 1)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="parts must be a sequence"):
        top_k_counts(torch.tensor([1.0, 2.0]), 1)  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="complex"):
        top_k_counts([torch.tensor([1 + 1j])], 1)
    assert top_k_counts([torch.tensor([1.0, 3.0]), torch.tensor([2.0])], 2) == [1, 1]


# --- blocks -----------------------------------------------------------------------------


def test_blocks_non_module_model():
    """A non-module model was a raw AttributeError in find_blocks, capture_inputs and
    BlockReplay."""
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module"):
        find_blocks("model")  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module"):
        capture_inputs("model", [], [])  # type: ignore[arg-type]
    with pytest.raises(ArgumentTypeError, match="model must be an nn.Module"):
        BlockReplay(3, ["layers.0"], torch.ones(1, 4))  # type: ignore[arg-type]


def test_capture_inputs_bad_arguments():
    """Non-module blocks were a raw AttributeError, non-iterable inputs a raw TypeError and
    an input of the wrong width a raw RuntimeError from the model; hooks are removed."""
    model = _Stack()
    with pytest.raises(ArgumentTypeError, match="blocks must be a sequence of modules"):
        capture_inputs(model, [1], [torch.ones(1, 4)])  # type: ignore[list-item]
    with pytest.raises(ArgumentTypeError, match="inputs must be an iterable"):
        capture_inputs(model, model.layers, 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="inputs: the model cannot run on it"):
        capture_inputs(model, [model.layers[1]], [torch.ones(1, 5)])
    assert not any(layer._forward_pre_hooks for layer in model.layers)
    ((hidden, _),) = capture_inputs(model, model.layers[1:], [torch.ones(1, 4)])
    assert hidden[0].shape == (1, 4)


def test_block_replay_names():
    """Blocks given as one str were taken letter by letter; replaying an unrecorded block
    was a raw KeyError."""
    model = _Stack()
    with pytest.raises(ArgumentTypeError, match="blocks must be a list of module names"):
        BlockReplay(model, "layers.0", torch.ones(1, 4))  # type: ignore[arg-type]
    replay = BlockReplay(model, ["layers.0"], torch.ones(1, 4))
    with pytest.raises(ValueError, match="block 'layers.1' was not recorded; accepted: "
                                         "'layers.0'"):
        replay("layers.1")
    assert replay("layers.0").shape == (1, 4)
