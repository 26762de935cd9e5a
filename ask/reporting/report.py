"""``ask-report``'s job: find the runs under some paths, aggregate them, write ``report.md``,
``report.csv`` and the plots.

Finding runs is :mod:`ask.reporting.runs`, the rows and their statistics
:mod:`ask.reporting.aggregate` (intervals: :mod:`ask.reporting.intervals`), the text
:mod:`ask.reporting.render` and the PNGs :mod:`ask.reporting.plots`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ask.reporting.aggregate import aggregate
from ask.reporting.render import render_csv, render_markdown
from ask.reporting.runs import Collection, ReportError, find_runs
from ask.utils.io import atomic_write_bytes, atomic_write_text, require_file_slot
from ask.utils.runfiles import METRICS_FILE

log = logging.getLogger(__name__)


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    out_dir: Path
    markdown: Path
    csv: Path
    plots: list[Path]
    rows: list[dict[str, Any]]
    collection: Collection


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
        raise ReportError(f"no runs found under {where}: expected {METRICS_FILE} files written by ask-attack")
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
                atomic_write_bytes(out_dir / name, png)
                written.append(out_dir / name)

    sources = [Path(p) for p in paths]
    markdown = out_dir / "report.md"
    table = out_dir / "report.csv"
    atomic_write_text(table, render_csv(rows, out_dir))
    atomic_write_text(markdown, render_markdown(rows, collection, out_dir, sources, written))
    for failure in collection.failures:
        log.warning("failed job %s: %s", failure.directory, failure.error)
    for problem in collection.problems:
        log.warning("%s: %s", problem.path, problem.message)
    return Report(out_dir, markdown, table, written, rows, collection)
