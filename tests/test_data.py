"""Datasets, subsets, caching and augmentation on small generated fixtures and sklearn's digits."""

from __future__ import annotations

import logging
import os
import pickle
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ask.data.decoding as decoding
from ask.config.schema import DatasetConfig
from ask.data import (
    DataBundle,
    ImageSplit,
    augment_batch,
    balanced_indices,
    load_dataset,
    to_float,
)
from ask.data.datasets import CIFAR10_MEAN, CIFAR10_STD
from ask.errors import ConfigError, DataError
from ask.utils.io import LoadError, atomic_save, safe_load
from tests.conftest import npy_data_offset, zero_in_place, zero_torch_record


def _rows(split: ImageSplit) -> Counter:
    """Multiset of (image bytes, label), to compare splits without relying on order."""
    return Counter(
        (img.numpy().tobytes(), int(lab)) for img, lab in zip(split.images, split.labels, strict=True)
    )


# --------------------------------------------------------------------------------------------
# digits


def test_digits_shapes_split_and_pixels(tmp_path):
    from sklearn.datasets import load_digits

    bundle = load_dataset(DatasetConfig(name="digits"), tmp_path, seed=0, progress=False)
    assert isinstance(bundle, DataBundle)
    assert bundle.classes == [str(i) for i in range(10)]
    assert (bundle.num_classes, bundle.in_channels, bundle.image_size) == (10, 1, 8)
    assert bundle.train.images.shape[1:] == (1, 8, 8) and bundle.train.images.dtype == torch.uint8
    assert bundle.train.labels.dtype == torch.int64
    assert (len(bundle.train), len(bundle.test)) == (1257, 540)
    assert bundle.val is None and bundle.calib is None

    total = torch.bincount(bundle.train.labels, minlength=10) + torch.bincount(
        bundle.test.labels, minlength=10
    )
    test_share = torch.bincount(bundle.test.labels, minlength=10) / total
    assert torch.all((test_share > 0.27) & (test_share < 0.33))

    # Every image is an sklearn digit scaled by 255/16, with its own label; together, all of them.
    raw = load_digits()
    expected = Counter(
        (np.rint(img * 255 / 16).astype(np.uint8)[None].tobytes(), int(t))
        for img, t in zip(raw.images, raw.target, strict=True)
    )
    assert _rows(bundle.train) + _rows(bundle.test) == expected
    assert int(bundle.train.images.max()) == 255

    x = bundle.train.images.double() / 255
    assert bundle.mean == pytest.approx((x.mean().item(),))
    assert bundle.std == pytest.approx((x.std().item(),))


def test_digits_split_is_fixed_across_seeds(tmp_path):
    a = load_dataset(DatasetConfig(name="digits"), tmp_path, seed=0, progress=False)
    b = load_dataset(DatasetConfig(name="digits"), tmp_path, seed=123, progress=False)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.mean == b.mean


def test_digits_subsets_exact_counts_and_disjoint(tmp_path):
    full = load_dataset(DatasetConfig(name="digits"), tmp_path, seed=0, progress=False)
    cfg = DatasetConfig(
        name="digits", train_per_class=20, test_per_class=7, val_per_class=5, calib_per_class=9
    )
    bundle = load_dataset(cfg, tmp_path, seed=3, progress=False)
    for split, n in ((bundle.train, 20), (bundle.test, 7), (bundle.val, 5), (bundle.calib, 9)):
        assert torch.bincount(split.labels, minlength=10).tolist() == [n] * 10
    # val, calib and train together never use a training image more often than it exists.
    used = _rows(bundle.train) + _rows(bundle.val) + _rows(bundle.calib)
    assert not used - _rows(full.train)
    assert not _rows(bundle.test) - _rows(full.test)

    again = load_dataset(cfg, tmp_path, seed=3, progress=False)
    assert torch.equal(again.train.images, bundle.train.images)
    assert torch.equal(again.calib.images, bundle.calib.images)
    other = load_dataset(cfg, tmp_path, seed=4, progress=False)
    assert not torch.equal(other.train.images, bundle.train.images)
    # The evaluated test points do not move when only the training-side sizes change.
    resized = load_dataset(
        DatasetConfig(name="digits", train_per_class=30, test_per_class=7), tmp_path, seed=3, progress=False
    )
    assert torch.equal(resized.test.images, bundle.test.images)


