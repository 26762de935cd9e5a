"""The text of ``report.md`` and ``report.csv`` from the aggregated rows."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ask.reporting.aggregate import BREAKDOWN_FIELDS, CI_FIELDS, KEY_FIELDS, STAT_FIELDS
from ask.reporting.labels import ANY_ATTACK, format_eps
from ask.reporting.runs import Collection


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
