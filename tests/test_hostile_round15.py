"""Hostile inputs, round 15: checkpoints, the CLI, recipes and fine-tuning.

- a (re-sealed) header declaring a shape whose decoded size no machine holds is a
  ``ValueError`` naming the file, never an allocation (``read``, ``diff``, ``Delta.load``)
  nor a raw ``RuntimeError`` (``load``, ``sparsekit report``);
- ``Delta.load`` of a file whose tensors are stored dense is refused, not a ``KeyError``;
- ``diff`` of a device or FIFO says what it is, not that it does not exist;
- ``demo --seed`` and ``llm-prune --seed/--nsamples/--seqlen`` are checked before any work;
- a recipe's ``finetune.data_dir`` is checked by ``--check``, before any stage runs;
- LoRA ranks above every weight's dimensions are refused before ``peft`` allocates them,
  and a merge keeps pruned zeros exactly zero even where the adapter's update overflows.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from _cli import user_error
from _state import snapshot, unchanged
from safetensors.torch import load_file, save_file
from torch import nn

import sparsekit
from sparsekit import checkpoint
from sparsekit.finetune.delta import Delta
from sparsekit.models import lenet_300_100

peft = pytest.importorskip("peft")
from sparsekit.finetune import merge_lora, sparse_lora  # noqa: E402


def resealed(src: Path, dst: Path, **shapes: list[int]) -> Path:
    """``src`` with the declared shapes of some tensors replaced and the header sealed
    again (anyone can re-seal: the checks behind the seal must hold on their own)."""
    meta = checkpoint.read_metadata(src)
    entries = json.loads(meta["tensors"])
    for key, shape in shapes.items():
        entries[key]["shape"] = shape
    meta["tensors"] = json.dumps(entries, sort_keys=True)
    meta["digest"] = checkpoint._header_digest(meta)
    save_file(load_file(src), dst, metadata=meta)
    return dst


@pytest.fixture
def empty_masked(tmp_path) -> Path:
    """A checkpoint of an 8x8 weight with every entry pruned: stored as 0 gaps, 0 values."""
    model = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    masks = sparsekit.MaskSet(model, {"weight": torch.zeros(8, 8, dtype=torch.bool)})
    path = checkpoint.save(model, tmp_path / "empty.safetensors", masks)
    assert checkpoint.read_header(path)[1]["weight"].encoding == "gaps"
    return path


# -- declared shapes the file's size does not bound --------------------------------------------


def test_read_refuses_a_decoded_size_beyond_memory(empty_masked, tmp_path):
    # 2**60 float32 entries from a file of a few hundred bytes: was an allocator RuntimeError
    huge = resealed(empty_masked, tmp_path / "huge.safetensors", weight=[2**40, 2**20])
    with pytest.raises(ValueError, match="more than this machine's memory"):
        checkpoint.read(huge)
    with pytest.raises(ValueError, match="huge.safetensors"):
        sparsekit.diff(huge, huge)
    assert checkpoint.read_metadata(huge)["pattern"] == "unstructured"  # the header still reads


def test_cli_diff_of_a_crafted_shape_is_one_line(empty_masked, tmp_path, capsys):
    huge = resealed(empty_masked, tmp_path / "huge.safetensors", weight=[2**40, 2**20])
    err = user_error(capsys, "diff", str(huge), str(empty_masked))
    assert "memory" in err


@pytest.mark.parametrize("shape", [[2**62, 2**62], [2**61, 8]])
def test_a_shape_beyond_int64_bytes_is_a_value_error(empty_masked, tmp_path, shape):
    # was "Storage size calculation overflowed" (RuntimeError) from load, a TypeError with a
    # C++ stack from read
    bad = resealed(empty_masked, tmp_path / "bad.safetensors", weight=shape)
    model = nn.Linear(8, 8, bias=False)
    before = snapshot(model)
    for call in (lambda: sparsekit.load(model, bad), lambda: checkpoint.read(bad),
                 lambda: checkpoint.read_header(bad)):
        with pytest.raises(ValueError, match="more bytes than a tensor can"):
            call()
    assert unchanged(model, before)


def test_cli_report_of_a_shape_beyond_int64_is_one_line(empty_masked, tmp_path, capsys):
    bad = resealed(empty_masked, tmp_path / "bad.safetensors", weight=[2**62, 2**62])
    err = user_error(capsys, "report", str(bad), "--model", "lenet_300_100")
    assert "more bytes than a tensor can" in err


def test_a_legitimate_sparse_file_still_reads(empty_masked):
    ckpt = checkpoint.read(empty_masked)
    assert torch.equal(ckpt.state["weight"], torch.zeros(8, 8))
    assert not bool(ckpt.kept["weight"].any())


# -- Delta.load -----------------------------------------------------------------------------


def test_delta_load_refuses_a_plain_file_claiming_to_be_a_delta(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 2)}, path, metadata={"kind": "sparse-delta"})
    with pytest.raises(ValueError, match="stored without positions"):  # was KeyError 'w'
        Delta.load(path)


def test_delta_load_refuses_dense_entries(tmp_path):
    path = checkpoint.save(nn.Linear(2, 2), tmp_path / "dense.safetensors",
                           metadata={"kind": "sparse-delta"})
    with pytest.raises(ValueError, match="not a sparse delta"):  # was KeyError 'bias'
        Delta.load(path)


def test_delta_round_trip_is_bit_exact(tmp_path):
    values = torch.tensor([[0.0, -0.0, 1e-45], [float(torch.finfo().max), 0.0, -3.0]])
    masks = torch.tensor([[True, True, True], [True, False, True]])
    delta = Delta({"fc.weight": values}, {"fc.weight": masks})
    back = Delta.load(delta.save(tmp_path / "d.safetensors"))
    assert torch.equal(back.masks["fc.weight"], masks)
    assert torch.equal(back.values["fc.weight"].view(torch.int32), values.view(torch.int32))


# -- diff of what is no file ----------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_diff_of_a_fifo_says_what_it_is(tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    other = checkpoint.save(nn.Linear(2, 2), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="not a regular file nor a directory"):
        sparsekit.diff(fifo, other)
    err = user_error(capsys, "diff", str(other), str(fifo))
    assert "b: " in err and "does not exist" not in err


# -- the CLI checks its numbers before any work ---------------------------------------------


@pytest.mark.parametrize("seed", ["-5", str(2**64)])
def test_demo_seed_is_checked_before_any_work(tmp_path, capsys, monkeypatch, seed):
    # was: dense training, --out created with dense.safetensors in it, then the error
    # (2**64: "Overflow when unpacking long long", naming nothing)
    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the seed was checked")

    monkeypatch.setattr("sparsekit.cli.demo.load_image_dataset", no_data)
    out = tmp_path / "demo"
    err = user_error(capsys, "demo", "--out", str(out), "--seed", seed)
    assert "--seed" in err and seed in err
    assert not out.exists()


@pytest.mark.parametrize("flag, value, needle", [
    ("--seed", "-1", "--seed must be an int in [0, 2**63 - 1]"),
    ("--seed", str(2**63), "--seed must be an int in [0, 2**63 - 1]"),
    ("--nsamples", "0", "--nsamples must be an int ≥ 1"),
    ("--nsamples", "-3", "--nsamples must be an int ≥ 1"),
    ("--seqlen", "0", "--seqlen must be an int ≥ 2"),  # 0 fell back to the context length
    ("--seqlen", "-4", "--seqlen must be an int ≥ 2"),
    ("--seqlen", "1", "--seqlen must be an int ≥ 2"),  # refused only after the model loaded
])
def test_llm_prune_numbers_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch,
                                                              flag, value, needle):
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr("sparsekit.cli.llm_prune._load", no_load)
    calib = tmp_path / "calib.txt"
    calib.write_text("some text\n")
    (tmp_path / "model").mkdir()
    err = user_error(capsys, "llm-prune", str(tmp_path / "model"), "--calib", str(calib),
                     "--out", str(tmp_path / "out"), flag, value)
    assert needle in err and value in err
    assert not (tmp_path / "out").exists()


# -- recipes --------------------------------------------------------------------------------


def _recipe(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_data_dir_without_the_dataset_fails_check(tmp_path, capsys):
    # was: "valid recipe", then a run pruned and failed at the fine-tune stage
    empty = tmp_path / "nodata"
    empty.mkdir()
    recipe = _recipe(tmp_path, f"model: lenet_300_100\nprune: {{sparsity: 0.5}}\n"
                               f"finetune: {{data_dir: {str(empty)!r}}}\nout: o.safetensors\n")
    err = user_error(capsys, "run", str(recipe), "--check")
    assert "finetune.data_dir" in err and "lacks the IDX files" in err
    err = user_error(capsys, "run", str(recipe))
    assert "finetune.data_dir" in err and not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("value", ['""', '"  "'])
def test_recipe_empty_checkpoint_is_named(tmp_path, capsys, value):
    # was "checkpoint '.' is a directory": Path("") is the current directory
    recipe = _recipe(tmp_path, f"model: lenet_300_100\ncheckpoint: {value}\n")
    err = user_error(capsys, "run", str(recipe), "--check")
    assert "checkpoint: must be the path of a checkpoint file" in err and "'.'" not in err


def test_recipe_checkpoint_spelled_another_way_is_not_overwritten(tmp_path, capsys):
    ckpt = tmp_path / "in.safetensors"
    sparsekit.save(lenet_300_100(), ckpt)
    data = ckpt.read_bytes()
    (tmp_path / "sub").mkdir()
    recipe = _recipe(tmp_path, f"model: lenet_300_100\ncheckpoint: {str(ckpt)!r}\n"
                               f"out: {str(tmp_path / 'sub' / '..' / 'in.safetensors')!r}\n")
    err = user_error(capsys, "run", str(recipe))
    assert "is the input" in err and ckpt.read_bytes() == data


# -- LoRA on a sparse base ------------------------------------------------------------------

def _pruned() -> tuple[nn.Module, sparsekit.MaskSet]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    return model, sparsekit.prune(model, 0.5)


@pytest.mark.parametrize("kw, name", [
    ({"r": 2**40}, "config.r"),  # was an allocator RuntimeError (70 TB)
    ({"r": 17}, "config.r"),
    ({"r": 2, "rank_pattern": {"0": 2**31}}, "config.rank_pattern['0']"),
])
def test_lora_rank_above_every_dimension_is_refused(kw, name):
    model, masks = _pruned()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{name.replace('[', '.').replace(']', '.')} must "
                                         r"be an int in \[1, 16\]"):
        sparse_lora(model, peft.LoraConfig(target_modules=["0", "2"], **kw), masks)
    assert unchanged(model, before)
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))


def test_lora_rank_equal_to_the_largest_dimension_is_taken():
    model, masks = _pruned()
    lora = sparse_lora(model, peft.LoraConfig(r=16, target_modules=["0", "2"]), masks)
    assert any(isinstance(m, peft.tuners.lora.LoraLayer) for m in lora.modules())


@pytest.mark.parametrize("masked_forward", [True, False])
def test_merge_keeps_pruned_zeros_where_the_update_overflows(masked_forward):
    model, masks = _pruned()
    pruned = {n: ~m for n, m in masks.masks.items()}
    lora = sparse_lora(model, peft.LoraConfig(r=1, lora_alpha=3e38, target_modules=["0"],
                                              init_lora_weights=False), masks,
                       masked_forward=masked_forward)
    layer = next(m for m in lora.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    with torch.no_grad():  # s·B@A = 3e38 · 100 overflows float32 in every entry
        layer.lora_A["default"].weight.fill_(10.0)
        layer.lora_B["default"].weight.fill_(10.0)
    merged = merge_lora(lora)
    weight = merged[0].weight.detach()
    # was NaN (inf · 0) in every pruned entry
    assert torch.equal(weight[pruned["0.weight"]], torch.zeros(int(pruned["0.weight"].sum())))
    assert not bool(weight[pruned["0.weight"]].signbit().any())


def test_lora_state_dict_resumes_exactly(tmp_path):
    model, masks = _pruned()
    config = peft.LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False)
    lora = sparse_lora(model, config, masks)
    path = tmp_path / "lora.safetensors"
    sparsekit.save(lora, path)
    other_model, other_masks = _pruned()
    other = sparse_lora(other_model, config, other_masks)
    sparsekit.load(other, path)
    a, b = lora.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert torch.equal(lora(x), other(x))
    shutil.rmtree(tmp_path, ignore_errors=True)


# -- metadata that no reader could read back ------------------------------------------------


@pytest.mark.parametrize("metadata", [{"note": "\ud800"}, {"\udcff": "x"}])
def test_save_refuses_metadata_without_a_utf8_form(tmp_path, metadata):
    # was: saved over the old file, with a header no safetensors reader accepts
    path = checkpoint.save(nn.Linear(2, 2), tmp_path / "m.safetensors")
    data = path.read_bytes()
    with pytest.raises(ValueError, match="not valid Unicode text"):
        checkpoint.save(nn.Linear(2, 2), path, metadata=metadata)
    assert path.read_bytes() == data
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_save_keeps_any_valid_unicode_metadata(tmp_path):
    metadata = {"note": "a\x00b é😀", "ключ": ""}
    path = checkpoint.save(nn.Linear(2, 2), tmp_path / "m.safetensors", metadata=metadata)
    meta = checkpoint.read_metadata(path)
    assert {k: meta[k] for k in metadata} == metadata


# -- recipe files that are no small text file -----------------------------------------------


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_load_recipe_of_a_fifo_does_not_block(tmp_path):
    # was: read_text waited forever for a writer
    from sparsekit.recipe import load_recipe

    fifo = tmp_path / "recipe.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is not a regular file"):
        load_recipe(fifo)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_load_recipe_of_an_endless_device_is_refused():
    from sparsekit.recipe import load_recipe

    with pytest.raises(ValueError, match="is not a regular file"):  # was: memory filled
        load_recipe("/dev/zero")


def test_a_huge_recipe_is_refused_before_it_is_parsed(tmp_path, capsys):
    from sparsekit.recipe import MAX_RECIPE_BYTES, load_recipe

    recipe = _recipe(tmp_path, "model: lenet_300_100\n" + "#" * MAX_RECIPE_BYTES + "\n")
    with pytest.raises(ValueError, match="larger than 1,048,576 bytes"):
        load_recipe(recipe)
    assert "larger than" in user_error(capsys, "run", str(recipe), "--check")
    with pytest.raises(ValueError, match="is a directory"):
        load_recipe(tmp_path)


def test_a_recipe_with_crlf_lines_still_loads(tmp_path):
    from sparsekit.recipe import load_recipe

    recipe = tmp_path / "crlf.yaml"
    recipe.write_bytes(b"model: lenet_300_100\r\nseed: 3\r\nprune: {sparsity: 0.5}\r\n")
    loaded = load_recipe(recipe)
    assert (loaded.seed, loaded.prune.sparsity) == (3, 0.5)


# -- a tensor named like another's compressed parts -----------------------------------------


class _Crowded(nn.Module):
    """A sparse weight ``w`` (stored as ``w::values`` + ``w::gaps`` when compressed) and a
    buffer that is named ``w::values``."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.zeros(16, 16)
        w[0, 0] = 1.0
        self.w = nn.Parameter(w)
        self.register_buffer("w::values", torch.tensor([5.0]))