def test_digits_too_many_per_class(tmp_path):
    with pytest.raises(DataError, match=r"dataset.train_per_class=500 .*class '\d' has only \d+"):
        load_dataset(DatasetConfig(name="digits", train_per_class=500), tmp_path, 0, progress=False)
    with pytest.raises(DataError, match="dataset.test_per_class"):
        load_dataset(DatasetConfig(name="digits", test_per_class=100), tmp_path, 0, progress=False)


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(ConfigError, match="cifar10, cifar10_folder, digits, folder, imagenet, imagenette"):
        load_dataset(DatasetConfig(name="mnist"), tmp_path, 0, progress=False)


# --------------------------------------------------------------------------------------------
# CIFAR-10, torchvision layout


def _write_cifar(root: Path, per_batch: int = 6, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 3, size=per_batch)]
        with open(base / name, "wb") as handle:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, handle, protocol=2)
        written[name] = (data, labels)
    with open(base / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": [b"cat", b"dog", b"frog"], b"num_vis": 3072}, handle, protocol=2)
    return written


def test_cifar10_fixture_pixels_and_labels(tmp_path):
    written = _write_cifar(tmp_path / "c10")
    cfg = DatasetConfig(name="cifar10", root=str(tmp_path / "c10"))
    bundle = load_dataset(cfg, tmp_path / "cache", seed=0, progress=False)
    assert bundle.classes == ["cat", "dog", "frog"] and bundle.num_classes == 3
    assert bundle.train.images.shape == (30, 3, 32, 32) and bundle.test.images.shape == (6, 3, 32, 32)
    assert bundle.mean == (0.4914, 0.4822, 0.4465)

    # Row r of data_batch_2 is training image 6 + r; pixel (c, y, x) sits at c*1024 + y*32 + x.
    data, labels = written["data_batch_2"]
    assert int(bundle.train.images[6 + 4, 2, 5, 17]) == int(data[4, 2 * 1024 + 5 * 32 + 17])
    assert bundle.train.labels[6:12].tolist() == labels
    test_data, test_labels = written["test_batch"]
    assert torch.equal(bundle.test.images.reshape(6, -1), torch.from_numpy(test_data))
    assert bundle.test.labels.tolist() == test_labels


def test_cifar10_missing_never_downloads(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise AssertionError("network touched")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    cfg = DatasetConfig(name="cifar10", root=str(tmp_path / "nothing"))
    with pytest.raises(DataError, match=r"CIFAR-10 not found under .*nothing.*dataset.download=true"):
        load_dataset(cfg, tmp_path, 0, progress=False)
    with pytest.raises(DataError, match="dataset.root"):
        load_dataset(DatasetConfig(name="cifar10"), tmp_path, 0, progress=False)

    _write_cifar(tmp_path / "partial")
    (tmp_path / "partial" / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="missing data_batch_3"):
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path / "partial")), tmp_path, 0)

    _write_cifar(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="test_batch"):
        load_dataset(DatasetConfig(name="cifar10", root=str(tmp_path / "corrupt")), tmp_path, 0)


