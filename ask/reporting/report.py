"""Aggregate ``ask-attack`` runs and sweeps into ``report.md``, ``report.csv`` and plots.

A *run* is a directory holding the ``metrics.json`` that ``ask-attack`` writes, normally beside its
resolved ``config.yaml``. Runs that share every setting (the dataset's root among them) except the
seed are replicates: the report gives the mean and
the sample standard deviation (n - 1) of their clean accuracy, robust accuracy and ASR, and a 95 %
confidence interval (:func:`confidence_interval`): Student's t over the replicates' values when
there are two or more, Wilson's binomial interval over the single run's points otherwise.

Every run also has one ``any`` row per victim, the per-point worst case over its attacks (see
:mod:`ask.evaluation.evaluate`). Which attacks it combines is one of its settings, so worst cases
over different attack lists are never averaged, nor joined in an eps curve.

Settings other than the defence, dataset, model, eps and norm (a layer, a temperature, a step
count) split rows only where they actually differ between runs that would otherwise be averaged
together; such settings are shown in a ``settings`` column, so different experiments are never
silently pooled.

A replicate is told apart by its seeds: the attack run's and, when the ``train_summary.json`` beside
the checkpoint says, the training run's (the checkpoint differs between models trained with
different seeds). Two runs in one row with the same seeds are not replicates: if they attacked
different checkpoints (by content digest, else by path), the checkpoint splits the row
(``checkpoint=<digest>`` in ``settings``); if they attacked the same one, they are the same
experiment twice, counted once, with a note. A result listed twice in one run (the same attack
and victim) is counted once too.

The defence is the one that trained the attacked model: the ``train_summary.json`` beside the
checkpoint when there is one, otherwise the run's ``defense.name``.

Failed sweep jobs (``failure.json``), job directories without ``metrics.json`` and unreadable
files are listed in the report; they never stop it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ask.config.schema import REPORT_ROWS, ignored_settings
from ask.errors import AskError
from ask.reporting.labels import ANY_ATTACK, format_eps
from ask.utils.io import atomic_write_bytes, require_file_slot

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
FAILURE_FILE = "failure.json"
CONFIG_FILE = "config.yaml"

#: The identity of a report row, before the settings that happen to vary.
KEY_FIELDS = ("defense", "dataset", "model", "eps", "norm", "attack", "victim")
#: Averaged across replicates, each with ``_mean``, ``_std`` and ``_count`` columns in report.csv.
STAT_FIELDS = ("clean_acc", "robust_acc", "asr", "mean_linf", "mean_l2", "seconds")
#: Given a 95 % interval, with ``_ci_low``, ``_ci_high`` and ``_ci_kind`` columns in report.csv.
CI_FIELDS = ("clean_acc", "robust_acc", "asr")
#: A worst-case row's per-attack point counts (see ``ask.evaluation.evaluate.worst_case``).
BREAKDOWN_FIELDS = ("broken_by", "only_by")
#: The setting that names the attacks a worst-case row combines.
ANY_SETTING = "attacks"

# Config entries that never change a number in metrics.json (bookkeeping, paths, batch sizes) or
# that are part of the row key already; they never split rows. The schema marks them (REPORT_ROWS).
_IGNORED_SETTINGS = frozenset(ignored_settings(REPORT_ROWS))
_METHODS_PREFIX = "attack.methods."


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


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    out_dir: Path
    markdown: Path
    csv: Path
    plots: list[Path]
    rows: list[dict[str, Any]]
    collection: Collection


# --------------------------------------------------------------------------------------------
# Finding runs


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
    return {prefix[:-1]: _compact(node)}


def _compact(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_compact(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_compact(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:.6g}"
    return "null" if value is None else str(value)


def _job_config(directory: Path) -> dict[str, Any] | None:
    """The resolved ``config.yaml``, else Hydra's own (unresolved) copy."""
    for path in (directory / CONFIG_FILE, directory / ".hydra" / "config.yaml"):
        if path.is_file():
            return _read_yaml(path)
    return None


