"""Datasets for examples, tests and benchmarks."""

from sparsekit.data.idx import read_idx
from sparsekit.data.images import ImageDataset, load_image_dataset

__all__ = ["ImageDataset", "load_image_dataset", "read_idx"]