def test_cifar10_download_only_when_asked(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    class FakeCIFAR10:
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            _write_cifar(Path(root))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    cfg = DatasetConfig(name="cifar10", root=str(tmp_path / "dl"), download=True)
    bundle = load_dataset(cfg, tmp_path, 0, progress=False)
    assert calls == [(str(tmp_path / "dl"), True)] and len(bundle.train) == 30
    load_dataset(cfg, tmp_path, 0, progress=False)  # files now present: no second download
    assert len(calls) == 1


# --------------------------------------------------------------------------------------------
# ImageFolder trees


def _colour(label: int, j: int) -> tuple[int, int, int]:
    return (40 * label + j, 200 - 50 * label, 7 * j + 3)


def _write_tree(root: Path, splits: dict[str, dict[str, int]], size=(8, 8)) -> None:
    """Solid-colour PNGs; the colour encodes the class index (sorted order) and file number."""
    for split, classes in splits.items():
        for label, (name, count) in enumerate(sorted(classes.items())):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(count):
                Image.new("RGB", size, _colour(label, j)).save(folder / f"{j:03d}.png")


def _check_colours(split: ImageSplit, counts: list[int]) -> None:
    assert split.labels.tolist() == [c for c, n in enumerate(counts) for _ in range(n)]
    position = 0
    for label, n in enumerate(counts):
        for j in range(n):
            img = split.images[position]
            expected = torch.tensor(_colour(label, j), dtype=torch.uint8)[:, None, None]
            assert torch.equal(img, expected.expand_as(img))
            position += 1


def test_cifar10_folder_pixels_labels_and_cache(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    _write_tree(root, {"train": {"bird": 4, "ant": 3, "cow": 5}, "test": {"ant": 2, "bird": 2, "cow": 2}})
    cfg = DatasetConfig(name="cifar10_folder", root=str(root))
    bundle = load_dataset(cfg, tmp_path / "cache", seed=0, progress=False)
    assert bundle.classes == ["ant", "bird", "cow"]
    assert bundle.train.images.shape == (12, 3, 8, 8) and bundle.image_size == 8
    _check_colours(bundle.train, [3, 4, 5])
    _check_colours(bundle.test, [2, 2, 2])
    assert bundle.std == (0.2470, 0.2435, 0.2616)
    (cached,) = (tmp_path / "cache" / "datasets").iterdir()
    assert cached.name.startswith("cifar10_folder-")
    assert sorted(p.name for p in cached.iterdir()) == [
        "checksums.json", "meta.json", "test-images.npy", "test-labels.npy", "train-images.npy", "train-labels.npy"]
    assert np.array_equal(np.load(cached / "train-images.npy"), bundle.train.images.numpy())

    def broken(path, size, short_side=None):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decoding, "decode_image", broken)
    again = load_dataset(cfg, tmp_path / "cache", seed=0, progress=False)
    assert torch.equal(again.train.images, bundle.train.images)
    assert torch.equal(again.test.labels, bundle.test.labels)

    # A new file changes the fingerprint: the stale cache entry is not used.
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "test" / "cow" / "zzz.png")
    with pytest.raises(DataError, match="decoded again"):
        load_dataset(cfg, tmp_path / "cache", seed=0, progress=False)


def _truncate(images: Path) -> str:
    size = images.stat().st_size
    images.write_bytes(images.read_bytes()[:-5])  # as by a full disk or a cut copy
    return f"its train-images.npy has {size - 5} bytes, not the {size} written"


def _zero_pixels(images: Path) -> str:
    zero_in_place(images, npy_data_offset(images))  # same size, same header: only the pixels are gone
    assert np.load(images).max() == 0
    return "its train-images.npy does not match the checksum recorded when it was written (changed or corrupted since)"


def _drop_checksums(images: Path) -> str:
    (images.parent / "checksums.json").unlink()  # as an entry from before checksums were recorded
    return "its checksums.json is missing or unreadable, so its content cannot be checked"


@pytest.mark.parametrize("damage", [_truncate, _zero_pixels, _drop_checksums], ids=lambda f: f.__name__[1:])
def test_folder_corrupt_cache_is_rebuilt(tmp_path, caplog, damage):
    root = tmp_path / "tree"
    _write_tree(root, {"train": {"a": 2, "b": 2}, "test": {"a": 1, "b": 1}})
    cfg = DatasetConfig(name="cifar10_folder", root=str(root))
    decoded = load_dataset(cfg, tmp_path / "cache", seed=0, progress=False).train.images.clone()
    (cache_dir,) = (tmp_path / "cache" / "datasets").iterdir()
    images = cache_dir / "train-images.npy"
    reason = damage(images)
    with caplog.at_level(logging.WARNING, logger="ask.data.folders"):
        second = load_dataset(cfg, tmp_path / "cache", seed=0, progress=False)
    assert f"ignoring the dataset cache {cache_dir}: {reason}; rebuilding it" in caplog.text
    assert torch.equal(second.train.images, decoded)
    assert np.array_equal(np.load(images), decoded.numpy())  # rewritten intact
    assert [p.name for p in (tmp_path / "cache" / "datasets").iterdir()] == [cache_dir.name]
    assert (cache_dir / "checksums.json").is_file()


