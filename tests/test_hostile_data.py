"""Hostile data files and targets found by probing the data loaders (session 32): each is a
clear ``ValueError`` naming the file or the argument, raised before anything is built.

Every case here was accepted (images normalised to NaN, a decompression bomb filling
memory) or failed with a raw error from deep inside before.
"""

from __future__ import annotations

import gzip
import resource
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import write_idx

from sparsekit.cli.main import main
from sparsekit.data import load_image_dataset, read_idx, reber_accuracy

# -- read_idx --------------------------------------------------------------------------------


def _labels_header(n: int) -> bytes:
    return bytes([0, 0, 0x08, 1]) + struct.pack(">I", n)


def test_a_gzip_bomb_is_refused_after_the_declared_size(tmp_path):
    """A 1 MiB .gz declaring 3 labels but inflating to 1 GiB was decompressed whole before
    the size check (2.2 GiB of memory)."""
    path = tmp_path / "bomb-idx1-ubyte.gz"
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: a gzip stream
    with open(path, "wb") as f:
        f.write(packer.compress(_labels_header(3) + bytes(3)))
        chunk = bytes(1 << 24)
        for _ in range(64):
            f.write(packer.compress(chunk))
        f.write(packer.flush())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"trailing bytes in IDX file: expected 11 bytes for "
                                         r"shape \(3,\), got more"):
        read_idx(path)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 * 1024


def test_trailing_bytes_of_a_raw_file_are_refused(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(_labels_header(3) + bytes(4))
    with pytest.raises(ValueError, match="trailing bytes in IDX file: expected 11 bytes"):
        read_idx(path)


def test_a_header_declaring_a_huge_shape_reads_only_what_is_there(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(bytes([0, 0, 0x08, 2]) + struct.pack(">II", 2**32 - 1, 2**32 - 1))
    with pytest.raises(ValueError, match=r"truncated IDX file: .*got 12$"):
        read_idx(path)


def _corrupt_deflate(tmp_path: Path) -> Path:
    """A labels file whose deflate stream is broken after the gzip header."""
    packed = bytearray(gzip.compress(_labels_header(3) + bytes([1, 2, 3])))
    packed[12:16] = b"\xff\xff\xff\xff"
    path = tmp_path / "labels.gz"
    path.write_bytes(bytes(packed))
    return path


def test_a_corrupt_deflate_stream_is_a_value_error(tmp_path):
    """zlib.error ("invalid distance too far back") escaped, an error no caller catches."""
    with pytest.raises(ValueError, match=r"labels.gz: corrupt gzip stream \(Error -3 while "
                                         r"decompressing data"):
        read_idx(_corrupt_deflate(tmp_path))


def _corrupt_dataset(root: Path) -> Path:
    """A Fashion-MNIST directory whose training images hold a corrupt deflate stream
    (zeros: compressed, not stored, so the broken bytes are deflate codes)."""
    root.mkdir()
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    raw = root / "train-images-idx3-ubyte"
    packed = bytearray(gzip.compress(raw.read_bytes()))
    packed[20:28] = b"\xff" * 8
    raw.unlink()
    (root / "train-images-idx3-ubyte.gz").write_bytes(bytes(packed))
    return root


@pytest.mark.parametrize("command", [
    ["demo", "--epochs", "1"],
    ["prune", "CKPT", "--sparsity", "0.5", "--method", "snip", "--dry-run"],
])
def test_the_cli_reports_a_corrupt_gzip_stream_in_one_line(tmp_path, capsys, command):
    """`sparsekit demo/prune --data-dir` printed a zlib.error traceback."""
    import sparsekit
    from sparsekit.models import create_model

    root = _corrupt_dataset(tmp_path / "data")
    ckpt = sparsekit.save(create_model("lenet_300_100"), tmp_path / "dense.safetensors")
    argv = [str(ckpt) if a == "CKPT" else a for a in command]
    code = main([*argv, "--data-dir", str(root), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert f"error: {root}/train-images-idx3-ubyte.gz: corrupt gzip stream (Error -3" in err


# -- load_image_dataset ----------------------------------------------------------------------


def _dataset(root: Path, train: np.ndarray, test: np.ndarray | None = None) -> Path:
    for prefix, images in (("train", train), ("t10k", train if test is None else test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", np.zeros(len(images), dtype=np.uint8))
    return root


@pytest.mark.parametrize("images, value", [
    (np.full((4, 28, 28), 7, dtype=np.uint8), 7),
    (np.zeros((4, 28, 28), dtype=np.uint8), 0),
    (np.zeros((1, 1, 1), dtype=np.uint8), 0),  # one pixel: its std is NaN
])
def test_constant_training_images_are_refused(tmp_path, images, value):
    """All-zero images were normalised by a std of 0 into NaN tensors (constant 7s into
    values off by a rounding error's std)."""
    root = _dataset(tmp_path, images)
    with pytest.raises(ValueError, match=rf"^{tmp_path}/train-images-idx3-ubyte: every pixel "
                                         rf"of the train images is {value}; .*std of 0"):
        load_image_dataset(root)


def test_constant_test_images_are_taken(tmp_path):
    """Only the training split's std normalises; a constant test split is fine."""
    train = np.random.default_rng(0).integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    data = load_image_dataset(_dataset(tmp_path, train, np.zeros((2, 28, 28), dtype=np.uint8)))
    assert bool(torch.isfinite(data.test.tensors[0]).all())


@pytest.mark.parametrize("height, width", [(0, 0), (28, 0), (0, 28)])
def test_empty_images_are_refused(tmp_path, height, width):
    """0×0 images were accepted as a dataset of image_shape (1, 0, 0)."""
    root = _dataset(tmp_path, np.zeros((2, height, width), dtype=np.uint8))
    with pytest.raises(ValueError, match=rf"train-images-idx3-ubyte: train images are "
                                         rf"{height}x{width}; height and width must be ≥ 1"):
        load_image_dataset(root)


# -- reber_accuracy --------------------------------------------------------------------------


@pytest.mark.parametrize("logits, targets, error, match", [
    (torch.randn(2, 0), torch.randn(2, 0), ValueError,
     r"at least one symbol in their last dimension, got shape \(2, 0\)"),
    (torch.randn(2, 7), -torch.ones(2, 7), ValueError,
     r"targets must be multi-hot \(every entry 0 or 1.*such as -1.0"),
    (torch.randn(2, 7), torch.full((2, 7), 0.5), ValueError, "targets must be multi-hot"),
    (torch.randn(2, 7), torch.full((2, 7), 2, dtype=torch.long), ValueError,
     "targets must be multi-hot.* such as 2"),
    ([1.0], torch.ones(1), TypeError, "logits must be a tensor"),
    (torch.ones(1), [1.0], TypeError, "targets must be a tensor"),
])
def test_reber_accuracy_refuses_what_is_no_multi_hot_target(logits, targets, error, match):
    """A zero-width last dimension was an IndexError from argmax; negative targets counted
    every step as padding (accuracy 0), 0.5 counted as a legal symbol."""
    with pytest.raises(error, match=match):
        reber_accuracy(logits, targets)


def test_reber_accuracy_takes_bool_and_integer_targets():
    logits = torch.tensor([[0.0, 1.0, 0.0]])
    for targets in (torch.tensor([[False, True, False]]), torch.tensor([[0, 1, 0]])):
        assert reber_accuracy(logits, targets) == 1.0
