"""Datasets for examples, tests and benchmarks."""

from sparsekit.data.idx import read_idx
from sparsekit.data.images import ImageDataset, load_image_dataset
from sparsekit.data.reber import SYMBOLS, ReberData, reber, reber_accuracy

__all__ = [
    "SYMBOLS", "ImageDataset", "ReberData", "load_image_dataset", "read_idx", "reber",
    "reber_accuracy",
]