def _solid_bmp_tree(root: Path, per_class: int = 2) -> None:
    """Solid-colour BMPs: every 8x8 BMP has the same byte size, whatever its pixels."""
    for split in ("train", "test"):
        for label, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for j in range(per_class):
                Image.new("RGB", (8, 8), _colour(label, j)).save(root / split / name / f"{j}.bmp")


def test_a_folder_image_replaced_by_one_of_the_same_size_is_decoded_again(tmp_path, caplog):
    root = tmp_path / "tree"
    _solid_bmp_tree(root)
    cfg = DatasetConfig(name="cifar10_folder", root=str(root))
    assert torch.equal(load_dataset(cfg, tmp_path / "cache", 0, progress=False).train.images[1],
                       torch.tensor(_colour(0, 1), dtype=torch.uint8)[:, None, None].expand(3, 8, 8))
    target = root / "train" / "a" / "1.bmp"
    before = target.stat()

    # Rewritten in place with its times put back, as `cp -p` does: size, mtime and inode stay.
    replacement = tmp_path / "replacement.bmp"
    Image.new("RGB", (8, 8), (9, 99, 199)).save(replacement)
    target.write_bytes(replacement.read_bytes())
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = target.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)
    with caplog.at_level(logging.WARNING, logger="ask.data.folders"):
        again = load_dataset(cfg, tmp_path / "cache", 0, progress=False).train
    assert torch.equal(again.images[1], torch.tensor((9, 99, 199), dtype=torch.uint8)[:, None, None].expand(3, 8, 8))
    assert torch.equal(again.images[0], torch.tensor(_colour(0, 0), dtype=torch.uint8)[:, None, None].expand(3, 8, 8))
    assert f"the images under '{root}' changed since they were decoded into the cache" in caplog.text
    assert len(list((tmp_path / "cache" / "datasets").iterdir())) == 1  # the outdated decode is gone

    # Another file renamed over it, with the old modification time (rsync -a, cp -p then mv): a new inode.
    Image.new("RGB", (8, 8), (200, 0, 50)).save(replacement)
    os.utime(replacement, ns=(after.st_atime_ns, after.st_mtime_ns))
    os.replace(replacement, target)
    assert target.stat().st_size == before.st_size
    third = load_dataset(cfg, tmp_path / "cache", 0, progress=False).train
    assert torch.equal(third.images[1], torch.tensor((200, 0, 50), dtype=torch.uint8)[:, None, None].expand(3, 8, 8))


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".tif", "TIFF"), (".pgm", "PPM")])
def test_16_bit_greyscale_images_keep_their_high_byte(tmp_path, suffix, fmt):
    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    values = {}
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            pixels = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
            Image.fromarray(pixels).save(root / split / name / f"0{suffix}", format=fmt)
            values[split, name] = pixels
    assert Image.open(root / "train" / "a" / f"0{suffix}").mode in ("I;16", "I")  # what clipped to white
    bundle = load_dataset(DatasetConfig(name="cifar10_folder", root=str(root)), tmp_path / "cache", 0,
                          progress=False)
    for row, name in enumerate(("a", "b")):
        expected = torch.from_numpy((values["train", name] >> 8).astype(np.uint8))
        assert torch.equal(bundle.train.images[row], expected.expand(3, 8, 8))  # grey: all channels alike
    assert bundle.train.images.float().mean() < 200  # clipping made them 255 almost everywhere


