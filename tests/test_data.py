import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsekit.data import ImageDataset, load_image_dataset, read_idx
from sparsekit.data.images import DEFAULT_DATA_DIR

IDX_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends in ``.gz``."""
    data = array.astype(array.dtype.newbyteorder(">"))
    header = bytes([0, 0, IDX_CODES[array.dtype.str[1:]], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb") as f:
        f.write(header + data.tobytes())
    return path


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_uint8(tmp_path, suffix):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    labels = np.array([3, 7], dtype=np.uint8)
    x = read_idx(write_idx(tmp_path / f"images{suffix}", images))
    y = read_idx(write_idx(tmp_path / f"labels{suffix}", labels))
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images))
    assert y.shape == (2,) and y.tolist() == [3, 7]


@pytest.mark.parametrize("dtype", [np.float32, np.int16])
def test_read_idx_multibyte_is_big_endian(tmp_path, dtype):
    array = np.array([[1.5, -2.0, 300.0]]).astype(dtype)
    x = read_idx(write_idx(tmp_path / "values", array))
    assert x.dtype == torch.from_numpy(array).dtype
    assert torch.equal(x, torch.from_numpy(array))


def test_read_idx_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x1f\x8b\x08\x00")
    with pytest.raises(ValueError, match="bad IDX magic number '1f8b0800'"):
        read_idx(path)


def test_read_idx_truncated(tmp_path):
    path = write_idx(tmp_path / "images", np.zeros((2, 3, 4), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated IDX file: expected 40 bytes"):
        read_idx(path)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(bytes([0, 0, 0x08, 1, 0]))
    with pytest.raises(ValueError, match="truncated IDX header: expected 8 bytes, got 5"):
        read_idx(path)


def make_idx_dir(root: Path, n_train: int = 20, n_test: int = 10) -> Path:
    """Tiny synthetic Fashion-MNIST: gzip-compressed train files, raw test files."""
    rng = np.random.default_rng(0)
    for prefix, n, suffix in [("train", n_train, ".gz"), ("t10k", n_test, "")]:
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return root


def test_load_image_dataset_from_idx_dir(tmp_path, capsys):
    data = load_image_dataset(make_idx_dir(tmp_path))
    assert isinstance(data, ImageDataset)
    assert (data.name, data.num_classes, data.image_shape) == ("fashion-mnist", 10, (1, 28, 28))
    train_x, train_y = data.train.tensors
    test_x, test_y = data.test.tensors
    assert train_x.shape == (20, 1, 28, 28) and test_x.shape == (10, 1, 28, 28)
    assert train_x.dtype == test_x.dtype == torch.float32
    assert train_y.dtype == test_y.dtype == torch.int64
    assert train_x.mean().abs() < 1e-5 and (train_x.std() - 1).abs() < 1e-5
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"t10k-images-idx3-ubyte": np.zeros((10, 32, 32), np.uint8)},
         "t10k-images-idx3-ubyte: test images are 32x32, the training images 28x28"),
        ({"train-labels-idx1-ubyte": np.array([0, 1, -1, *range(17)], np.int8)},
         "train-labels-idx1-ubyte: train labels must be class indices ≥ 0, got -1"),
        ({"t10k-labels-idx1-ubyte": np.full(10, 0.5, np.float32)},
         "t10k-labels-idx1-ubyte: test labels must be integer class indices, got torch.float32"),
        ({"train-images-idx3-ubyte": np.full((20, 28, 28), np.nan, np.float32)},
         "train-images-idx3-ubyte: train images must be finite, got NaN"),
        ({"train-images-idx3-ubyte": np.zeros((0, 28, 28), np.uint8),
          "train-labels-idx1-ubyte": np.zeros(0, np.uint8)},
         "train-images-idx3-ubyte: the train split holds no images"),
    ],
    ids=["test-size", "negative-label", "float-label", "nan-image", "empty-train"],
)
def test_load_image_dataset_refuses_inconsistent_files(tmp_path, files, match):
    root = make_idx_dir(tmp_path)
    for name, array in files.items():
        for old in root.glob(f"{name}*"):  # the raw or the gzip-compressed file
            old.unlink()
        write_idx(root / name, array)
    with pytest.raises(ValueError, match=match):
        load_image_dataset(root)


def test_env_var_sets_root(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKIT_DATA_DIR", str(make_idx_dir(tmp_path, n_train=12)))
    assert len(load_image_dataset().train) == 12


def test_explicit_missing_root_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_image_dataset(tmp_path)


def test_falls_back_to_digits_and_says_so(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.setenv("SPARSEKIT_DATA_DIR", str(tmp_path))
    data = load_image_dataset()
    assert (data.name, data.num_classes, data.image_shape) == ("digits", 10, (1, 28, 28))
    assert (len(data.train), len(data.test)) == (1437, 360)
    assert data.train.tensors[0].dtype == torch.float32
    assert data.train.tensors[1].dtype == torch.int64
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(tmp_path) in err and "apt-get install dataset-fashion-mnist" in err
    assert "SPARSEKIT_DATA_DIR" in err


def test_fallback_is_deterministic_and_quiet(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    monkeypatch.setenv("SPARSEKIT_DATA_DIR", str(tmp_path))
    first, second = load_image_dataset(quiet=True), load_image_dataset(quiet=True)
    assert torch.equal(first.test.tensors[0], second.test.tensors[0])
    assert capsys.readouterr().err == ""


@pytest.mark.skipif(
    len(list(Path(DEFAULT_DATA_DIR).glob("*-idx?-ubyte*"))) < 4,
    reason=f"Fashion-MNIST is not installed in {DEFAULT_DATA_DIR}",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("SPARSEKIT_DATA_DIR", raising=False)
    data = load_image_dataset()
    assert data.name == "fashion-mnist"
    assert (len(data.train), len(data.test)) == (60000, 10000)


def test_make_demo_installs_fashion_mnist_where_the_loader_looks():
    """``make demo`` in a fresh clone installs (or finds) Fashion-MNIST in the Makefile's
    ``FASHION`` directory; the loader's default must be that directory, or the demo would
    fall back to digits on a machine that has the data."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    (line,) = [ln for ln in makefile.splitlines() if ln.startswith("FASHION")]
    assert line.partition(":=")[2].strip() == DEFAULT_DATA_DIR
