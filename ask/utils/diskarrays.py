"""Directories of ``.npy`` arrays filled chunk by chunk and published by one rename.

Large caches (a reference pool's features, a decoded image folder) never sit in RAM whole: the
writer preallocates each ``.npy`` file, fills it with positional writes (``pwrite``, safe from
several threads) and readers map it lazily. A cache is built in a temporary sibling directory
and renamed into place only when complete, so a reader sees the old cache, none, or the new
one, never a half-written one; temporaries of killed builds are removed by the next build.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
from pathlib import Path

import numpy as np

from ask.utils.io import fsync_dir

log = logging.getLogger(__name__)


def temporary_sibling(target: Path) -> Path:
    """Create and return an empty directory beside ``target`` named after this host and process."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    return tmp


def allocate_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype | str) -> int:
    """Create ``path`` as a sparse ``.npy`` of ``shape`` and return the byte offset of its data."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=shape)
    offset = int(array.offset)
    del array  # nothing was written through the map, so nothing is resident
    return offset


def open_mapped(path: Path) -> np.ndarray:
    """A ``.npy`` file as a copy-on-write memory map: pages load on access, and a consumer that
    writes into the array changes its own copy, never the cache."""
    return np.load(path, mmap_mode="c")


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (plain writes: dirty mapped pages would count as memory)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete a cache directory, or a file left where one belongs (an older single-file cache)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def publish_dir(tmp: Path, target: Path) -> None:
    """Make the complete directory ``tmp`` durable and put it at ``target`` in one rename."""
    for entry in tmp.iterdir():
        fsync_path(entry)
    # os.replace cannot overwrite a non-empty directory: move the old one aside first.
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        remove_tree(old)
    fsync_dir(target.parent)
    remove_dead_temporaries(target)


def remove_dead_temporaries(target: Path) -> None:
    """Delete temporaries of ``target`` left by killed builds on this host (their pid is gone)."""
    host = socket.gethostname()
    for entry in target.parent.glob(f".{target.name}.tmp-*"):
        parts = entry.name[len(f".{target.name}.tmp-") :].rsplit("-", 2)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        if not _pid_alive(int(parts[1])):
            log.info("removing %s, left behind by a killed build", entry)
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
