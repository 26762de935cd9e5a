"""Finding ``ask-attack`` runs: which directories under the given paths hold results, failures or problems.

A *run* is a directory holding the ``metrics.json`` that ``ask-attack`` writes, normally beside its
resolved ``config.yaml``. Its settings are that config flattened (``knn.k``, ``attack.methods.pgd.steps``)
less those that never change a result (:data:`IGNORED_SETTINGS`). The defence is the one that
trained the attacked model: the ``train_summary.json`` beside the checkpoint when there is one,
otherwise the run's ``defense.name``.

Failed sweep jobs (``failure.json``), job directories without ``metrics.json`` and unreadable
files are collected too, to be listed in the report; they never stop it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ask.config.schema import REPORT_ROWS, ignored_settings
from ask.errors import AskError
from ask.utils.runfiles import (
    CONFIG_FILE,
    EPOCH_METRICS_FILE,
    FAILURE_FILE,
    HYDRA_RECORDS_DIR,
    METRICS_FILE,
    TRAIN_SUMMARY_FILE,
)

# Config entries that never change a number in metrics.json (bookkeeping, paths, batch sizes) or
# that are part of the row key already; they never split rows. The schema marks them (REPORT_ROWS).
IGNORED_SETTINGS = frozenset(ignored_settings(REPORT_ROWS))


class ReportError(AskError):
    """No results to report, or a path given to ``ask-report`` is unusable."""


@dataclass
class Run:
    """One ``ask-attack`` run directory and what the report needs from it."""

    directory: Path
    metrics: dict[str, Any]
    defense: str
    seed: int | None
    settings: dict[str, str]  # flattened config, values as compact strings
    checkpoint: str = ""  # the attacked model's content digest, else its path
    train_seed: int | None = None  # the seed that trained it, where its train_summary.json says

    @property
    def seeds(self) -> tuple[int | None, int | None]:
        """What tells replicates apart."""
        return self.seed, self.train_seed


@dataclass
class Failure:
    """A sweep job that stopped with a user error (its ``failure.json``)."""

    directory: Path
    error: str
    kind: str


@dataclass
class Problem:
    """A run directory or file the report could not use, and why."""

    path: Path
    message: str


@dataclass
class Collection:
    """Everything found under the given paths."""

    runs: list[Run] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.runs or self.failures or self.problems)



def _read_yaml(path: Path) -> dict[str, Any] | None:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        flat: dict[str, str] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: compact_value(node)}


def compact_value(value: Any) -> str:
    """A config value as one short string: how settings are compared and shown (``[pgd,ask]``, ``0.1``)."""
    if isinstance(value, list):
        return "[" + ",".join(compact_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{compact_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return "null" if value is None else str(value)


def _job_config(directory: Path) -> dict[str, Any] | None:
    """The resolved ``config.yaml``, else Hydra's own (unresolved) copy."""
    for path in (directory / CONFIG_FILE, directory / HYDRA_RECORDS_DIR / CONFIG_FILE):
        if path.is_file():
            return _read_yaml(path)
    return None


def _training_summary(checkpoint: Any) -> dict[str, Any]:
    """The ``train_summary.json`` that ``ask-train`` wrote beside the checkpoint, if it is there to read."""
    if not checkpoint:
        return {}
    summary = Path(str(checkpoint)).expanduser().parent / TRAIN_SUMMARY_FILE
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _settings(config: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, str]:
    if config is not None:
        flat = _flatten(config)
    else:  # a metrics.json without its config: the settings it records itself
        flat = {name: compact_value(metrics[key]) for name, key in
                (("knn.layers", "layers"), ("knn.k", "k"), ("knn.metric", "metric"), ("attack.steps", "steps"))
                if key in metrics}
    if metrics.get("dataset_root"):  # resolved by ask-attack, where config.yaml has what was typed
        flat["dataset.root"] = str(metrics["dataset_root"])
    return {key: value for key, value in flat.items() if key not in IGNORED_SETTINGS}


