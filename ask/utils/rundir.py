"""One run, one directory, whatever happens to the process.

A run directory holds a ``.lock`` (an ``flock`` held while training, released by the kernel even
on SIGKILL), ``last.pt`` after the first epoch and ``train_summary.json`` once finished. Hydra
names default run directories by the clock, so the same command started again after a crash
lands in a new directory: :func:`find_unfinished_run` looks among the sibling runs for an
unfinished one with the same resolved config, and :func:`adopt_run` copies its checkpoints and
metrics in, so the new directory continues it and holds the whole history.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ask.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
ADOPTED_MARKER = "continued_in.txt"
# Keys that change how a run looks, not what it computes: a resumed run may differ in them.
IGNORED_KEYS = ("progress",)


@contextmanager
def run_lock(directory: Path, *, wait: bool = False, name: str = LOCK_FILE) -> Iterator[None]:
    """Hold the directory's lock for the duration; a second live run in it is refused (or, with
    ``wait``, waits for the first to finish)."""
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / name, "w")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ConfigError(
                f"another ask run is still working in {directory}; wait for it or choose another hydra.run.dir"
            ) from None
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def _is_locked(directory: Path) -> bool:
    lock = directory / LOCK_FILE
    if not lock.exists():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def comparable_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config minus keys that do not change the computation, for "same command" matching."""
    config = {key: value for key, value in config.items() if key not in IGNORED_KEYS}
    if isinstance(config.get("train"), dict):
        config["train"] = {key: value for key, value in config["train"].items() if key != "resume"}
    return config


def find_unfinished_run(output_dir: Path, config: dict[str, Any], progress_file: str = "last.pt",
                        done_file: str = "train_summary.json") -> Path | None:
    """The most recent sibling run (``<root>/<date>/<time>``) with this config, a ``progress_file``,
    no ``done_file``, not running and not already continued elsewhere."""
    wanted = comparable_config(config)
    root = output_dir.resolve().parents[1]
    candidates = []
    for progress in root.glob(f"*/*/{progress_file}"):
        directory = progress.parent
        if (directory == output_dir.resolve() or (directory / done_file).exists()
                or (directory / ADOPTED_MARKER).exists() or not (directory / "config.yaml").exists()):
            continue
        try:
            saved = OmegaConf.to_container(OmegaConf.load(directory / "config.yaml"), resolve=True)
        except Exception:  # an unreadable config cannot be matched; it is someone else's run
            continue
        if comparable_config(saved) != wanted or _is_locked(directory):  # type: ignore[arg-type]
            continue
        candidates.append((progress.stat().st_mtime, directory))
    return max(candidates)[1] if candidates else None


def adopt_run(source: Path, target: Path, files: tuple[str, ...] = ("last.pt", "best.pt", "metrics.jsonl")) -> None:
    """Copy an unfinished run's progress files into ``target`` and mark ``source`` as continued."""
    for name in files:
        if (source / name).exists():
            tmp = target / f".{name}.adopt"
            shutil.copyfile(source / name, tmp)
            tmp.replace(target / name)
    (source / ADOPTED_MARKER).write_text(f"{target.resolve()}\n")


def continue_unfinished_run(output_dir: Path, progress_file: str, done_file: str, files: tuple[str, ...]) -> Path | None:
    """In a fresh directory, take over the unfinished run of the same command, if there is one.

    Returns the directory continued from. A directory that already has ``progress_file`` resumes
    by itself and is left alone.
    """
    if (output_dir / progress_file).exists() or not (output_dir / "config.yaml").exists():
        return None
    config = OmegaConf.to_container(OmegaConf.load(output_dir / "config.yaml"), resolve=True)
    source = find_unfinished_run(output_dir, config, progress_file, done_file)  # type: ignore[arg-type]
    if source is not None:
        log.info("continuing the unfinished run %s (same config) in %s", source, output_dir)
        adopt_run(source, output_dir, files)
    return source
