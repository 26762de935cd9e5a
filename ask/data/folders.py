"""ImageFolder trees (``<root>/<split>/<class>/<image>``) decoded into uint8 tensors, with a cache.

Decoding tens of thousands of JPEGs takes a while, so the decoded splits are saved once in the
directory ``<cache_dir>/datasets/<name>-<hash>/`` (``meta.json``, ``<split>-images.npy``,
``<split>-labels.npy``). The hash covers the absolute root, the target size and a cheap
fingerprint of the file list: each file's relative path, size, modification and change times and
inode, from the one ``stat`` per file that listing needs anyway (git's index checks the same
fields). Adding, removing or replacing an image, even by another of the same size (every BMP or
PPM of one shape), builds a new cache entry instead of silently serving stale pixels. The cached
arrays themselves are checked on load against the checksums recorded when they were written
(:func:`~ask.utils.diskarrays.verify_dir`): a cache file changed since is rebuilt.

With the cache on, pixels go from the decoder straight into the cache files and the splits are
memory maps of them: ImageNet's training split (193 GB at 224 px) needs disk, not RAM. Without
the cache a split is decoded into memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ask.data.decoding import decode_split
from ask.data.splits import ImageSplit
from ask.errors import DataError, os_error_message
from ask.utils.diskarrays import open_mapped, publish_dir, remove_tree, temporary_sibling, verify_dir

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_VERSION = 3  # bump when decoding.py's pixels (resize, crop, colour conversion) or the cache layout change


@dataclass
class SplitListing:
    """The image files of one split folder, in a fixed order (class, then file name).

    ``stats`` holds each file's ``(size, mtime_ns, ctime_ns, inode)``: a file replaced by another
    of the same size gets a new inode (written elsewhere, then renamed) or new times (rewritten
    in place; the change time cannot be set back, even by ``cp -p`` or ``touch``).
    """

    directory: Path
    classes: list[str]
    paths: list[str]
    labels: list[int]
    stats: list[tuple[int, int, int, int]]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{len(self.paths)}\n".encode())
        # Every path is "<directory>/<class>/<file>" as os.scandir built it, so the relative part
        # is a suffix; os.path.relpath cost 0.7 s of every CIFAR-10 run (60,000 files), this 0.06 s.
        prefix = len(os.path.join(str(self.directory), ""))
        digest.update("\n".join(path[prefix:] for path in self.paths).encode())
        # The numbers as one int64 block: formatted as text they cost 40 ms more per 50,000 files.
        digest.update(np.asarray(self.stats, dtype=np.int64).reshape(len(self.paths), 4).tobytes())
        return digest.hexdigest()


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def list_split(directory: Path, layout: str) -> SplitListing:
    """List ``directory/<class>/<image>``; classes are the sorted sub-folder names.

    Raises:
        DataError: the folder is missing, has no class folders, or a class folder has no images.
    """
    if not directory.is_dir():
        raise DataError(f"'{directory}' does not exist; the dataset must be laid out as {layout}")
    try:
        class_entries = sorted(
            (e for e in os.scandir(directory) if e.is_dir() and not e.name.startswith(".")),
            key=lambda e: e.name,
        )
    except OSError as exc:
        raise DataError(os_error_message(exc) or f"cannot read '{directory}' ({exc}); check its permissions") from exc
    if not class_entries:
        raise DataError(
            f"'{directory}' has no class sub-folders; put each class's images in its own "
            f"folder, laid out as {layout}"
        )
    classes, paths, labels, stats, empty = [], [], [], [], []
    for label, entry in enumerate(class_entries):
        classes.append(entry.name)
        files = sorted(
            (f for f in os.scandir(entry.path) if _is_image(f.name) and f.is_file()),
            key=lambda f: f.name,
        )
        if not files:
            empty.append(entry.name)
        for f in files:
            paths.append(f.path)
            labels.append(label)
            st = f.stat()
            stats.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(
            f"class folder(s) {shown} under '{directory}' hold no images "
            f"({', '.join(IMG_EXTENSIONS)}); add images or remove the empty folders"
        )
    return SplitListing(directory, classes, paths, labels, stats)


def _cache_path(
    cache_dir: Path, name: str, root: Path, size: int | None, listings: list[SplitListing],
    short_side: int | None = None,
) -> Path:
    digest = hashlib.sha256()
    # Without a separate short side the key is the one written before it existed: caches stay valid.
    recipe = f"{size}" if short_side is None else f"{size}@{short_side}"
    digest.update(f"v{CACHE_VERSION}|{name}|{root}|{recipe}".encode())
    for listing in listings:
        digest.update(f"|{listing.directory.name}:{listing.fingerprint()}".encode())
    return cache_dir / "datasets" / f"{name}-{digest.hexdigest()[:16]}"


def _remove_outdated_entries(cache_path: Path, name: str, root: Path, size: int | None,
                             short_side: int | None = None) -> None:
    """Delete the cache entries of ``root`` at ``size`` decoded from an earlier state of its files.

    Files added, removed or replaced give the folder a new entry; the old ones can never match
    again, and each holds a whole decoded copy (193 GB for ImageNet), so they go before the rebuild.
    """
    for entry in sorted(cache_path.parent.glob(f"{name}-*")):
        try:
            meta = json.loads((entry / "meta.json").read_text())
        except (OSError, ValueError):
            continue
        if (isinstance(meta, dict) and meta.get("version") == CACHE_VERSION and meta.get("root") == str(root)
                and meta.get("image_size") == size and meta.get("short_side") == short_side):
            log.warning("the images under '%s' changed since they were decoded into the cache %s; decoding them "
                        "again", root, entry)
            remove_tree(entry)


def _read_cache(
    directory: Path, split_names: tuple[str, str], listings: list[SplitListing], size: int | None,
    verify: bool = True,
) -> list[ImageSplit] | str:
    """The cached splits, or why the cache directory cannot be used (never raises).

    ``verify`` checks the files against the checksums recorded when they were written (not
    needed right after writing them).
    """
    try:
        meta = json.loads((directory / "meta.json").read_text())
        if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
            return "it was written in another format"
        if meta.get("classes") != listings[0].classes:
            return "its class list differs"
        changed = verify_dir(directory) if verify else None
        if changed is not None:
            return changed
        splits = []
        for split, listing in zip(split_names, listings, strict=True):
            labels = torch.from_numpy(np.load(directory / f"{split}-labels.npy"))
            images = torch.from_numpy(open_mapped(directory / f"{split}-images.npy"))
            if not torch.equal(labels, torch.tensor(listing.labels, dtype=torch.int64)):
                return f"its {split} labels differ"
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] != len(labels):
                return f"its {split} images are mis-shaped"
            if size is not None and tuple(images.shape[-2:]) != (size, size):
                return "its image size differs"
            splits.append(ImageSplit(images, labels))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return f"it is unreadable ({type(exc).__name__}: {exc})"
    return splits


def load_folder_splits(
    name: str,
    root: str | None,
    split_names: tuple[str, str],
    image_size: int | None,
    cache_dir: str | Path,
    use_cache: bool,
    progress: bool,
    short_side: int | None = None,
) -> tuple[list[str], ImageSplit, ImageSplit]:
    """Return ``(classes, train, test)`` from ``root/<train>`` and ``root/<test>`` class folders,
    resized as :func:`~ask.data.decoding.decode_image` says."""
    train_name, test_name = split_names
    layout = f"<root>/{train_name}/<class>/*.jpg and <root>/{test_name}/<class>/*.jpg"
    if root is None or str(root).strip() in ("", "???"):
        raise DataError(
            f"dataset.root is not set for {name}; set dataset.root=/path/to/data, a folder "
            f"laid out as {layout}"
        )
    try:
        root_path = Path(root).expanduser().resolve()
    except (OSError, RuntimeError):  # Python 3.11 raises RuntimeError for a loop of links
        raise DataError(f"dataset.root '{root}' is a loop of symbolic links; point dataset.root at the real folder, "
                        f"laid out as {layout}") from None
    if not root_path.is_dir():
        raise DataError(
            f"dataset.root '{root_path}' does not exist; point dataset.root at the folder laid "
            f"out as {layout}"
        )
    try:
        visible = [e.name for e in os.scandir(root_path) if not e.name.startswith(".")]
    except OSError as exc:
        raise DataError(os_error_message(exc)
                        or f"cannot read dataset.root '{root_path}' ({exc.strerror}); check its permissions") from exc
    if not visible:
        # Said apart from a missing split folder: an empty root usually means a wrong path or an unfinished copy.
        raise DataError(f"dataset.root '{root_path}' is empty; put the images there, laid out as {layout}")
    listings = [list_split(root_path / split, layout) for split in split_names]
    train_list, test_list = listings
    if train_list.classes != test_list.classes:
        only_train = sorted(set(train_list.classes) - set(test_list.classes))
        only_test = sorted(set(test_list.classes) - set(train_list.classes))
        raise DataError(
            f"class folders differ between '{train_list.directory}' and '{test_list.directory}' "
            f"(only in {train_name}: {', '.join(only_train) or '-'}; only in {test_name}: "
            f"{', '.join(only_test) or '-'}); give both splits the same class folders"
        )
    classes = train_list.classes

    if not use_cache:
        splits = [
            ImageSplit(decode_split(listing.paths, image_size, progress, desc=f"decode {name}/{split}",
                                    short_side=short_side),
                       torch.tensor(listing.labels, dtype=torch.int64))
            for split, listing in zip(split_names, listings, strict=True)
        ]
        return classes, splits[0], splits[1]

    cache_path = _cache_path(Path(cache_dir).expanduser(), name, root_path, image_size, listings, short_side)
    if cache_path.exists():
        cached = _read_cache(cache_path, split_names, listings, image_size)
        if not isinstance(cached, str):
            log.info("loaded %s from the cache %s", name, cache_path)
            return classes, cached[0], cached[1]
        log.warning("ignoring the dataset cache %s: %s; rebuilding it", cache_path, cached)
        remove_tree(cache_path)
    else:
        _remove_outdated_entries(cache_path, name, root_path, image_size, short_side)

    started = time.perf_counter()
    tmp = None
    try:
        tmp = temporary_sibling(cache_path)
        for split, listing in zip(split_names, listings, strict=True):
            decode_split(listing.paths, image_size, progress, f"decode {name}/{split}", out=tmp / f"{split}-images.npy",
                         short_side=short_side)
            np.save(tmp / f"{split}-labels.npy", np.asarray(listing.labels, dtype=np.int64))
        meta = {"version": CACHE_VERSION, "root": str(root_path), "image_size": image_size, "classes": classes,
                "splits": list(split_names)}
        if short_side is not None:
            meta["short_side"] = short_side
        (tmp / "meta.json").write_text(json.dumps(meta))
        publish_dir(tmp, cache_path)
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise DataError(
                f"cannot write the dataset cache {cache_path} ({exc.strerror or exc}); free space there, "
                "point cache_dir at another disk, or set dataset.cache=false to decode into memory"
            ) from exc
        raise
    log.info("decoded %d images of %s in %.1f s into the cache %s", sum(len(x.paths) for x in listings), name,
             time.perf_counter() - started, cache_path)
    cached = _read_cache(cache_path, split_names, listings, image_size, verify=False)
    if isinstance(cached, str):
        raise DataError(f"the dataset cache {cache_path} just written cannot be read back: {cached}")
    return classes, cached[0], cached[1]
