"""Feature matrices of a reference pool written chunk by chunk, on disk or in memory.

At ImageNet scale (1.28 M points x 512 dims is 2.6 GB in float32) the pool's features must never be
gathered in RAM before they are written: :class:`FeatureWriter` preallocates one ``.npy`` file per
layer and writes each chunk at its rows with ``os.pwrite``. Plain writes rather than a writable
memmap, because dirty pages of a memmap count in the process's resident set until the kernel
evicts them, so a memmapped build would *look* as big as the pool even though it is not.

A cache directory holds ``meta.json`` (the caller's key, layers, metric, dtype, sizes),
``labels.npy``, ``pool_indices.npy``, ``features-<i>.npy`` for the i-th layer and
``checksums.json`` (checked on every load, see :mod:`ask.utils.diskarrays`). It is written
into a temporary sibling (``.<name>.tmp-<host>-<pid>-<random>``) and renamed into place only when
complete, so a killed build leaves at most a temporary directory that is never read back.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ask.constants import FEATURE_DTYPES
from ask.utils.diskarrays import (
    allocate_npy,
    open_mapped,
    publish_dir,
    pwrite_all,
    temporary_sibling,
    verify_dir,
)

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # 3: checksums.json beside the arrays
META = "meta.json"


def feature_file(directory: Path, i: int) -> Path:
    # Layer names may hold dots or slashes; the file is named by position, meta.json maps it back.
    return directory / f"features-{i}.npy"


@dataclass
class FeatureFile:
    """Where a layer's [N, D] rows live inside an ``.npy`` file (for chunked reads)."""

    path: Path
    offset: int
    shape: tuple[int, int]
    dtype: np.dtype


class FeatureWriter:
    """Preallocated [n, D_layer] arrays filled chunk by chunk, plus labels and pool indices.

    With ``directory`` the arrays are ``.npy`` files in a temporary sibling of ``directory`` that
    :meth:`finish` renames into place; without it they are numpy arrays in memory (small pools,
    no cache). Dimensions are taken from the first chunk.
    """

    def __init__(self, n: int, layers: Sequence[str], dtype: str, directory: str | Path | None = None) -> None:
        if dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature dtype {dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")
        self.n = int(n)
        self.layers = tuple(layers)
        self.dtype = np.dtype(dtype)
        self.directory = None if directory is None else Path(directory).expanduser()
        self.rows_written = 0
        self.labels = np.empty(self.n, dtype=np.int64)
        self._files: dict[str, FeatureFile] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._fds: dict[str, int] = {}
        self.tmp: Path | None = None
        if self.directory is not None:
            self.tmp = temporary_sibling(self.directory)

    def write(self, features: Mapping[str, Any], labels: Any) -> None:
        """Append one chunk: ``features[layer]`` [B, ...] (torch or numpy) and ``labels`` [B]."""
        labels = _as_numpy(labels).reshape(-1)
        b = labels.shape[0]
        lo = self.rows_written
        if lo + b > self.n:
            raise ValueError(f"chunks hold more than the {self.n} rows announced")
        self.labels[lo : lo + b] = labels
        for i, layer in enumerate(self.layers):
            f = _as_numpy(features[layer])
            f = np.ascontiguousarray(f.reshape(f.shape[0], -1), dtype=self.dtype)
            if f.shape[0] != b:
                raise ValueError(f"layer {layer!r} chunk has {f.shape[0]} rows for {b} labels")
            if layer not in self._files and layer not in self._arrays:
                self._allocate(i, layer, f.shape[1])
            d = self._dim(layer)
            if f.shape[1] != d:
                raise ValueError(f"layer {layer!r} chunk has {f.shape[1]} features, earlier chunks {d}")
            if self.tmp is None:
                self._arrays[layer][lo : lo + b] = f
            else:
                info = self._files[layer]
                pwrite_all(self._fds[layer], f.tobytes(), info.offset + lo * d * self.dtype.itemsize)
        self.rows_written += b

    def _allocate(self, i: int, layer: str, d: int) -> None:
        if self.tmp is None:
            self._arrays[layer] = np.empty((self.n, d), dtype=self.dtype)
            return
        path = feature_file(self.tmp, i)
        offset = allocate_npy(path, (self.n, d), self.dtype)
        self._files[layer] = FeatureFile(path, offset, (self.n, d), self.dtype)
        self._fds[layer] = os.open(path, os.O_WRONLY)

    def _dim(self, layer: str) -> int:
        return self._arrays[layer].shape[1] if self.tmp is None else self._files[layer].shape[1]

    def finish(self, pool_indices: np.ndarray, meta: dict) -> dict[str, np.ndarray]:
        """Check that every row was written, then return the features (memmaps when on disk).

        On disk: labels, pool indices and ``meta.json`` (``meta`` plus sizes) are written, files
        fsynced, and the temporary directory replaces ``directory`` in one rename.
        """
        self._close()
        if self.rows_written != self.n:
            self.abort()
            raise ValueError(f"chunks held {self.rows_written} rows but {self.n} were announced")
        if self.tmp is None:
            return dict(self._arrays)
        assert self.directory is not None
        np.save(self.tmp / "labels.npy", self.labels)
        np.save(self.tmp / "pool_indices.npy", np.asarray(pool_indices, dtype=np.int64))
        meta = {
            **meta,
            "format": CACHE_FORMAT,
            "feature_dtype": self.dtype.name,
            "n": self.n,
            "layers": list(self.layers),
            "dims": [self._files[layer].shape[1] for layer in self.layers],
        }
        (self.tmp / META).write_text(json.dumps(meta, sort_keys=True))
        publish_dir(self.tmp, self.directory)
        self.tmp = None
        return {layer: open_features(self.directory, i) for i, layer in enumerate(self.layers)}

    def abort(self) -> None:
        """Drop a partial build (its temporary directory) after an error."""
        self._close()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def open_features(directory: Path, i: int) -> np.ndarray:
    """The i-th layer's features, memory-mapped (:func:`~ask.utils.diskarrays.open_mapped`)."""
    return open_mapped(feature_file(directory, i))


def read_cache(directory: Path, expect: dict) -> tuple[dict, np.ndarray, np.ndarray, list[np.ndarray]] | str:
    """``(meta, labels, pool_indices, features per layer)`` of a cache directory, or why it is unusable.

    ``expect`` holds the meta entries that must match (key, layers, metric, feature_dtype, n).
    Never raises for a bad cache: every problem comes back as a reason string.
    """
    if not directory.is_dir():
        return "it is not a feature-cache directory (an older cache format?)"
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, ValueError) as exc:
        return f"it is unreadable ({type(exc).__name__}: {exc})"
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        return "it was written in another cache format"
    if meta.get("key") != expect.get("key"):
        return "it was built for another model, pool or setting (stale key)"
    for name in ("layers", "metric", "feature_dtype", "n"):
        if meta.get(name) != expect.get(name):
            return f"its {name} differ ({meta.get(name)!r}, expected {expect.get(name)!r})"
    # Last, as it reads every byte: a stale key is refused without reading the features.
    changed = verify_dir(directory)
    if changed is not None:
        return changed
    try:
        labels = np.load(directory / "labels.npy")
        pool = np.load(directory / "pool_indices.npy")
        features = [open_features(directory, i) for i in range(len(meta["layers"]))]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"it is unreadable ({type(exc).__name__}: {exc})"
    n = int(meta["n"])
    if labels.shape != (n,) or pool.shape != (n,):
        return "its labels or pool indices are mis-shaped"
    for f, d in zip(features, meta.get("dims", []), strict=False):
        if f.ndim != 2 or f.shape != (n, d) or f.dtype.name != meta["feature_dtype"]:
            return "its feature files are mis-shaped"
    if len(meta.get("dims", [])) != len(features):
        return "its feature files are mis-shaped"
    return meta, labels, pool, features


