"""CIFAR-10 in torchvision's layout, read straight from its python pickles.

``<root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``. torchvision's own
class is only used to download (when the user asks for it): it checks md5 sums, which rules out
re-packed copies and test fixtures.
"""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ask.data.splits import ImageSplit
from ask.errors import DataError

log = logging.getLogger(__name__)

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILES = ("test_batch",)
META_FILE = "batches.meta"


def _missing(base: Path) -> list[str]:
    return [name for name in (*TRAIN_FILES, *TEST_FILES, META_FILE) if not (base / name).is_file()]


def _download(root: Path) -> None:
    from torchvision.datasets import CIFAR10

    log.info("downloading CIFAR-10 into %s", root)
    try:
        CIFAR10(str(root), train=True, download=True)
    except Exception as exc:  # network errors, md5 mismatch, disk full, ...
        raise DataError(
            f"downloading CIFAR-10 into '{root}' failed ({type(exc).__name__}: {exc}); "
            f"check the network, or download it by hand so that '{root / FOLDER}' exists"
        ) from exc


def _get(entry: dict[Any, Any], key: str, path: Path) -> Any:
    # Pickles written by Python 2 (the official files) have bytes keys; re-packed ones may not.
    for candidate in (key.encode(), key):
        if candidate in entry:
            return entry[candidate]
    raise DataError(f"'{path}' has no '{key}' entry; it is not a CIFAR-10 batch file")


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as handle:
            # The CIFAR-10 batches are pickled dicts of numpy arrays; the user points us at them.
            entry = pickle.load(handle, encoding="bytes")
    except Exception as exc:
        raise DataError(
            f"cannot read CIFAR-10 file '{path}' ({type(exc).__name__}: {exc}); "
            "replace it with an intact copy"
        ) from exc
    if not isinstance(entry, dict):
        raise DataError(f"'{path}' is not a CIFAR-10 batch file (no dict inside)")
    return entry


def _read_batches(base: Path, names: tuple[str, ...]) -> ImageSplit:
    images, labels = [], []
    for name in names:
        path = base / name
        entry = _unpickle(path)
        data = np.asarray(_get(entry, "data", path), dtype=np.uint8)
        targets = np.asarray(_get(entry, "labels", path), dtype=np.int64)
        side = math.isqrt(data.shape[1] // 3) if data.ndim == 2 else 0
        if data.ndim != 2 or data.shape[1] != 3 * side * side or len(targets) != len(data):
            raise DataError(
                f"'{path}' holds data of shape {data.shape} with {len(targets)} labels; "
                "expected N x 3072 pixels (3 x 32 x 32) and N labels"
            )
        images.append(torch.from_numpy(data.reshape(-1, 3, side, side)))
        labels.append(torch.from_numpy(targets))
    if len({tuple(part.shape[1:]) for part in images}) > 1:
        raise DataError(f"the batch files under '{base}' hold images of different sizes")
    return ImageSplit(torch.cat(images).contiguous(), torch.cat(labels))


def load_cifar10(root: Path, download: bool) -> tuple[list[str], ImageSplit, ImageSplit]:
    """Return ``(classes, train, test)`` read from ``root/cifar-10-batches-py``."""
    base = root / FOLDER
    missing = _missing(base)
    if missing and download:
        _download(root)
        missing = _missing(base)
    if missing:
        if not base.is_dir():
            raise DataError(
                f"CIFAR-10 not found under '{root}' (no {FOLDER}); point dataset.root at the "
                "folder that holds it, or add dataset.download=true"
            )
        raise DataError(
            f"CIFAR-10 under '{base}' is incomplete (missing {', '.join(missing)}); restore the "
            "files, or delete the folder and add dataset.download=true"
        )
    meta_path = base / META_FILE
    classes = [
        name.decode() if isinstance(name, bytes) else str(name)
        for name in _get(_unpickle(meta_path), "label_names", meta_path)
    ]
    train = _read_batches(base, TRAIN_FILES)
    test = _read_batches(base, TEST_FILES)
    for split_name, split in (("training", train), ("test", test)):
        if len(split) and (int(split.labels.max()) >= len(classes) or int(split.labels.min()) < 0):
            raise DataError(
                f"CIFAR-10 {split_name} labels under '{base}' go beyond the {len(classes)} "
                f"label_names in {META_FILE}; the files do not belong together"
            )
    return classes, train, test
