"""Plain-text tables for the console (the paper tables come from ``ask-report``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

COLUMNS = (
    ("attack", "attack", "{}"),
    ("victim", "victim", "{}"),
    ("clean_acc", "clean", "{:.1%}"),
    ("robust_acc", "robust", "{:.1%}"),
    ("asr", "ASR", "{:.1%}"),
    ("mean_linf", "mean Linf", "{:.4f}"),
    ("n_points", "n", "{}"),
    ("images_per_second", "img/s", "{:.1f}"),
)


def format_results_table(rows: Sequence[dict[str, Any]]) -> str:
    """Align the result rows of ``metrics.json`` into a table, one line per (attack, victim)."""
    header = [title for _, title, _ in COLUMNS]
    body = [
        ["-" if row.get(key) is None else fmt.format(row[key]) for key, _, fmt in COLUMNS]
        for row in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) if i > 1 else cell.ljust(width)
                       for i, (cell, width) in enumerate(zip(line, widths, strict=True)))
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
