"""scikit-learn's bundled 8 x 8 handwritten digits (1,797 real images, no download)."""

from __future__ import annotations

import numpy as np
import torch

from ask.data.splits import ImageSplit

TEST_FRACTION = 0.3
SPLIT_SEED = 0  # the train/test split is part of the dataset, not of the run seed


def load_digits_splits() -> tuple[list[str], ImageSplit, ImageSplit]:
    """Return ``(classes, train, test)`` with a fixed stratified 70/30 split.

    Pixel values 0..16 become ``round(v * 255 / 16)`` so the images live on the same 0..255
    scale as every other dataset.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = torch.from_numpy(images)[:, None]  # N x 1 x 8 x 8
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)),
        test_size=TEST_FRACTION,
        stratify=bunch.target,
        random_state=SPLIT_SEED,
    )
    train_idx = torch.from_numpy(np.sort(train_idx))
    test_idx = torch.from_numpy(np.sort(test_idx))
    classes = [str(int(name)) for name in bunch.target_names]
    full = ImageSplit(images.contiguous(), labels)
    return classes, full.subset(train_idx), full.subset(test_idx)