def _training_summary(checkpoint: Any) -> dict[str, Any]:
    """The ``train_summary.json`` that ``ask-train`` wrote beside the checkpoint, if it is there to read."""
    if not checkpoint:
        return {}
    summary = Path(str(checkpoint)).expanduser().parent / "train_summary.json"
    try:
        data = json.loads(summary.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _settings(config: dict[str, Any] | None, metrics: dict[str, Any]) -> dict[str, str]:
    if config is not None:
        flat = _flatten(config)
    else:  # a metrics.json without its config: the settings it records itself
        flat = {name: _compact(metrics[key]) for name, key in
                (("knn.layers", "layers"), ("knn.k", "k"), ("knn.metric", "metric"), ("attack.steps", "steps"))
                if key in metrics}
    if metrics.get("dataset_root"):  # resolved by ask-attack, where config.yaml has what was typed
        flat["dataset.root"] = str(metrics["dataset_root"])
    return {key: value for key, value in flat.items() if key not in _IGNORED_SETTINGS}


def _load_run(directory: Path, collection: Collection) -> None:
    path = directory / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        collection.problems.append(Problem(path, f"unreadable metrics.json ({reason})"))
        return
    if not isinstance(metrics, dict) or not isinstance(metrics.get("results"), list):
        collection.problems.append(Problem(path, "metrics.json has no 'results' list"))
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
        collection.problems.append(Problem(path, "metrics.json has no usable results"))
        return
    metrics = {**metrics, "results": good}

    config = _job_config(directory)
    if config is None:
        collection.notes.append(f"{directory}: no readable config.yaml; settings taken from metrics.json")
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
        error, kind = "failure.json is unreadable", ""
    collection.failures.append(Failure(directory, error or "(no message)", kind or "error"))


def _is_train_job(directory: Path) -> bool:
    if (directory / "train_summary.json").exists() or (directory / "metrics.jsonl").exists():
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
    elif (CONFIG_FILE in names or (directory / ".hydra").is_dir()) and not _is_train_job(directory):
        collection.problems.append(
            Problem(directory, "no metrics.json (the job crashed, was killed, or is still running)"))


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
                raise ReportError(f"'{given}' is a file; pass a run or sweep directory (or a metrics.json)")
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


# --------------------------------------------------------------------------------------------
# Confidence intervals

#: z with 2.5 % of the standard normal above it.
Z_975 = 1.959963984540054
#: t_{0.975, df} for df = 1..30 (Student's t, 97.5th percentile; df 1 first), to six decimals.
T_975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
         2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
         2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
         2.048407, 2.045230, 2.042272)


def t_quantile_975(df: int) -> float:
    """Student's t_{0.975, df}: :data:`T_975` up to 30, then the Cornish-Fisher series in 1/df.

    The series (Abramowitz & Stegun 26.7.5, four terms) is within 3e-8 of the exact quantile
    from df 31 on and tends to :data:`Z_975`; no scipy needed.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    terms = ((z ** 3 + z) / 4,
             (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(term / df ** (power + 1) for power, term in enumerate(terms))


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """The 95 % interval for the mean of ``values`` (two or more): mean ± t_{0.975, n-1} · s / √n."""
    if len(values) < 2:
        raise ValueError("a t interval needs two values or more")
    mean, half = statistics.fmean(values), t_quantile_975(len(values) - 1) * statistics.stdev(values)
    half /= math.sqrt(len(values))
    return mean - half, mean + half


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """Wilson's 95 % score interval for a proportion of ``successes`` out of ``n`` trials (n >= 1)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z2 = Z_975 ** 2
    p = successes / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_975 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def confidence_interval(values: Sequence[float], denominators: Sequence[int]) -> tuple[float | None, float | None, str]:
    """The 95 % interval of a fraction, ``(low, high, kind)``.

    ``values`` are one fraction per run and ``denominators`` the number of trials behind each
    (points, or the points right on x for ASR). Two runs or more: Student's t over the values
    (``kind`` ``"t"``), which covers the spread between seeds. One run: Wilson's interval over its
    trials (``"wilson"``), which covers only the choice of points. Clipped to [0, 1]; ``(None,
    None, "")`` when there is nothing to go on.
    """
    if len(values) >= 2:
        low, high = t_interval(values)
        return max(0.0, low), min(1.0, high), "t"
    if len(values) == 1 and denominators and denominators[0] >= 1:
        n = denominators[0]
        return (*wilson_interval(min(n, max(0, round(values[0] * n))), n), "wilson")
    return None, None, ""