def test_a_tensor_named_like_compressed_parts_round_trips(tmp_path):
    # was: saved (over the old file) with one part overwritten, then unreadable
    model = _Crowded()
    path = checkpoint.save(model, tmp_path / "c.safetensors")
    other = _Crowded()
    with torch.no_grad():
        other.w.fill_(3.0)
        getattr(other, "w::values").fill_(7.0)
    sparsekit.load(other, path)
    assert torch.equal(other.w, model.w)
    assert torch.equal(getattr(other, "w::values"), torch.tensor([5.0]))


def test_masks_on_a_tensor_named_like_compressed_parts_are_refused(tmp_path):
    model = _Crowded()
    masks = sparsekit.MaskSet(model, {"w": model.w.detach() != 0})
    path = checkpoint.save(nn.Linear(2, 2), tmp_path / "c.safetensors")
    data = path.read_bytes()
    with pytest.raises(ValueError, match="'w::values'"):
        checkpoint.save(model, path, masks)
    assert path.read_bytes() == data


def test_a_header_describing_one_part_twice_says_so(tmp_path):
    src = checkpoint.save(_Crowded(), tmp_path / "c.safetensors")
    meta = checkpoint.read_metadata(src)
    entries = json.loads(meta["tensors"])
    parts = load_file(src)
    # re-encode w as compressed: its values part is then the buffer's name too
    entries["w"].update(encoding="gaps", masked=False, nnz=1)
    parts.pop("w")
    parts["w::gaps"] = torch.zeros(1, dtype=torch.uint8)
    meta["tensors"] = json.dumps(entries, sort_keys=True)
    meta["digest"] = checkpoint._header_digest(meta)
    save_file(parts, tmp_path / "bad.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"describes the stored tensors \['w::values'\] twice"):
        checkpoint.read(tmp_path / "bad.safetensors")


# -- a file of an untied model loaded into a tied one ---------------------------------------


class _Pair(nn.Module):
    def __init__(self, tie: bool) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        if tie:
            self.b.weight = self.a.weight


def test_loading_different_values_into_tied_keys_is_refused(tmp_path):
    # was: loaded, keeping b's values in the shared tensor and dropping a's silently
    path = checkpoint.save(_Pair(tie=False), tmp_path / "untied.safetensors")
    model = _Pair(tie=True)
    before = snapshot(model)
    with pytest.raises(ValueError, match="ties 'b.weight' to 'a.weight'"):
        sparsekit.load(model, path)
    assert unchanged(model, before)


def test_tied_keys_with_equal_values_still_load(tmp_path):
    untied = _Pair(tie=False)
    with torch.no_grad():
        untied.b.weight.copy_(untied.a.weight)
        untied.a.weight[0, 0] = -0.0
        untied.b.weight[0, 0] = -0.0
    path = checkpoint.save(untied, tmp_path / "equal.safetensors")
    model = _Pair(tie=True)
    sparsekit.load(model, path)
    assert torch.equal(model.a.weight.view(torch.int32), untied.a.weight.view(torch.int32))
    tied = _Pair(tie=True)
    sparsekit.load(_Pair(tie=True), checkpoint.save(tied, tmp_path / "tied.safetensors"))