def test_folder_cache_off_and_home_expansion(tmp_path, monkeypatch):
    root = tmp_path / "tree"
    _write_tree(root, {"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}})
    load_dataset(
        DatasetConfig(name="cifar10_folder", root=str(root), cache=False), tmp_path / "c1", 0, progress=False
    )
    assert not (tmp_path / "c1").exists()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    load_dataset(DatasetConfig(name="cifar10_folder", root=str(root)), "~/askcache", 0, progress=False)
    assert len(list((tmp_path / "home" / "askcache" / "datasets").iterdir())) == 1


def test_imagenette_resize_and_center_crop(tmp_path):
    import torchvision.transforms as T

    root = tmp_path / "nette"
    _write_tree(root, {"train": {"n01": 2, "n02": 3}, "val": {"n01": 1, "n02": 1}}, size=(20, 28))
    # One non-uniform image to check the resize and the crop against torchvision's own transforms.
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, size=(28, 20, 3), dtype=np.uint8))
    noise.save(root / "train" / "n02" / "999.png")
    cfg = DatasetConfig(name="imagenette", root=str(root), image_size=16)
    bundle = load_dataset(cfg, tmp_path / "cache", seed=0, progress=False)
    assert bundle.classes == ["n01", "n02"] and bundle.image_size == 16
    assert bundle.mean == (0.485, 0.456, 0.406)
    solid = ImageSplit(bundle.train.images[:5], bundle.train.labels[:5])
    _check_colours(solid, [2, 3])
    _check_colours(bundle.test, [1, 1])
    reference = T.Compose([T.Resize(16), T.CenterCrop(16), T.PILToTensor()])(noise)
    assert torch.equal(bundle.train.images[5], reference)
    assert bundle.train.labels[5] == 1

    with pytest.raises(DataError, match="dataset.image_size"):
        load_dataset(DatasetConfig(name="imagenette", root=str(root), image_size=None), tmp_path, 0)


def test_a_generic_folder_takes_its_classes_and_statistics_from_the_tree(tmp_path):
    root = tmp_path / "mine"
    _write_tree(root, {"train": {"x": 3, "y": 2}, "val": {"x": 1, "y": 1}})
    cfg = DatasetConfig(name="folder", root=str(root), splits=["train", "val"])
    bundle = load_dataset(cfg, tmp_path / "cache", seed=0, progress=False)
    assert bundle.classes == ["x", "y"] and bundle.num_classes == 2
    _check_colours(bundle.train, [3, 2])
    _check_colours(bundle.test, [1, 1])
    # Solid 8x8 images: the statistics over every training pixel, computed here directly.
    colours = torch.tensor([_colour(label, j) for label, n in enumerate([3, 2]) for j in range(n)]).double() / 255
    pixels = colours.repeat_interleave(64, dim=0)
    assert bundle.mean == pytest.approx(tuple(pixels.mean(0).tolist()), abs=1e-9)
    assert bundle.std == pytest.approx(tuple(pixels.std(0).tolist()), abs=1e-9)
    given = load_dataset(DatasetConfig(name="folder", root=str(root), splits=["train", "val"], mean=[0.5] * 3,
                                       std=[0.25] * 3), tmp_path / "cache", seed=0, progress=False)
    assert given.mean == (0.5, 0.5, 0.5) and given.std == (0.25, 0.25, 0.25)
    # The presets keep their own splits and statistics.
    _write_tree(tmp_path / "cifar", {"train": {"x": 2, "y": 2}, "test": {"x": 1, "y": 1}})
    preset = load_dataset(DatasetConfig(name="cifar10_folder", root=str(tmp_path / "cifar")), tmp_path / "cache", 0,
                          progress=False)
    assert preset.mean == CIFAR10_MEAN and preset.std == CIFAR10_STD
    with pytest.raises(ConfigError, match="dataset.splits"):
        DatasetConfig(name="folder", root=str(root), splits=["train"])


