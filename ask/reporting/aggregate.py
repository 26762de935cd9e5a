"""Aggregating runs into report rows: one per (defence, dataset, model, eps, norm, attack, victim[, settings]).

Runs that share every setting (the dataset's root among them) except the seed are replicates:
a row gives the mean and the sample standard deviation (n - 1) of their clean accuracy, robust
accuracy and ASR, and a 95 % confidence interval (:func:`ask.reporting.intervals.confidence_interval`):
Student's t over the replicates' values when there are two or more, Wilson's binomial interval
over the single run's points otherwise.

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
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ask.reporting.intervals import confidence_interval
from ask.reporting.labels import ANY_ATTACK
from ask.reporting.runs import Run, compact_value

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

_METHODS_PREFIX = "attack.methods."


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
        return {**run.settings, ANY_SETTING: compact_value(list(result.get(ANY_SETTING) or []))}
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
