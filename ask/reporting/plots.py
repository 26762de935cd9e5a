"""PNG plots of the aggregated report rows (see :func:`ask.reporting.aggregate.aggregate`), and of
a seeded study's paired differences (:func:`plot_paired_differences`).

Figures are drawn on matplotlib's ``Figure`` directly, never through ``pyplot``, so no display and
no global backend are involved (a report written from a Hydra callback on a headless node works),
and each function returns the PNG bytes for the caller to write atomically.

Rows that differ in something other than attack, victim and eps (defence, dataset, model, norm or
a varying setting) form *families*; each family gets its own line style and a label naming only
what tells it apart from the others.

The worst case over a run's attacks (attack ``any``) is drawn like an attack, labelled ``any (worst
case)`` and, unless bars must tell families apart by colour, in dark grey.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib import rcParams
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ask.reporting.intervals import t_interval
from ask.reporting.labels import ANY_ATTACK, format_eps

_FAMILY_FIELDS = ("defense", "dataset", "model", "norm", "settings")
_LINESTYLES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
_HATCHES = ("", "//", "..", "xx", "\\\\", "oo", "++", "--", "**", "OO")
#: Above this many panels, asr_bars.png shows only the largest eps of each norm.
MAX_BAR_PANELS = 4
#: Legend entries and label length kept readable when many families share one figure.
MAX_LEGEND_ENTRIES = 24
MAX_LABEL = 90
#: The colour of the worst case, apart from the attacks' cycle.
ANY_COLOR = "0.25"


def _unique(values: Any) -> list[Any]:
    return list(dict.fromkeys(values))


def _family(row: dict[str, Any]) -> tuple:
    return tuple(row[name] for name in _FAMILY_FIELDS)


def _family_labels(families: Sequence[tuple]) -> dict[tuple, str]:
    """Each family named by the fields that differ between families (empty if there is one)."""
    differing = [i for i in range(len(_FAMILY_FIELDS)) if len({f[i] for f in families}) > 1]
    return {f: ", ".join(str(f[i]) for i in differing if f[i] != "") for f in families}


def _common_title(families: Sequence[tuple]) -> str:
    first = families[0]
    same = [str(first[i]) for i in range(len(_FAMILY_FIELDS) - 1) if len({f[i] for f in families}) == 1]
    return " / ".join(same)


def _colors() -> list[str]:
    return rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3", "C4", "C5"])


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


def _legend_shape(labels: Sequence[str]) -> tuple[int, int]:
    """Columns and rows of the legend for these labels (after :func:`_legend_entries`' cap)."""
    labels = _legend_entries(list(labels))
    longest = max((len(label) for label in labels), default=0)
    ncols = max(1, min(len(labels), 1 if longest > 45 else 2 if longest > 22 else 5))
    return ncols, math.ceil(len(labels) / ncols)


def _legend_entries(labels: list[str]) -> list[str]:
    # Past a few dozen series a legend is unreadable anyway; report.md has every number.
    if len(labels) <= MAX_LEGEND_ENTRIES:
        return labels
    return [*labels[:MAX_LEGEND_ENTRIES - 1], f"... {len(labels) - MAX_LEGEND_ENTRIES + 1} more (see report.md)"]


def _series_label(attack: str, family_label: str) -> str:
    name = f"{attack} (worst case)" if attack == ANY_ATTACK else attack
    label = name if not family_label else f"{name} ({family_label})"
    return label if len(label) <= MAX_LABEL else label[:MAX_LABEL - 3] + "..."


def _legend(figure: Figure, axes: Sequence[Any]) -> None:
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if not handles:
        return
    labels = _legend_entries(list(handles))
    shown = [handles[label] for label in labels if label in handles]
    if len(shown) < len(labels):  # the "... more" line
        shown.append(Line2D([], [], linestyle="none"))
    # Below the panels, so the legend never covers the title whatever the label lengths.
    ncols, _ = _legend_shape(labels)
    figure.legend(shown, labels, loc="outside lower center", fontsize="small", ncols=ncols)


def _std(value: float | None) -> float:
    return 0.0 if value is None or math.isnan(value) else 100 * value


def plot_robust_vs_eps(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """Robust accuracy against eps, one line per attack, one panel per victim (and norm).

    Error bars are the standard deviation over seeds. The grey dotted line is the victim's clean
    accuracy (drawn when all rows form one family). Returns None with fewer than two eps values.
    """
    rows = [r for r in rows if r["robust_acc_mean"] is not None and not math.isnan(r["eps"])]
    if len({r["eps"] for r in rows}) < 2:
        return None
    families = _unique(_family(r) for r in rows)
    labels = _family_labels(families)
    attacks = _unique(r["attack"] for r in rows)
    panels = _unique((r["norm"], r["victim"]) for r in rows)
    several_norms = len({norm for norm, _ in panels}) > 1
    colors = _colors()

    ncols = 2 if len(panels) == 4 else min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    legend_labels = _unique(_series_label(r["attack"], labels[_family(r)]) for r in rows) + ["clean"]
    legend_rows = _legend_shape(legend_labels)[1]
    figure = Figure(figsize=(4.4 * ncols + 0.6, 3.5 * nrows + 0.6 + 0.22 * legend_rows), layout="constrained")
    axes = list(figure.subplots(nrows, ncols, squeeze=False).flat)
    for ax, (norm, victim) in zip(axes, panels, strict=False):
        panel_rows = [r for r in rows if (r["norm"], r["victim"]) == (norm, victim)]
        for f_index, family in enumerate(families):
            for a_index, attack in enumerate(attacks):
                points = sorted((r for r in panel_rows if r["attack"] == attack and _family(r) == family),
                                key=lambda r: r["eps"])
                if not points:
                    continue
                errors = [_std(r["robust_acc_std"]) for r in points]
                label = _series_label(attack, labels[family])
                color = ANY_COLOR if attack == ANY_ATTACK else colors[a_index % len(colors)]
                ax.errorbar([r["eps"] for r in points], [100 * r["robust_acc_mean"] for r in points],
                            yerr=errors if any(errors) else None, color=color,
                            linestyle=_LINESTYLES[f_index % len(_LINESTYLES)], marker="o", capsize=3,
                            label=label)
        if len(families) == 1:
            clean = [r["clean_acc_mean"] for r in panel_rows if r["clean_acc_mean"] is not None]
            if clean:
                ax.axhline(100 * sum(clean) / len(clean), color="grey", linestyle=":", label="clean")
        eps_values = sorted({r["eps"] for r in panel_rows})
        if len(eps_values) <= 8:
            ax.set_xticks(eps_values, [format_eps(e, norm) for e in eps_values])
        ax.set_title(f"victim: {victim}" + (f" ({norm})" if several_norms else ""))
        ax.set_xlabel(f"eps ({norm})")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        figure.delaxes(ax)
    _legend(figure, axes[:len(panels)])
    figure.suptitle(f"Robust accuracy against eps — {_common_title(families)}", x=0.02, ha="left")
    return _png(figure)


def plot_asr_bars(rows: Sequence[dict[str, Any]]) -> bytes | None:
    """ASR bars per attack, grouped by victim; one panel per eps (only the largest when many).

    Bars are labelled with their value in percent; error bars are the standard deviation over
    seeds. Returns None when no row has an ASR.
    """
    rows = [r for r in rows if r["asr_mean"] is not None]
    if not rows:
        return None
    panels = sorted(_unique((r["norm"], r["eps"]) for r in rows))
    if len(panels) > MAX_BAR_PANELS:
        panels = [(norm, max(r["eps"] for r in rows if r["norm"] == norm)) for norm in _unique(r["norm"] for r in rows)]
    families = _unique(_family(r) for r in rows)
    labels = _family_labels(families)
    series = _unique((_family(r), r["attack"]) for r in rows)
    attacks = _unique(r["attack"] for r in rows)
    colors = _colors()
    victims = _unique(r["victim"] for r in rows)

    width = 0.8 / len(series)
    legend_rows = _legend_shape([_series_label(a, labels[f]) for f, a in series])[1]
    # Panels are stacked, one eps per row: side by side, three or four of them made a strip too
    # wide to read on a page.
    figure = Figure(figsize=(max(4.5, 1.2 + 0.45 * len(series) * len(victims)) + 0.6,
                             3.6 * len(panels) + 0.6 + 0.22 * legend_rows),
                    layout="constrained")
    axes = list(figure.subplots(len(panels), 1, squeeze=False).flat)
    annotate = len(series) * len(victims) <= 30
    # One decimal, as in report.md, where the bars are wide enough for it.
    label_format = "{:.1f}" if len(series) * len(victims) <= 12 else "{:.0f}"
    for ax, (norm, eps) in zip(axes, panels, strict=True):
        for s_index, (family, attack) in enumerate(series):
            by_victim = {r["victim"]: r for r in rows
                         if (r["norm"], r["eps"], r["attack"]) == (norm, eps, attack) and _family(r) == family}
            xs = [v_index + (s_index - (len(series) - 1) / 2) * width
                  for v_index, victim in enumerate(victims) if victim in by_victim]
            present = [by_victim[victim] for victim in victims if victim in by_victim]
            if not present:
                continue
            heights = [100 * r["asr_mean"] for r in present]
            errors = [_std(r["asr_std"]) for r in present]
            label = _series_label(attack, labels[family])
            # One family: a colour per attack. Several: a colour per bar series, a hatch per family.
            color = colors[(attacks.index(attack) if len(families) == 1 else s_index) % len(colors)]
            if attack == ANY_ATTACK and len(families) == 1:
                color = ANY_COLOR
            bars = ax.bar(xs, heights, width=width * 0.95, yerr=errors if any(errors) else None, capsize=2,
                          color=color, hatch=_HATCHES[families.index(family) % len(_HATCHES)], label=label)
            if annotate:
                ax.bar_label(bars, labels=[label_format.format(h) for h in heights], fontsize="x-small", padding=1)
        ax.set_xticks(range(len(victims)), victims)
        ax.set_xlabel("victim")
        ax.set_ylabel("attack success rate (%)")
        ax.set_ylim(0, 108)
        ax.set_title(f"{norm} eps = {format_eps(eps, norm)}")
        ax.grid(axis="y", alpha=0.3)
    _legend(figure, figure.axes)
    figure.suptitle(f"ASR by victim — {_common_title(families)}", x=0.02, ha="left")
    return _png(figure)


def plot_paired_differences(differences: Mapping[str, Mapping[str, Sequence[float]]], *, title: str) -> bytes | None:
    """A seeded study's paired differences: ``differences[measure][defence]`` holds one value per
    seed (points of robust accuracy, defence minus the baseline).

    One group per measure, one column per defence: every seed as a dot, the mean with its Student
    t 95 % interval beside them, and a line at zero, which is what a reader checks the interval
    against. Returns None when there is nothing to draw.
    """
    measures = [m for m, by_defence in differences.items() if any(by_defence.values())]
    if not measures:
        return None
    defences = _unique(d for m in measures for d, values in differences[m].items() if values)
    colors = _colors()
    width = 0.8 / len(defences)
    figure = Figure(figsize=(1.2 + 1.6 * len(measures) * max(1, len(defences) / 2) + 0.6, 4.2), layout="constrained")
    ax = figure.subplots()
    for d_index, defence in enumerate(defences):
        for m_index, measure in enumerate(measures):
            values = list(differences[measure].get(defence) or [])
            if not values:
                continue
            x = m_index - 0.4 + width * (d_index + 0.5)
            color = colors[d_index % len(colors)]
            ax.scatter([x - width * 0.15] * len(values), values, s=14, facecolors="none", edgecolors=color,
                       label=defence if m_index == 0 else None)
            mean = sum(values) / len(values)
            low, high = t_interval(values) if len(values) > 1 else (mean, mean)
            ax.errorbar([x + width * 0.15], [mean], yerr=[[mean - low], [high - mean]], color=color, marker="D",
                        markersize=5, capsize=4, linestyle="none")
    ax.axhline(0.0, color="grey", linewidth=1)
    ax.set_xticks(range(len(measures)), measures)
    ax.set_xlim(-0.6, len(measures) - 0.4)
    ax.set_ylabel("difference, points of robust accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small")
    ax.set_title(title, fontsize="medium", loc="left")
    return _png(figure)