def test_resize256_crop224_is_torchvisions_resize_then_centre_crop(tmp_path):
    import torchvision.transforms as T

    root = tmp_path / "wide"
    _write_tree(root, {"train": {"a": 1, "b": 1}, "test": {"a": 1, "b": 1}}, size=(40, 30))
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(30, 40, 3), dtype=np.uint8))
    noise.save(root / "train" / "b" / "999.png")
    cfg = DatasetConfig(name="folder", root=str(root), image_size=16, resize="resize256_crop224")
    bundle = load_dataset(cfg, tmp_path / "cache", seed=0, progress=False)
    # 16 x 256/224 = 18.3: the short side goes to 18, then the centre 16 x 16 is kept.
    reference = T.Compose([T.Resize(18), T.CenterCrop(16), T.PILToTensor()])(noise)
    assert torch.equal(bundle.train.images[2], reference)
    plain = load_dataset(DatasetConfig(name="folder", root=str(root), image_size=16), tmp_path / "cache", 0,
                         progress=False)
    assert torch.equal(plain.train.images[2], T.Compose([T.Resize(16), T.CenterCrop(16), T.PILToTensor()])(noise))
    assert not torch.equal(plain.train.images[2], bundle.train.images[2])  # two recipes, two cache entries


def test_folder_errors(tmp_path):
    def load(name="cifar10_folder", root=None, **kw):
        return load_dataset(DatasetConfig(name=name, root=root, **kw), tmp_path / "cache", 0, progress=False)

    with pytest.raises(DataError, match="set dataset.root="):
        load()
    with pytest.raises(DataError, match="does not exist"):
        load(root=str(tmp_path / "absent"))

    mismatch = tmp_path / "mismatch"
    _write_tree(mismatch, {"train": {"a": 1, "b": 1, "c": 1}, "test": {"a": 1, "b": 1, "d": 1}})
    with pytest.raises(DataError, match=r"only in train: c; only in test: d"):
        load(root=str(mismatch))

    no_test = tmp_path / "no_test"
    _write_tree(no_test, {"train": {"a": 1}})
    with pytest.raises(DataError, match=r"no_test/test' does not exist"):
        load(root=str(no_test))
    with pytest.raises(DataError, match=r"no_test/val' does not exist"):
        load(name="imagenette", root=str(no_test), image_size=8)

    no_classes = tmp_path / "no_classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "test").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        load(root=str(no_classes))

    empty_class = tmp_path / "empty_class"
    _write_tree(empty_class, {"train": {"a": 1}, "test": {"a": 1}})
    (empty_class / "train" / "b").mkdir()
    (empty_class / "train" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"class folder\(s\) b under .*hold no images"):
        load(root=str(empty_class))

    mixed = tmp_path / "mixed"
    _write_tree(mixed, {"train": {"a": 2}, "test": {"a": 1}})
    Image.new("RGB", (9, 9)).save(mixed / "train" / "a" / "big.png")
    with pytest.raises(DataError, match="set dataset.image_size"):
        load(root=str(mixed))
    assert load(root=str(mixed), image_size=4).train.images.shape == (3, 3, 4, 4)

    broken = tmp_path / "broken"
    _write_tree(broken, {"train": {"a": 2}, "test": {"a": 1}})
    (broken / "train" / "a" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(DataError, match="cannot decode image .*bad.jpg"):
        load(root=str(broken))


# --------------------------------------------------------------------------------------------
# balanced_indices, ImageSplit


def test_balanced_indices_counts_and_errors():
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 2, 1, 2])
    idx = balanced_indices(labels, 3, torch.Generator().manual_seed(0), "dataset.x", ["a", "b", "c"])
    assert torch.equal(idx, torch.sort(idx).values) and len(set(idx.tolist())) == 9
    assert torch.bincount(labels[idx], minlength=3).tolist() == [3, 3, 3]
    same = balanced_indices(labels, 3, torch.Generator().manual_seed(0), "dataset.x", ["a", "b", "c"])
    assert torch.equal(idx, same)
    draws = {
        tuple(balanced_indices(labels, 2, torch.Generator().manual_seed(s), "x", ["a", "b", "c"]).tolist())
        for s in range(10)
    }
    assert len(draws) > 1
    assert len(balanced_indices(labels, 0, torch.Generator(), "x", ["a", "b", "c"])) == 0
    with pytest.raises(
        DataError,
        match=r"dataset.x=5 but class 'a' has only 4 images \(1 other class too\); lower dataset.x to at most 4",
    ):
        balanced_indices(labels, 5, torch.Generator(), "dataset.x", ["a", "b", "c"])
    with pytest.raises(DataError, match="class 'd' has only 0"):
        balanced_indices(labels, 1, torch.Generator(), "dataset.x", ["a", "b", "c", "d"])