# --------------------------------------------------------------------------------------------
# Aggregation


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _label(key: str) -> str:
    return key[len(_METHODS_PREFIX):] if key.startswith(_METHODS_PREFIX) else key


def _row_settings(run: Run, result: dict[str, Any]) -> dict[str, str]:
    """The run's settings that can matter for this result row.

    A worst-case row depends on every attack's settings, and on which attacks it combines.
    """
    attack = str(result["attack"])
    if attack == ANY_ATTACK:
        return {**run.settings, ANY_SETTING: _compact(list(result.get(ANY_SETTING) or []))}
    own = f"{_METHODS_PREFIX}{attack}."
    return {key: value for key, value in run.settings.items()
            if not key.startswith(_METHODS_PREFIX) or key.startswith(own)}


def _denominators(members: Sequence[tuple[Run, dict[str, Any]]], name: str) -> list[int]:
    """The trials behind each member's ``name``: its points, or for ASR its points right on x."""
    counts = []
    for run, result in members:
        n = int(result.get("n_points", run.metrics.get("n_points", 0)) or 0)
        counts.append(round(float(result["clean_acc"]) * n) if name == "asr" else n)
    return counts


def _mean_counts(per_run: list[Any], attacks: Sequence[str]) -> dict[str, float] | None:
    """Per attack, the mean over the runs of a worst-case row's count (``broken_by``, ``only_by``);
    None unless every run recorded it."""
    if not attacks or not all(isinstance(counts, dict) for counts in per_run):
        return None
    return {attack: statistics.fmean(float(counts.get(attack, 0)) for counts in per_run) for attack in attacks}


