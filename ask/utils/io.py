"""Small file helpers shared by the cache, checkpoint and result writers.

:func:`atomic_save` never leaves a half-written file at ``path``: an interrupted run keeps the last
good copy. :func:`safe_load` reads tensors, numbers, strings and plain containers only
(``weights_only=True``), so a tampered file cannot run code, and turns every read or unpickle
failure into :class:`LoadError` for the caller to translate into a user-facing message.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


class LoadError(Exception):
    """A file could not be read or unpickled (missing, truncated, corrupt or unsafe content)."""


def atomic_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` ``obj`` to ``path`` atomically and return the path.

    The data goes to a temporary file in the same directory (so ``os.replace`` is a rename on one
    file system), is flushed and fsynced, then replaces ``path`` in one step. Parent directories
    are created.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable after a power loss; not possible on every platform.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Load a file written by ``torch.save`` onto the CPU with ``weights_only=True``.

    Raises :class:`LoadError` (with the original exception chained) when the file is missing,
    unreadable, truncated, not a torch file, or holds objects other than tensors and plain data.
    """
    path = Path(path).expanduser()
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # torch raises many types here (pickle, zip, OSError, RuntimeError)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoadError(f"cannot load '{path}': {reason}") from exc


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write a text file (results, reports) so that readers never see half of it."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return path