def feature_file_info(array: np.ndarray) -> FeatureFile | None:
    """Where a memmapped feature array lives on disk (None for an in-memory array)."""
    if isinstance(array, np.memmap) and array.filename is not None and array.ndim == 2:
        return FeatureFile(Path(array.filename), int(array.offset), tuple(array.shape), array.dtype)
    return None


def read_rows(info: FeatureFile, lo: int, hi: int) -> np.ndarray:
    """Rows ``lo:hi`` read with plain file I/O, so a scan over the pool leaves nothing mapped."""
    d = info.shape[1]
    count = (hi - lo) * d
    with open(info.path, "rb") as handle:
        out = np.fromfile(handle, dtype=info.dtype, count=count, offset=info.offset + lo * d * info.dtype.itemsize)
    if out.size != count:
        raise OSError(f"{info.path} is shorter than its header says")
    return out.reshape(hi - lo, d)


def as_feature_tensor(f: Any) -> Tensor:
    """A [N, D] CPU tensor without copying a memmap; float16 stays float16, the rest float32."""
    if isinstance(f, np.ndarray):
        if f.dtype not in (np.float16, np.float32):
            f = f.astype(np.float32)
        t = torch.from_numpy(f)
    else:
        t = f.detach().to("cpu")
        if t.dtype != torch.float16:
            t = t.to(torch.float32)
    t = t.reshape(t.shape[0], -1)
    return t if t.is_contiguous() else t.contiguous()


def scan_rows(features: Tensor, info: FeatureFile | None, rows: Tensor | None,
              step: int) -> Iterator[tuple[int, Tensor]]:
    """``(position, features)`` chunks of ``step`` ``rows`` (default: all) of a layer's ``features``.

    A whole-pool scan of a cached store reads the file (``info``) with plain I/O: pages touched
    through the memory map would stay in this process's resident set, doubling the apparent
    memory of an index build.
    """
    total = features.shape[0] if rows is None else rows.numel()
    info = info if rows is None else None
    for lo in range(0, total, step):
        hi = min(total, lo + step)
        if info is not None:
            yield lo, torch.from_numpy(read_rows(info, lo, hi))
        elif rows is None:
            yield lo, features[lo:hi]
        else:
            yield lo, features[rows[lo:hi]]


def gather_rows(features: Tensor, info: FeatureFile | None, rows: Tensor, step: int) -> Tensor:
    """Features of many sorted ``rows`` (e.g. a training sample of 1 % of the pool).

    Through the memory map each scattered row would fault in a 64 KiB neighbourhood that then
    stays resident: a 64k-row sample mapped 1 GB. Reading the file (``info``) chunk by chunk and
    keeping the wanted rows costs one sequential pass instead.
    """
    if info is None or rows.numel() < 4096:
        return features[rows]
    parts = []
    for lo, f in scan_rows(features, info, None, step):
        hi = lo + f.shape[0]
        inside = rows[(rows >= lo) & (rows < hi)]
        if inside.numel():
            parts.append(f[inside - lo].clone())
    return torch.cat(parts)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        return x.detach().to("cpu").numpy()
    return np.asarray(x)