def aggregate(runs: Sequence[Run], notes: list[str] | None = None) -> list[dict[str, Any]]:
    """One row per (defence, dataset, model, eps, norm, attack, victim[, varying settings]).

    Runs with the same seeds never share a row (see the module's docstring); ``notes`` receives
    a line for each run counted once because it repeats another.

    Each row has ``<stat>_mean``, ``<stat>_std`` (sample, None for a single run) and
    ``<stat>_count`` for every name in :data:`STAT_FIELDS`; ``<stat>_ci_low``, ``<stat>_ci_high``
    and ``<stat>_ci_kind`` (:func:`confidence_interval`) for every name in :data:`CI_FIELDS`; plus
    ``runs``, ``seeds``, ``n_points`` (per run; the smallest if they differ), ``n_points_total``,
    ``settings``, ``attacks`` (the attacks a worst-case row combines, else empty),
    ``broken_by`` and ``only_by`` (a worst-case row's per-attack counts, mean over the runs; else
    None) and ``directories``.
    """
    entries = []  # (key, settings, run, result row)
    attack_order: dict[str, int] = {}
    victim_order: dict[str, int] = {}
    for run in runs:
        for result in run.metrics["results"]:
            attack, victim = str(result["attack"]), str(result["victim"])
            attack_order.setdefault(attack, len(attack_order))
            victim_order.setdefault(victim, len(victim_order))
            eps = result.get("eps", run.metrics.get("eps"))
            key = (run.defense, str(run.metrics.get("dataset", "?")), str(run.metrics.get("model", "?")),
                   float(eps) if eps is not None else math.nan,
                   str(result.get("norm", run.metrics.get("norm", "?"))), attack, victim)
            entries.append((key, _row_settings(run, result), run, result))

    # A setting splits rows only where it takes different values inside one key; it is then shown
    # on every row of that key's (defence, dataset, model) section, and nowhere else.
    values_by_key: dict[tuple, dict[str, set[str]]] = {}
    for key, settings, _, _ in entries:
        per_key = values_by_key.setdefault(key, {})
        for name, value in settings.items():
            per_key.setdefault(name, set()).add(value)
    varying: dict[tuple, set[str]] = {}
    for key, per_key in values_by_key.items():
        varying.setdefault(key[:3], set()).update(name for name, values in per_key.items() if len(values) > 1)
    # The attacks a worst case combines also tell apart rows of different eps (a sweep of two attacks
    # beside a run of six): a curve must not join the worst case over six to that over two.
    combined: dict[tuple, set[str]] = {}
    for key, settings, _, _ in entries:
        if ANY_SETTING in settings:
            combined.setdefault(key[:3], set()).add(settings[ANY_SETTING])
    for family, values in combined.items():
        if len(values) > 1:
            varying[family].add(ANY_SETTING)

    def label_of(key: tuple, settings: dict[str, str]) -> str:
        shown = sorted(varying[key[:3]] & set(settings))
        return " ".join(f"{_label(name)}={settings[name]}" for name in shown)

    # Same seeds in one row: other checkpoints split that row, the same one is a repeat.
    checkpoints: dict[tuple, set[str]] = {}
    for key, settings, run, _ in entries:
        if run.seed is not None:
            checkpoints.setdefault((*key, label_of(key, settings), run.seeds), set()).add(run.checkpoint)
    split = {group[:-1] for group, seen in checkpoints.items() if len(seen) > 1}

    groups: dict[tuple, list[tuple[Run, dict[str, Any]]]] = {}
    first_of: dict[tuple, Run] = {}
    repeats: dict[tuple[Path, Path], int] = {}
    for key, settings, run, result in entries:
        label = label_of(key, settings)
        if (*key, label) in split:
            label = f"{label} checkpoint={run.checkpoint or '?'}".strip()
        if run.seed is not None:
            first = first_of.setdefault((*key, label, run.seeds), run)
            if first is not run:
                pair = (run.directory, first.directory)
                repeats[pair] = repeats.get(pair, 0) + 1
                continue
        groups.setdefault((*key, label), []).append((run, result))
    for (directory, first_directory), count in repeats.items():
        if notes is not None:
            notes.append(f"{directory} repeats {first_directory} (same settings, checkpoint and seeds): "
                         f"{count} result{'s' if count > 1 else ''} counted once")

    rows = []
    for group_key, members in groups.items():
        row: dict[str, Any] = dict(zip((*KEY_FIELDS, "settings"), group_key, strict=True))
        for name in STAT_FIELDS:
            values = [float(r[name]) for _, r in members
                      if r.get(name) is not None and math.isfinite(float(r[name]))]
            mean, std = _mean_std(values)
            row[f"{name}_mean"], row[f"{name}_std"], row[f"{name}_count"] = mean, std, len(values)
        for name in CI_FIELDS:
            usable = [(run, r) for run, r in members
                      if r.get(name) is not None and math.isfinite(float(r[name]))]
            low, high, kind = confidence_interval([float(r[name]) for _, r in usable], _denominators(usable, name))
            row[f"{name}_ci_low"], row[f"{name}_ci_high"], row[f"{name}_ci_kind"] = low, high, kind
        points = [int(r.get("n_points", run.metrics.get("n_points", 0)) or 0) for run, r in members]
        row["n_points"] = min(points)
        row["n_points_total"] = sum(points)
        row["runs"] = len(members)
        row["seeds"] = " ".join(str(s) for s in sorted({run.seed for run, _ in members if run.seed is not None}))
        combined = members[0][1].get(ANY_SETTING) if row["attack"] == ANY_ATTACK else None
        row["attacks"] = " ".join(str(a) for a in combined or [])
        for name in BREAKDOWN_FIELDS:
            row[name] = _mean_counts([r.get(name) for _, r in members], combined or [])
        row["directories"] = [run.directory for run, _ in members]
        rows.append(row)
    rows.sort(key=lambda r: (r["defense"], r["dataset"], r["model"], r["norm"], r["eps"], r["settings"],
                             attack_order[r["attack"]], victim_order[r["victim"]]))
    return rows


