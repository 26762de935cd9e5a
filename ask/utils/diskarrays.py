"""Directories of ``.npy`` arrays filled chunk by chunk and published by one rename.

Large caches (a reference pool's features, a decoded image folder) never sit in RAM whole: the
writer preallocates each ``.npy`` file, fills it with positional writes (``pwrite``, safe from
several threads) and readers map it lazily. A cache is built in a temporary sibling directory
and renamed into place only when complete, so a reader sees the old cache, none, or the new
one, never a half-written one; temporaries of killed builds are removed by the next build.

A published directory also holds ``checksums.json``: each file's size, modification time and
crc32, recorded as it is published. :func:`verify_dir` compares them on load, so a cache changed
in place (zeroed, overwritten by another of the same size, rotted on disk) is noticed and rebuilt
instead of silently changing the results. crc32 runs at 3.6 GB/s on one core (zlib 1.2.13): a
20,000 x 512 float32 feature file costs 11 ms. Above :data:`CONTENT_CHECK_BYTES` (an ImageNet
decode is 193 GB) reading every byte on every run would cost minutes, so only sizes and
modification times are compared there.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import zlib
from pathlib import Path

import numpy as np

from ask.utils.io import fsync_dir

log = logging.getLogger(__name__)

CHECKSUMS = "checksums.json"
#: Caches up to this many bytes have their content checked on load; larger ones their sizes and times.
CONTENT_CHECK_BYTES = 4 << 30
_READ_BLOCK = 1 << 20  # crc32 runs at full speed from 1 MiB; larger blocks showed in the memory bounds


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


def file_crc32(path: Path) -> str:
    """The crc32 of a file's bytes as 8 hex digits, read in blocks (plain reads: nothing stays mapped)."""
    crc = 0
    buffer = bytearray(_READ_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
    return f"{crc:08x}"


def _record_checksums(directory: Path) -> None:
    """Write ``checksums.json`` for every file in ``directory`` (each already durable)."""
    files = {}
    for entry in sorted(directory.iterdir()):
        fsync_path(entry)
        st = entry.stat()
        files[entry.name] = {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "crc32": file_crc32(entry)}
    (directory / CHECKSUMS).write_text(json.dumps({"algorithm": "crc32", "files": files}, sort_keys=True))
    fsync_path(directory / CHECKSUMS)


def verify_dir(directory: Path, content_limit: int = CONTENT_CHECK_BYTES) -> str | None:
    """Why the files of a directory published by :func:`publish_dir` are not as written, or None.

    Sizes are always compared; content (crc32) when all files together hold at most
    ``content_limit`` bytes, modification times otherwise. A directory without ``checksums.json``
    is refused: its content cannot be vouched for. Never raises.
    """
    try:
        recorded = json.loads((directory / CHECKSUMS).read_text())["files"]
        expected = {name: (int(entry["bytes"]), int(entry["mtime_ns"]), str(entry["crc32"]))
                    for name, entry in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {CHECKSUMS} is missing or unreadable, so its content cannot be checked"
    try:
        stats = {name: (directory / name).stat() for name in expected}
    except OSError as exc:
        return f"its file {Path(exc.filename or '?').name} is missing or unreadable ({exc.strerror or exc})"
    by_content = sum(size for size, _, _ in expected.values()) <= content_limit
    for name, (size, mtime_ns, crc) in sorted(expected.items()):
        if stats[name].st_size != size:
            return f"its {name} has {stats[name].st_size} bytes, not the {size} written"
        try:
            changed = file_crc32(directory / name) != crc if by_content else stats[name].st_mtime_ns != mtime_ns
        except OSError as exc:
            return f"its {name} is unreadable ({exc.strerror or exc})"
        if changed:
            what = "checksum" if by_content else "modification time"
            return f"its {name} does not match the {what} recorded when it was written (changed or corrupted since)"
    return None


def publish_dir(tmp: Path, target: Path) -> None:
    """Record the checksums of the complete directory ``tmp``, make it durable and put it at
    ``target`` in one rename."""
    _record_checksums(tmp)
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
