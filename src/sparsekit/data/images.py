"""Fashion-MNIST from IDX files, with scikit-learn's digits as an offline fallback.

The fallback keeps examples and tests runnable on machines without the dataset: the
8×8 digits are resized to 28×28 so every model in :mod:`sparsekit.models` accepts them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from sparsekit._checks import check_bool
from sparsekit.data.idx import check_path, read_idx

DATA_DIR_ENV = "SPARSEKIT_DATA_DIR"
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"

# split -> (images file, labels file), each optionally gzip-compressed (``.gz``).
_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class ImageDataset:
    """Normalised train/test splits of ``(N, 1, H, W)`` float32 images and int64 labels."""

    train: TensorDataset
    test: TensorDataset
    name: str
    num_classes: int
    image_shape: tuple[int, ...]


def load_image_dataset(
    root: str | os.PathLike | None = None, *, quiet: bool = False
) -> ImageDataset:
    """Load Fashion-MNIST from the IDX files in ``root``.

    ``root`` defaults to ``$SPARSEKIT_DATA_DIR``, else ``/usr/share/datasets/fashion-mnist``.
    An explicit ``root`` without the files raises ``FileNotFoundError``; a default one
    falls back to scikit-learn's digits and says so on stderr unless ``quiet``.
    """
    if root is not None:
        check_path("root", root)
    check_bool("quiet", quiet)  # quiet="no" silenced the fallback's notice
    explicit = root is not None
    root = Path(root if explicit else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)
    files, missing = _find_idx_files(root)
    if not missing:
        return _from_idx(files)
    if explicit:
        check_image_root(root)
    if not quiet:
        print(
            f"sparsekit: no Fashion-MNIST IDX files in {root}, using scikit-learn's 8x8 digits "
            f"resized to 28x28 instead; get Fashion-MNIST with `apt-get install "
            f"dataset-fashion-mnist` or point {DATA_DIR_ENV} at a directory of its IDX files",
            file=sys.stderr,
        )
    return _digits()


def check_image_root(root: str | os.PathLike, name: str = "root") -> None:
    """Raise unless ``root`` (the argument or flag ``name`` in the message) holds the IDX
    files that :func:`load_image_dataset` reads from an explicit ``root`` (without reading
    them): ``FileNotFoundError`` naming the missing ones, ``ValueError`` for a blank path
    (``Path("")`` is the current directory: an unset shell variable read it)."""
    if not os.fspath(root).strip():
        raise ValueError(f"{name} must be a directory of the dataset's IDX files, got "
                         f"{os.fspath(root)!r}")
    _, missing = _find_idx_files(Path(root))
    if missing:
        raise FileNotFoundError(
            f"{name} {str(root)!r} lacks the IDX files {', '.join(missing)} (each may end in "
            ".gz)"
        )


def _find_idx_files(root: Path) -> tuple[dict[str, Path], list[str]]:
    """Map each standard IDX name to its file in ``root`` (raw or ``.gz``); list the missing."""
    found, missing = {}, []
    for name in (n for pair in _IDX_NAMES.values() for n in pair):
        path = next((p for p in (root / name, root / f"{name}.gz") if p.is_file()), None)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    return found, missing


def _from_idx(files: dict[str, Path]) -> ImageDataset:
    splits = {}
    for split, (images_name, labels_name) in _IDX_NAMES.items():
        images, labels = read_idx(files[images_name]), read_idx(files[labels_name])
        _check_split(split, files[images_name], files[labels_name], images, labels)
        splits[split] = (images.unsqueeze(1).float() / 255, labels.long())
    train_size, test_size = (tuple(splits[s][0].shape[2:]) for s in ("train", "test"))
    if test_size != train_size:
        raise ValueError(
            f"{files[_IDX_NAMES['test'][0]]}: test images are {test_size[0]}x{test_size[1]}, "
            f"the training images {train_size[0]}x{train_size[1]}; both splits need one size"
        )
    return _dataset("fashion-mnist", *splits["train"], *splits["test"])


def _check_split(
    split: str, images_path: Path, labels_path: Path, images: torch.Tensor, labels: torch.Tensor
) -> None:
    """Raise ``ValueError`` naming the file and ``split`` unless ``images`` are at least one
    ``(H, W)`` image (H, W ≥ 1) of finite values, not all one value in the training split,
    and ``labels`` one class index (an integer ≥ 0) per image: anything else would reach
    the model as NaNs (both splits are normalised by the training images' std, which is
    NaN for an empty split or a single pixel and 0 for constant images) or as classes that
    do not exist (``num_classes`` is the largest + 1)."""
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{images_path} and {labels_path}: expected (N, H, W) images and (N,) labels, "
            f"got shapes {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if len(images) == 0:
        raise ValueError(f"{images_path}: the {split} split holds no images; it needs at least one")
    if min(images.shape[1:]) < 1:
        height, width = images.shape[1:]
        raise ValueError(
            f"{images_path}: {split} images are {height}x{width}; height and width must be ≥ 1"
        )
    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        raise ValueError(f"{images_path}: {split} images must be finite, got NaN or infinity")
    if split == "train" and bool(images.min() == images.max()):
        raise ValueError(
            f"{images_path}: every pixel of the {split} images is {images.min().item()!r}; "
            f"normalising by their std of 0 would make them NaN, so the {split} split needs "
            "at least two different pixel values"
        )
    if labels.is_floating_point():
        raise ValueError(
            f"{labels_path}: {split} labels must be integer class indices, got {labels.dtype} "
            f"values such as {labels[0].item()!r}"
        )
    if int(labels.min()) < 0:
        raise ValueError(
            f"{labels_path}: {split} labels must be class indices ≥ 0, got {int(labels.min())}"
        )


def _digits() -> ImageDataset:
    """scikit-learn's 1797 8×8 digits, bilinearly resized to 28×28, split 80/20 (seed 0)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "the digits fallback needs scikit-learn: pip install 'sparsekit[digits]', "
            "or install Fashion-MNIST (apt-get install dataset-fashion-mnist)"
        ) from e

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    indices = np.arange(len(labels))
    train, test = train_test_split(indices, test_size=0.2, random_state=0, stratify=digits.target)
    return _dataset("digits", images[train], labels[train], images[test], labels[test])


def _dataset(
    name: str,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
) -> ImageDataset:
    """Normalise both splits in place with the training set's mean and std, and wrap them."""
    mean, std = train_x.mean(), train_x.std()
    return ImageDataset(
        train=TensorDataset(train_x.sub_(mean).div_(std), train_y),
        test=TensorDataset(test_x.sub_(mean).div_(std), test_y),
        name=name,
        num_classes=int(torch.cat([train_y, test_y]).max()) + 1,
        image_shape=tuple(train_x.shape[1:]),
    )