# --------------------------------------------------------------------------------------------
# Writing


def _percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" if std is None else f"{100 * mean:.1f} ± {100 * std:.1f}"


def _interval(row: dict[str, Any], name: str) -> str:
    low, high, kind = row[f"{name}_ci_low"], row[f"{name}_ci_high"], row[f"{name}_ci_kind"]
    if low is None or high is None:
        return "-"
    return f"[{100 * low:.1f}, {100 * high:.1f}] {'t' if kind == 't' else 'W'}"


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve())) or "."
    except ValueError:
        return str(path)


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in body]
    return lines


def _results_table(rows: list[dict[str, Any]]) -> list[str]:
    with_settings = any(r["settings"] for r in rows)
    with_seeds = any(r["runs"] > 1 for r in rows)
    header = ["attack", "victim", *(["settings"] if with_settings else []),
              "clean (%)", "robust (%)", "robust 95% CI", "ASR (%)", "ASR 95% CI", "n", "runs",
              *(["seeds"] if with_seeds else [])]
    body = [[r["attack"], r["victim"], *([r["settings"] or "-"] if with_settings else []),
             _percent(r["clean_acc_mean"], r["clean_acc_std"]),
             _percent(r["robust_acc_mean"], r["robust_acc_std"]), _interval(r, "robust_acc"),
             _percent(r["asr_mean"], r["asr_std"]), _interval(r, "asr"),
             str(r["n_points"]), str(r["runs"]), *([r["seeds"] or "-"] if with_seeds else [])]
            for r in rows]
    return _table(header, body)


def _format_counts(counts: dict[str, float] | None) -> str:
    return "-" if counts is None else ", ".join(f"{attack} {count:.4g}" for attack, count in counts.items())


def _breakdown_table(rows: list[dict[str, Any]]) -> list[str]:
    """Per worst-case row, the points each attack broke, and those it alone broke (mean per run)."""
    worst = [r for r in rows if r["attack"] == ANY_ATTACK]
    with_settings = any(r["settings"] for r in worst)
    header = ["victim", *(["settings"] if with_settings else []), "broke alone (only_by)", "broke (broken_by)"]
    body = [[r["victim"], *([r["settings"] or "-"] if with_settings else []),
             _format_counts(r["only_by"]), _format_counts(r["broken_by"])] for r in worst]
    return _table(header, body)


def _pivot_table(rows: list[dict[str, Any]], eps_values: list[float], norm: str) -> list[str]:
    """Robust accuracy with one column per eps, one line per (attack, victim, settings)."""
    lines: dict[tuple[str, str, str], dict[float, dict[str, Any]]] = {}
    for r in rows:
        lines.setdefault((r["attack"], r["victim"], r["settings"]), {})[r["eps"]] = r
    with_settings = any(settings for _, _, settings in lines)
    header = ["attack", "victim", *(["settings"] if with_settings else []),
              *(f"eps {format_eps(e, norm)}" for e in eps_values)]
    body = []
    for (attack, victim, settings), by_eps in lines.items():
        cells = [_percent(by_eps[e]["robust_acc_mean"], by_eps[e]["robust_acc_std"]) if e in by_eps else "-"
                 for e in eps_values]
        body.append([attack, victim, *([settings or "-"] if with_settings else []), *cells])
    return _table(header, body)