def _load_run(directory: Path, collection: Collection) -> None:
    path = directory / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        collection.problems.append(Problem(path, f"unreadable {METRICS_FILE} ({reason})"))
        return
    if not isinstance(metrics, dict) or not isinstance(metrics.get("results"), list):
        collection.problems.append(Problem(path, f"{METRICS_FILE} has no 'results' list"))
        return
    good, listed = [], set()
    for index, row in enumerate(metrics["results"]):
        missing = [key for key in ("attack", "victim", "clean_acc", "robust_acc")
                   if not isinstance(row, dict) or row.get(key) is None]
        if missing:
            collection.problems.append(Problem(path, f"result {index} lacks {', '.join(missing)}; skipped"))
        elif (str(row["attack"]), str(row["victim"])) in listed:
            # e.g. eval.victims=[knn,knn] before it was refused: one evaluation, not two replicates
            collection.problems.append(Problem(path, f"result {index} repeats attack '{row['attack']}' on victim "
                                                     f"'{row['victim']}'; counted once"))
        else:
            listed.add((str(row["attack"]), str(row["victim"])))
            good.append(row)
    if not good:
        collection.problems.append(Problem(path, f"{METRICS_FILE} has no usable results"))
        return
    metrics = {**metrics, "results": good}

    config = _job_config(directory)
    if config is None:
        collection.notes.append(f"{directory}: no readable {CONFIG_FILE}; settings taken from {METRICS_FILE}")
    defense_node = (config or {}).get("defense")
    configured = defense_node.get("name") if isinstance(defense_node, dict) else None
    summary = _training_summary(metrics.get("checkpoint"))
    trained = str(summary["defense"]) if summary.get("defense") else None
    if trained and configured and trained != configured:
        collection.notes.append(
            f"{directory}: config says defense '{configured}' but the checkpoint was trained with "
            f"'{trained}'; reported as '{trained}'"
        )
    defense = trained or configured or "unknown"
    seed = (config or {}).get("seed", metrics.get("seed"))
    train_config = summary.get("config")
    train_seed = train_config.get("seed") if isinstance(train_config, dict) else None
    collection.runs.append(Run(directory, metrics, str(defense), seed if isinstance(seed, int) else None,
                               _settings(config, metrics),
                               str(metrics.get("checkpoint_digest") or metrics.get("checkpoint") or ""),
                               train_seed if isinstance(train_seed, int) else None))


def _load_failure(directory: Path, collection: Collection) -> None:
    try:
        data = json.loads((directory / FAILURE_FILE).read_text())
        error, kind = str(data.get("error", "")), str(data.get("type", ""))
    except (OSError, ValueError, AttributeError):
        error, kind = f"{FAILURE_FILE} is unreadable", ""
    collection.failures.append(Failure(directory, error or "(no message)", kind or "error"))


def _is_train_job(directory: Path) -> bool:
    if (directory / TRAIN_SUMMARY_FILE).exists() or (directory / EPOCH_METRICS_FILE).exists():
        return True
    config = _job_config(directory)
    return bool(config) and config.get("task") == "train"


def _classify(directory: Path, names: set[str], collection: Collection) -> None:
    has_metrics, has_failure = METRICS_FILE in names, FAILURE_FILE in names
    if has_metrics and has_failure:
        # A job directory reused by a later run: the newer file tells what happened last.
        newer_failure = (directory / FAILURE_FILE).stat().st_mtime > (directory / METRICS_FILE).stat().st_mtime
        has_metrics, has_failure = not newer_failure, newer_failure
    if has_failure:
        _load_failure(directory, collection)
    elif has_metrics:
        _load_run(directory, collection)
    elif (CONFIG_FILE in names or (directory / HYDRA_RECORDS_DIR).is_dir()) and not _is_train_job(directory):
        collection.problems.append(
            Problem(directory, f"no {METRICS_FILE} (the job crashed, was killed, or is still running)"))


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> Collection:
    """Every run, failed job and unusable run directory under ``paths`` (run or sweep directories).

    Raises :class:`ReportError` when a path does not exist.
    """
    collection = Collection()
    seen: set[Path] = set()
    for given in paths:
        root = Path(given).expanduser()
        if not root.exists():
            raise ReportError(f"'{given}' does not exist; pass ask-attack run or sweep directories")
        if root.is_file():
            if root.name not in (METRICS_FILE, FAILURE_FILE):
                raise ReportError(f"'{given}' is a file; pass a run or sweep directory (or a {METRICS_FILE})")
            root = root.parent
        for current, dirs, files in os.walk(root):
            # Hydra's .hydra/ and other hidden folders hold no results of their own.
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            directory = Path(current).resolve()
            if directory in seen:
                continue
            seen.add(directory)
            _classify(Path(current), set(files), collection)
    return collection
