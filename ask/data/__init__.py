"""Datasets as uint8 tensors, class-balanced subsets and batched augmentation."""

from ask.data.augment import augment_batch, to_float
from ask.data.datasets import DataBundle, load_dataset
from ask.data.splits import ImageSplit, balanced_indices, point_indices, select_points

__all__ = [
    "DataBundle",
    "ImageSplit",
    "augment_batch",
    "balanced_indices",
    "load_dataset",
    "point_indices",
    "select_points",
    "to_float",
]