def _unique(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def render_markdown(rows: list[dict[str, Any]], collection: Collection, out_dir: Path,
                    sources: Sequence[Path], plots: Sequence[Path]) -> str:
    """The text of ``report.md``."""
    lines = ["# ask-attack report", ""]
    lines.append(f"Sources: {', '.join(f'`{s}`' for s in sources)}. "
                 f"{len(collection.runs)} run(s), {len(collection.failures)} failed job(s), "
                 f"{len(collection.problems)} problem(s).")
    lines += ["", "Accuracies and ASR in percent. `a ± b` is the mean ± sample standard deviation over the "
              "`runs` runs whose settings for that row agree (they differ only in seed, checkpoint or "
              "another attack's hyperparameters); `seeds` lists their seeds. Settings that differ "
              "between runs are shown in `settings` instead of being averaged. `n` is the number of "
              "attacked points per run. ASR is the fraction of the points a victim classified correctly "
              "that the attack makes it misclassify.", "",
              "`95% CI` columns: `[low, high] t` is mean ± t(0.975, runs - 1) · std / √runs, Student's "
              "t over the runs (seeds); `[low, high] W` is Wilson's binomial interval over the points of "
              "a single run (for ASR, over the points it classified correctly), which covers the choice "
              "of points but not of seed. Both are clipped to [0, 100].", "",
              "Attack `any` is the per-point worst case over the attacks of the same run (AutoAttack's "
              "rule): a point counts as robust only if the victim classifies it correctly both clean "
              "and after every attack; its ASR is the fraction of correctly classified points that at "
              "least one attack broke; points wrong on clean inputs are never robust and not in its "
              "ASR. `attacks=[...]` names the attacks combined where that differs between rows. Below "
              "each table, `broken_by` counts the correctly classified points each attack broke and "
              "`only_by` those no other attack of the run broke (what the worst case would lose "
              "without that attack), as the mean number of points per run.", ""]
    if not rows:
        lines += ["No successful runs.", ""]
    families = _unique((r["defense"], r["dataset"], r["model"]) for r in rows)
    for defense, dataset, model in families:
        family_rows = [r for r in rows if (r["defense"], r["dataset"], r["model"]) == (defense, dataset, model)]
        lines += [f"## defence: {defense} — {dataset} / {model}", ""]
        for norm in _unique(r["norm"] for r in family_rows):
            norm_rows = [r for r in family_rows if r["norm"] == norm]
            eps_values = sorted(_unique(r["eps"] for r in norm_rows))
            for eps in eps_values:
                title = f"### {norm} eps = {format_eps(eps, norm)}"
                if format_eps(eps, norm) != f"{eps:.4g}":
                    title += f" ({eps:.4g})"
                eps_rows = [r for r in norm_rows if r["eps"] == eps]
                lines += [title, "", *_results_table(eps_rows), ""]
                if any(r["attack"] == ANY_ATTACK for r in eps_rows):
                    lines += ["Worst case, points per run broken by each attack:", "",
                              *_breakdown_table(eps_rows), ""]
            if len(eps_values) > 1:
                lines += [f"### {norm}: robust accuracy (%) by eps", "",
                          *_pivot_table(norm_rows, eps_values, norm), ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({_relative(p, out_dir)})" for p in plots]
        lines.append("")
    lines += ["## Failures", ""]
    if collection.failures:
        lines += [f"- `{_relative(f.directory, out_dir)}`: {f.kind}: {f.error}" for f in collection.failures]
    else:
        lines.append("None.")
    lines.append("")
    if collection.problems:
        lines += ["## Problems", ""]
        lines += [f"- `{_relative(p.path, out_dir)}`: {p.message}" for p in collection.problems]
        lines.append("")
    if collection.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in collection.notes), ""]
    if collection.runs:
        lines += ["## Runs", ""]
        lines += _table(["directory", "defence", "dataset", "model", "eps", "norm", "seed"], [
            [_relative(run.directory, out_dir), run.defense, str(run.metrics.get("dataset", "?")),
             str(run.metrics.get("model", "?")),
             format_eps(float(run.metrics.get("eps", math.nan)), str(run.metrics.get("norm", "linf"))),
             str(run.metrics.get("norm", "?")), str(run.seed)]
            for run in collection.runs])
        lines.append("")
    return "\n".join(lines)


