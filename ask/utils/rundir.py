"""One run, one directory, whatever happens to the process.

A run directory holds one run: its ``config.yaml`` describes every result and progress file beside
it. :func:`claim_run_directory` enforces that before a console script writes anything there: a
directory whose results came from other settings is refused (``overwrite=true`` deletes them and
starts afresh), and the same settings find their finished results (a no-op) or their progress (a
resume). A run directory holds a ``.lock`` (an ``flock`` held while the command runs, released by
the kernel even on SIGKILL), ``last.pt`` after the first epoch and ``train_summary.json`` once
finished (``eval_state.pt`` and ``metrics.json`` for ``ask-attack``). Hydra
names default run directories by the clock, so the same command started again after a crash
lands in a new directory: :func:`find_unfinished_run` looks among the sibling runs for an
unfinished one with the same resolved config, and :func:`adopt_run` copies its checkpoints and
metrics in, so the new directory continues it and holds the whole history. The files' names,
and which of them each command leaves (:data:`~ask.utils.runfiles.RUN_FILES`), are in
:mod:`ask.utils.runfiles`.
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

from ask.config.schema import SAME_RUN, ignored_settings
from ask.errors import RunDirectoryError
from ask.utils.io import require_file_slot, with_filename
from ask.utils.runfiles import ADOPTED_MARKER, CONFIG_FILE, FAILURE_FILE, LOCK_FILE, RUN_FILES, RunFiles

log = logging.getLogger(__name__)

# Settings that change how or where a run is shown, cached or computed, not its numbers: a run may
# be resumed, or found finished, with other values of these (a run saved on a GPU resumes on the CPU).
# The schema marks them (SAME_RUN in ask.config.schema).
IGNORED_KEYS = ignored_settings(SAME_RUN)

_TRAIN_FILES = RUN_FILES["train"]  # the defaults of finding and adopting an unfinished run

# Locks this process holds with reentrant=True: the console script holds its directory's lock
# around the whole task, and the trainer or the evaluation inside it take the same lock again.
_HELD: dict[tuple[Path, str], int] = {}


@contextmanager
def run_lock(directory: Path, *, wait: bool = False, name: str = LOCK_FILE, reentrant: bool = False) -> Iterator[None]:
    """Hold the directory's lock for the duration; a second live run in it is refused (or, with
    ``wait``, waits for the first to finish).

    While a lock taken with ``reentrant=True`` is held, this process may take it again (a no-op);
    any other lock on the same file, in this process or another, is refused.
    """
    directory.mkdir(parents=True, exist_ok=True)
    held = (directory.resolve(), name)
    if held in _HELD:
        _HELD[held] += 1
        try:
            yield
        finally:
            _HELD[held] -= 1
        return
    # Unbuffered: a write that fails (a full disk) fails here, not again when the file is closed.
    handle = open(directory / name, "wb", buffering=0)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise RunDirectoryError(
                f"another ask run is still working in {directory}; wait for it or choose another hydra.run.dir"
            ) from None
        try:
            handle.write(f"{os.getpid()}\n".encode())
        except OSError as error:  # a full disk: the message must name the file
            raise with_filename(error, directory / name) from error
        if reentrant:
            _HELD[held] = 0
        yield
    finally:
        if reentrant:
            _HELD.pop(held, None)
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
    """The config minus :data:`IGNORED_KEYS`, which do not change the computation, for "same run" matching."""
    config = dict(config)
    for dotted in IGNORED_KEYS:
        *path, name = dotted.split(".")
        node = config
        for part in path:
            child = node.get(part)
            if not isinstance(child, dict):
                break
            node[part] = child = dict(child)  # a copy: the caller's config stays whole
            node = child
        else:
            node.pop(name, None)
    return config


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    # An empty group ({}, e.g. defense.params of defense=none) sets nothing: leaving it out keeps a
    # change of defence from also listing "defense.params: {} -> (unset)".
    if isinstance(node, dict):
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flat(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: node}


def config_differences(saved: dict[str, Any], wanted: dict[str, Any], shown: int = 3) -> str:
    """``"attack.eps: 0.1 -> 0.05, ..."``: the settings (less :data:`IGNORED_KEYS`) that differ; empty if none."""
    old, new = _flat(comparable_config(saved)), _flat(comparable_config(wanted))
    changed = [key for key in sorted(old.keys() | new.keys()) if old.get(key, KeyError) != new.get(key, KeyError)]
    text = ", ".join(f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}" for key in changed[:shown])
    return text + (f" and {len(changed) - shown} more" if len(changed) > shown else "")


def claim_run_directory(directory: Path, config: dict[str, Any], files: RunFiles, overwrite: bool) -> bool:
    """Make ``directory`` this run's before anything is written there (call it under :func:`run_lock`).

    Results or progress (``files``) left by a run of other settings, or by a run whose
    ``config.yaml`` is missing, are refused with :class:`RunDirectoryError`; with ``overwrite``
    they are deleted instead, so that the ``config.yaml`` written next describes whatever the
    directory will hold. Results of the same settings are left for the task to finish or reuse.
    Returns whether the directory holds this run finished already (then there is nothing to write).
    """
    # A folder where a run file belongs is neither results nor progress: say so, not "no config.yaml".
    require_file_slot(*(directory / name for name in files.names))
    present = [name for name in files.names if (directory / name).exists()]
    if not present:
        return False
    if overwrite:
        for name in (*present, FAILURE_FILE):
            (directory / name).unlink(missing_ok=True)
        log.warning("overwrite=true: deleted %s of the earlier run in %s", ", ".join(present), directory)
        return False
    how = "add overwrite=true to replace it, or choose another hydra.run.dir"
    saved = _read_config(directory / CONFIG_FILE)
    if saved is None:
        raise RunDirectoryError(f"{directory} holds {present[0]} but no readable {CONFIG_FILE} saying which run "
                                f"wrote it; {how}")
    differences = config_differences(saved, config)
    if differences:
        state = "a finished run" if files.done in present else "an unfinished run"
        raise RunDirectoryError(f"{directory} already holds {state} with other settings ({differences}); {how}")
    return files.done in present


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception:  # missing, unreadable or not YAML: it cannot vouch for the results
        return None
    return saved if isinstance(saved, dict) else None


def find_unfinished_run(output_dir: Path, config: dict[str, Any], progress_file: str = _TRAIN_FILES.resumed_from,
                        done_file: str = _TRAIN_FILES.done) -> Path | None:
    """The most recent sibling run (``<root>/<date>/<time>``) with this config, a ``progress_file``,
    no ``done_file``, not running and not already continued elsewhere."""
    wanted = comparable_config(config)
    root = output_dir.resolve().parents[1]
    candidates = []
    for progress in root.glob(f"*/*/{progress_file}"):
        directory = progress.parent
        if (directory == output_dir.resolve() or (directory / done_file).exists()
                or (directory / ADOPTED_MARKER).exists() or not (directory / CONFIG_FILE).exists()):
            continue
        saved = _read_config(directory / CONFIG_FILE)
        if saved is None:  # an unreadable config cannot be matched; it is someone else's run
            continue
        if comparable_config(saved) != wanted or _is_locked(directory):  # type: ignore[arg-type]
            continue
        candidates.append((progress.stat().st_mtime, directory))
    return max(candidates)[1] if candidates else None


def adopt_run(source: Path, target: Path, files: tuple[str, ...] = _TRAIN_FILES.progress) -> None:
    """Copy an unfinished run's progress files into ``target`` and mark ``source`` as continued."""
    for name in files:
        if (source / name).exists():
            tmp = target / f".{name}.adopt"
            shutil.copyfile(source / name, tmp)
            tmp.replace(target / name)
    (source / ADOPTED_MARKER).write_text(f"{target.resolve()}\n")


def continue_unfinished_run(output_dir: Path, files: RunFiles) -> Path | None:
    """In a fresh directory, take over the unfinished run of the same command, if there is one.

    Returns the directory continued from. A directory that already has ``files.resumed_from``
    resumes by itself and is left alone.
    """
    if (output_dir / files.resumed_from).exists() or not (output_dir / CONFIG_FILE).exists():
        return None
    config = OmegaConf.to_container(OmegaConf.load(output_dir / CONFIG_FILE), resolve=True)
    source = find_unfinished_run(output_dir, config, files.resumed_from, files.done)  # type: ignore[arg-type]
    if source is not None:
        log.info("continuing the unfinished run %s (same config) in %s", source, output_dir)
        adopt_run(source, output_dir, files.progress)
    return source
