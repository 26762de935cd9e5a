"""Load a dataset by name into uint8 tensors, with seeded class-balanced subsets.

Every dataset comes back as a :class:`DataBundle`: CPU ``uint8`` images (``N x C x H x W``) with
``int64`` labels for train, test and the optional validation and calibration splits, plus the
class names and the per-channel mean and std that the models normalise with. The number of
classes is always read from the data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ask.config.schema import RESIZE_RECIPES, DatasetConfig
from ask.data.augment import resize_uint8, to_float
from ask.data.splits import ImageSplit, balanced_indices, complement, purpose_generator
from ask.errors import ConfigError, DataError

log = logging.getLogger(__name__)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    """A loaded dataset: splits, class names and normalisation statistics.

    ``val`` and ``calib`` are carved out of the training split (disjoint from ``train`` and from
    each other) when ``dataset.val_per_class`` / ``dataset.calib_per_class`` are positive.
    """

    name: str
    classes: list[str]
    train: ImageSplit
    test: ImageSplit
    val: ImageSplit | None
    calib: ImageSplit | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[2])

    def sizes(self) -> dict[str, int]:
        """Number of images per split (0 for an absent split), for logs and result files."""
        return {
            "train": len(self.train),
            "test": len(self.test),
            "val": len(self.val) if self.val is not None else 0,
            "calib": len(self.calib) if self.calib is not None else 0,
        }


# A loader returns (classes, full training split, full test split, mean, std).
Loader = Callable[
    [DatasetConfig, Path, bool],
    tuple[list[str], ImageSplit, ImageSplit, tuple[float, ...], tuple[float, ...]],
]


def _resized(split: ImageSplit, size: int | None) -> ImageSplit:
    if size is None or tuple(split.images.shape[-2:]) == (size, size):
        return split
    return ImageSplit(resize_uint8(split.images, size), split.labels)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = to_float(images).double().transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def _load_digits(cfg: DatasetConfig, cache_dir: Path, progress: bool):
    from ask.data.digits import load_digits_splits

    classes, train, test = load_digits_splits()
    train, test = _resized(train, cfg.image_size), _resized(test, cfg.image_size)
    mean, std = _channel_stats(train.images)  # from the fixed training split, not the subset
    return classes, train, test, mean, std


def _root(cfg: DatasetConfig, layout: str) -> Path:
    if cfg.root is None or str(cfg.root).strip() in ("", "???"):
        raise DataError(f"dataset.root is not set for {cfg.name}; set dataset.root=/path/to/{layout}")
    return Path(cfg.root).expanduser()


def _load_cifar10(cfg: DatasetConfig, cache_dir: Path, progress: bool):
    from ask.data.cifar import load_cifar10

    root = _root(cfg, "the folder that holds cifar-10-batches-py")
    classes, train, test = load_cifar10(root, cfg.download)
    return (
        classes,
        _resized(train, cfg.image_size),
        _resized(test, cfg.image_size),
        CIFAR10_MEAN,
        CIFAR10_STD,
    )


@dataclass(frozen=True)
class FolderPreset:
    """What a named image-folder dataset fixes: its split folders, statistics, and whether its
    images come in many sizes (so dataset.image_size is required)."""

    splits: tuple[str, str] = ("train", "test")
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    needs_size: bool = False


# The generic ``folder`` and its presets; a preset's field yields to the config's when that is set.
FOLDER_PRESETS = {
    "folder": FolderPreset(),
    "cifar10_folder": FolderPreset(("train", "test"), CIFAR10_MEAN, CIFAR10_STD),
    "imagenet": FolderPreset(("train", "val"), IMAGENET_MEAN, IMAGENET_STD, needs_size=True),
    "imagenette": FolderPreset(("train", "val"), IMAGENET_MEAN, IMAGENET_STD, needs_size=True),
}


def _load_folder(cfg: DatasetConfig, cache_dir: Path, progress: bool):
    """An ImageFolder tree ``<root>/<splits[0]>/<class>/*`` and ``<root>/<splits[1]>/<class>/*``:
    classes from the tree, statistics from the config, the preset or the training split."""
    from ask.data.folders import load_folder_splits

    preset = FOLDER_PRESETS[cfg.name]
    if preset.needs_size and cfg.image_size is None:
        raise DataError(f"{cfg.name} images come in many sizes; set dataset.image_size (e.g. 128 or 224)")
    splits = tuple(cfg.splits) if cfg.splits is not None else preset.splits
    scale = RESIZE_RECIPES[cfg.resize]
    if scale != 1.0 and cfg.image_size is None:
        raise DataError(f"dataset.resize={cfg.resize} needs dataset.image_size (e.g. 224)")
    short_side = None if scale == 1.0 else round(cfg.image_size * scale)
    classes, train, test = load_folder_splits(
        cfg.name, cfg.root, (splits[0], splits[1]), cfg.image_size, cache_dir, cfg.cache, progress,
        short_side=short_side,
    )
    if cfg.mean is not None:
        return classes, train, test, tuple(cfg.mean), tuple(cfg.std)
    if preset.mean is not None:
        return classes, train, test, preset.mean, preset.std
    mean, std = channel_stats_chunked(train.images)
    log.info("dataset %s: mean %s, std %s from its %d training images (set dataset.mean and dataset.std to fix them)",
             cfg.name, [round(v, 4) for v in mean], [round(v, 4) for v in std], len(train))
    return classes, train, test, mean, std


def channel_stats_chunked(images: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 ``images`` in [0, 1] units, read ``chunk``
    images at a time (a memory-mapped ImageNet split is never held in RAM as floats)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):
        x = (images[start:start + chunk].to(torch.float64) / 255).transpose(0, 1).reshape(channels, -1)
        total += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    if count < 2:
        raise DataError("the training split has too few pixels to compute dataset.mean and dataset.std; set both")
    mean = total / count
    var = ((squares - count * mean * mean) / (count - 1)).clamp_min(0)
    return tuple(mean.tolist()), tuple(var.sqrt().clamp_min(1e-6).tolist())


LOADERS: dict[str, Loader] = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    **{name: _load_folder for name in FOLDER_PRESETS},
}


def _take(
    split: ImageSplit,
    pool: torch.Tensor,
    per_class: int,
    seed: int,
    purpose: str,
    what: str,
    classes: list[str],
    note: str = "",
) -> torch.Tensor:
    """Indices into ``split`` of ``per_class`` images per class drawn from ``pool``."""
    try:
        picked = balanced_indices(
            split.labels[pool], per_class, purpose_generator(seed, purpose), what, classes
        )
    except DataError as exc:
        raise DataError(f"{exc}{note}") from None
    return pool[picked]


def load_dataset(cfg: DatasetConfig, cache_dir: str | Path, seed: int, progress: bool = True) -> DataBundle:
    """Load ``cfg.name`` and draw the seeded class-balanced subsets.

    Order of the draws: ``val_per_class`` then ``calib_per_class`` images per class from the full
    training split, then ``train_per_class`` per class from what is left (None keeps all of it);
    ``test_per_class`` per class from the test split (None keeps all). Each draw has its own
    random stream derived from ``seed``, so for one seed the test subset does not depend on the
    training-side sizes.

    Raises:
        ConfigError: unknown ``cfg.name``.
        DataError: missing or malformed data, or a class with too few images for a subset.
    """
    loader = LOADERS.get(cfg.name)
    if loader is None:
        raise ConfigError(f"dataset.name={cfg.name!r} is not one of {', '.join(sorted(LOADERS))}")
    cache_path = Path(cache_dir).expanduser()
    classes, full_train, full_test, mean, std = loader(cfg, cache_path, progress)
    if full_train.images.shape[1:] != full_test.images.shape[1:]:
        raise DataError(
            f"{cfg.name} training images are {tuple(full_train.images.shape[1:])} but test images "
            f"are {tuple(full_test.images.shape[1:])}; set dataset.image_size to resize both"
        )
    for split_name, split in (("training", full_train), ("test", full_test)):
        if len(split) == 0:
            raise DataError(f"the {cfg.name} {split_name} split is empty; check dataset.root")

    pool = torch.arange(len(full_train))
    held_out = (
        ""
        if not (cfg.val_per_class or cfg.calib_per_class)
        else (" (counting only the images left after dataset.val_per_class/calib_per_class were held out)")
    )
    val = calib = None
    if cfg.val_per_class > 0:
        val_idx = _take(full_train, pool, cfg.val_per_class, seed, "val", "dataset.val_per_class", classes)
        val = full_train.subset(val_idx)
        pool = pool[complement(len(pool), torch.searchsorted(pool, val_idx))]
    if cfg.calib_per_class > 0:
        calib_idx = _take(
            full_train, pool, cfg.calib_per_class, seed, "calib", "dataset.calib_per_class", classes, held_out
        )
        calib = full_train.subset(calib_idx)
        pool = pool[complement(len(pool), torch.searchsorted(pool, calib_idx))]
    if cfg.train_per_class is not None:
        pool = _take(
            full_train, pool, cfg.train_per_class, seed, "train", "dataset.train_per_class", classes, held_out
        )
    train = full_train if len(pool) == len(full_train) else full_train.subset(pool)

    test = full_test
    if cfg.test_per_class is not None:
        test_idx = _take(
            full_test,
            torch.arange(len(full_test)),
            cfg.test_per_class,
            seed,
            "test",
            "dataset.test_per_class",
            classes,
        )
        test = full_test.subset(test_idx)

    bundle = DataBundle(
        cfg.name,
        list(classes),
        train,
        test,
        val,
        calib,
        tuple(float(m) for m in mean),
        tuple(float(s) for s in std),
    )
    log.info(
        "dataset %s: %d classes, %dx%dx%d images, sizes %s",
        cfg.name,
        bundle.num_classes,
        bundle.in_channels,
        bundle.image_size,
        train.images.shape[3],
        bundle.sizes(),
    )
    return bundle