def render_csv(rows: list[dict[str, Any]], out_dir: Path) -> str:
    """The text of ``report.csv``: one row per aggregated (defence, ..., victim, settings)."""
    # Columns added later go after ``directories``, so readers that count columns keep working.
    columns = [*KEY_FIELDS, "settings", "runs", "seeds", "n_points", "n_points_total",
               *(f"{name}_{stat}" for name in STAT_FIELDS for stat in ("mean", "std", "count")),
               "directories",
               *(f"{name}_ci_{part}" for name in CI_FIELDS for part in ("low", "high", "kind")),
               "attacks", *BREAKDOWN_FIELDS]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # repr keeps every digit of a float; an empty cell is a missing value (one run has no std).
        plain = {name: "" if row[name] is None else repr(row[name]) if isinstance(row[name], float) else row[name]
                 for name in columns if name != "directories"}
        plain["directories"] = ";".join(_relative(d, out_dir) for d in row["directories"])
        for name in BREAKDOWN_FIELDS:  # "ask=20 pgd=15.5", in the order of `attacks`
            counts = row[name]
            plain[name] = "" if counts is None else " ".join(f"{a}={c!r}" for a, c in counts.items())
        writer.writerow(plain)
    return buffer.getvalue()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``path`` through a temporary file so that a reader never sees half a report."""
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data)


def default_out_dir(paths: Sequence[str | os.PathLike[str]]) -> Path:
    """The single given directory, or the deepest directory containing all of them."""
    resolved = [Path(p).expanduser().resolve() for p in paths]
    resolved = [p.parent if p.is_file() else p for p in resolved]
    return Path(os.path.commonpath(resolved)) if len(resolved) > 1 else resolved[0]


def write_report(paths: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str] | None = None,
                 *, plots: bool = True) -> Report:
    """Read every run under ``paths`` and write ``report.md``, ``report.csv`` and the plots into ``out``.

    ``out`` defaults to :func:`default_out_dir`. Raises :class:`ReportError` when a path does not
    exist or nothing (no run, no failed job) is found.
    """
    if not paths:
        raise ReportError("no paths given; pass ask-attack run or sweep directories")
    collection = find_runs(paths)
    if collection.empty:
        where = ", ".join(str(p) for p in paths)
        raise ReportError(f"no runs found under {where}: expected metrics.json files written by ask-attack")
    out_dir = Path(out).expanduser() if out is not None else default_out_dir(paths)
    out_dir.mkdir(parents=True, exist_ok=True)
    require_file_slot(*(out_dir / name for name in ("report.md", "report.csv", "robust_vs_eps.png", "asr_bars.png")))
    rows = aggregate(collection.runs, collection.notes)

    written: list[Path] = []
    if plots and rows:
        from ask.reporting.plots import plot_asr_bars, plot_robust_vs_eps  # matplotlib only when needed

        for name, draw in (("robust_vs_eps.png", plot_robust_vs_eps), ("asr_bars.png", plot_asr_bars)):
            png = draw(rows)
            if png is not None:
                write_atomic(out_dir / name, png)
                written.append(out_dir / name)

    sources = [Path(p) for p in paths]
    markdown = out_dir / "report.md"
    table = out_dir / "report.csv"
    write_atomic(table, render_csv(rows, out_dir))
    write_atomic(markdown, render_markdown(rows, collection, out_dir, sources, written))
    for failure in collection.failures:
        log.warning("failed job %s: %s", failure.directory, failure.error)
    for problem in collection.problems:
        log.warning("%s: %s", problem.path, problem.message)
    return Report(out_dir, markdown, table, written, rows, collection)