def test_image_split_subset_and_validation():
    split = ImageSplit(
        torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2), torch.tensor([0, 1, 0, 1, 1])
    )
    sub = split.subset(torch.tensor([4, 0]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 0]
    assert torch.equal(sub.images[0], split.images[4]) and sub.images.is_contiguous()
    with pytest.raises(ValueError):
        ImageSplit(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------------------------
# augmentation


def test_to_float_range_and_device():
    x = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)
    y = to_float(x)
    assert y.dtype == torch.float32 and y.device == x.device
    assert torch.allclose(y, torch.tensor([0.0, 128 / 255, 1.0]).reshape(1, 1, 1, 3))


def _windows(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    padded = torch.nn.functional.pad(image[None], (pad,) * 4, mode="reflect")[0]
    h, w = image.shape[1:]
    return [padded[:, i : i + h, j : j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


def test_augment_batch_crop_flip():
    torch.manual_seed(0)
    x = torch.rand(16, 3, 16, 16)
    assert augment_batch(x, "none") is x

    out = augment_batch(x, "crop_flip", torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert 0 <= out.min() and out.max() <= 1
    assert not torch.equal(out, x)
    assert torch.equal(out, augment_batch(x, "crop_flip", torch.Generator().manual_seed(1)))

    flipped = 0
    for img, res in zip(x, out, strict=True):
        candidates = _windows(img, pad=2)  # 16 // 8
        plain = any(torch.equal(res, c) for c in candidates)
        mirrored = any(torch.equal(res, c.flip(2)) for c in candidates)
        assert plain or mirrored
        flipped += mirrored and not plain
    assert 0 < flipped < 16

    crop = augment_batch(x, "crop", torch.Generator().manual_seed(2))
    for img, res in zip(x, crop, strict=True):
        assert any(torch.equal(res, c) for c in _windows(img, pad=2))

    tiny = augment_batch(torch.rand(4, 1, 8, 8), "crop_flip", torch.Generator().manual_seed(0))
    assert tiny.shape == (4, 1, 8, 8)
    with pytest.raises(ConfigError):
        augment_batch(x, "rotate")


# --------------------------------------------------------------------------------------------
# ask.utils.io


def test_atomic_save_and_safe_load(tmp_path):
    path = tmp_path / "sub" / "obj.pt"
    atomic_save({"a": torch.arange(3), "b": [1, "x"]}, path)
    loaded = safe_load(path)
    assert torch.equal(loaded["a"], torch.arange(3)) and loaded["b"] == [1, "x"]
    assert [p.name for p in path.parent.iterdir()] == ["obj.pt"]  # no temporary left behind

    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(LoadError, match="obj.pt"):
        safe_load(path)
    with pytest.raises(LoadError):
        safe_load(tmp_path / "missing.pt")
    atomic_save({"w": torch.arange(1.0, 1001.0)}, path)
    record = zero_torch_record(path)  # torch.load alone returns zeros here
    with pytest.raises(LoadError, match=f"record {record} does not match its CRC-32") as raised:
        safe_load(path)
    assert raised.value.kind == "checksum"
    torch.save({"unsafe": Path("x")}, tmp_path / "unsafe.pt")  # not allowed under weights_only
    with pytest.raises(LoadError):
        safe_load(tmp_path / "unsafe.pt")
