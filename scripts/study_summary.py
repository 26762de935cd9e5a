"""Summarise scripts/study_defenses.sh: one row per run, and each ASK-Def variant against AT, paired by seed.

    python scripts/study_summary.py outputs/study/defenses-digits
    python scripts/study_summary.py outputs/study/run-askdef outputs/study/run-at   # one study in two OUTs
    python scripts/study_summary.py outputs/study/switched --against outputs/study/run-askdef   # one switch

A seed fixes the data subsets and the test points for every defence, so the difference of robust
kNN accuracy between a defence and AT on the same seed is a paired measurement; its mean gets a
Student t 95 % interval over the seeds (ask-report's intervals are per defence, unpaired).
Prints Markdown tables; runs that have not finished are listed as pending. A study run as several
``OUT`` directories (defences side by side, one process each) is summarised by naming them all: each
run is read from the one directory that holds it, and a run found in two is an error.

``--selection`` adds, from each training's ``metrics.jsonl``, the epoch model selection kept and
the last one with their validation accuracies, and with ``--floor F`` the epoch a clean-accuracy
floor (``train.select_min_val_acc=F``, the same rule) would have kept instead. ``--plot PNG`` draws
the paired differences: every seed, and the mean with its interval against zero. ``--against
EARLIER`` compares each defence with its own runs in another study (the same study rerun with one
switch flipped, ``OUT`` elsewhere), paired by seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ask.config.schema import TrainConfig
from ask.reporting.intervals import t_interval
from ask.reporting.plots import plot_paired_differences
from ask.training.checkpoints import read_metrics
from ask.training.validation import selection_score
from ask.utils.io import atomic_write_bytes
from ask.utils.runfiles import EPOCH_METRICS_FILE, METRICS_FILE, TRAIN_SUMMARY_FILE

DEFENSES = ("at", "ask_def_authors", "ask_def")
MEASURES = (("ask", "ASK-Atk"), ("any", "worst case over all attacks"), ("pgd", "PGD-CE"))


def finished_run(studies: list[Path], folder: str, name: str, marker: str) -> Path | None:
    """``study/folder/name`` of the one study where that run wrote ``marker``, else None; a run
    finished in two of the directories is an error (its numbers would depend on the order given)."""
    found = [study / folder / name for study in studies if (study / folder / name / marker).exists()]
    if len(found) > 1:
        raise SystemExit(f"study_summary: run {name} is finished in {len(found)} of the directories given "
                         f"({', '.join(str(p.parents[1]) for p in found)}); name each study directory once, "
                         "so that every run is read from one place")
    return found[0] if found else None


def robust_knn(studies: list[Path], defense: str, seed: int, attacks: str = "attack") -> dict[str, float] | None:
    """Robust kNN accuracy per attack (and the clean one) of one finished run, else None."""
    run = finished_run(studies, attacks, f"{defense}-seed{seed}", METRICS_FILE)
    if run is None:
        return None
    rows = [r for r in json.loads((run / METRICS_FILE).read_text())["results"] if r["victim"] == "knn"]
    return {"clean": rows[0]["clean_acc"], **{r["attack"]: r["robust_acc"] for r in rows}}


def selection(studies: list[Path], defense: str, seed: int, floor: float) -> str:
    """One row of the selection table: the kept epoch, the last, and the one ``floor`` would keep."""
    name = f"{defense}-seed{seed}"
    run = finished_run(studies, "train", name, TRAIN_SUMMARY_FILE)
    if run is None:
        return f"| {name} | pending | | |"
    summary = json.loads((run / TRAIN_SUMMARY_FILE).read_text())
    metric = summary["select_metric"]
    validated = {r["epoch"]: r for r in read_metrics(run / EPOCH_METRICS_FILE) if metric in r}
    rule = TrainConfig(select_metric=metric, select_min_val_acc=floor)
    floored = max(validated, key=lambda epoch: (selection_score(validated[epoch], rule), -epoch))

    def cell(epoch: int) -> str:
        r = validated[epoch]
        return f"{epoch}: {100 * r['val_acc']:.1f} / {100 * r['val_knn_acc']:.1f} / {100 * r[metric]:.1f}"

    return (f"| {name} | {cell(summary['best_epoch'])} | {cell(max(validated))} | {cell(floored)} |")


def paired_differences(pairs: list[tuple[dict[str, float] | None, dict[str, float] | None]], attack: str) -> list[float]:
    """Points of robust kNN accuracy under ``attack``, first minus second, for each pair where both ran it."""
    return [100 * (mine[attack] - theirs[attack]) for mine, theirs in pairs
            if mine is not None and theirs is not None and attack in mine and attack in theirs]


def difference_row(defense: str, label: str, diffs: list[float]) -> str:
    """One Markdown row: the mean paired difference, its Student t 95 % interval and every seed's."""
    interval = "n/a (one seed)"
    if len(diffs) > 1:
        low, high = t_interval(diffs)
        interval = f"[{low:+.1f}, {high:+.1f}]"
    per_seed = ", ".join(f"{d:+.1f}" for d in diffs)
    return f"| {defense} | {label} | {len(diffs)} | {statistics.fmean(diffs):+.1f} | {interval} | {per_seed} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, nargs="+", help="the study's OUT directory (or directories)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--attacks", default="attack",
                        help="the evaluations' folder in each study: attack (best.pt, the default) or "
                             "attack-last (last.pt, from CHECKPOINT=last scripts/study_defenses.sh)")
    parser.add_argument("--selection", action="store_true",
                        help="also the epochs model selection kept, the last ones, and what --floor would keep")
    parser.add_argument("--plot", type=Path, default=None,
                        help="also draw the paired differences, every seed and the mean with its interval, "
                             "into this PNG")
    parser.add_argument("--against", type=Path, nargs="+", default=[],
                        help="also each defence minus the same defence in these study directories, paired by "
                             "seed: a switch isolated by rerunning the study with OUT elsewhere")
    parser.add_argument("--floor", type=float, default=0.0,
                        help="clean-accuracy floor for --selection's last column (train.select_min_val_acc)")
    args = parser.parse_args()
    if not 0 <= args.floor <= 1:
        parser.error(f"--floor {args.floor} must be a fraction in [0, 1], as train.select_min_val_acc, e.g. 0.5")
    results = {(d, s): robust_knn(args.study, d, s, args.attacks) for d in DEFENSES for s in args.seeds}

    print("| run | clean kNN % | robust kNN % under ASK-Atk | worst case % | under PGD-CE % |")
    print("|---|---|---|---|---|")
    for (defense, seed), got in results.items():
        if got is None:
            print(f"| {defense}-seed{seed} | pending | | | |")
        else:
            cells = " | ".join("not run" if attack not in got else f"{100 * got[attack]:.1f}" for attack, _ in MEASURES)
            print(f"| {defense}-seed{seed} | {100 * got['clean']:.1f} | {cells} |")

    if args.selection:
        print(f"\n| run (epoch: val clean / val kNN clean / selection metric, %) | kept by selection | "
              f"last epoch | kept with a clean floor of {100 * args.floor:g} % |")
        print("|---|---|---|---|")
        for defense in DEFENSES:
            for seed in args.seeds:
                print(selection(args.study, defense, seed, args.floor))

    print("\n| defence − AT, paired by seed | measure | seeds | mean difference, points | 95 % interval | per seed |")
    print("|---|---|---|---|---|---|")
    paired: dict[str, dict[str, list[float]]] = {label: {} for _, label in MEASURES}
    for defense in DEFENSES[1:]:
        for attack, label in MEASURES:
            diffs = paired_differences([(results[defense, s], results["at", s]) for s in args.seeds], attack)
            if diffs:
                paired[label][defense] = diffs
                print(difference_row(defense, label, diffs))

    if args.against:
        earlier = {(d, s): robust_knn(args.against, d, s, args.attacks) for d in DEFENSES for s in args.seeds}
        print(f"\n| defence: these runs − {', '.join(map(str, args.against))}, paired by seed | measure | seeds | "
              "mean difference, points | 95 % interval | per seed |")
        print("|---|---|---|---|---|---|")
        for defense in DEFENSES:
            for attack, label in MEASURES:
                diffs = paired_differences([(results[defense, s], earlier[defense, s]) for s in args.seeds], attack)
                if diffs:
                    print(difference_row(defense, label, diffs))

    if args.plot is not None:
        checkpoint = {"attack": "kept epoch", "attack-last": "last epoch"}.get(args.attacks, args.attacks)
        png = plot_paired_differences(paired, title=f"ASK-Def − AT, robust kNN accuracy, paired by seed ({checkpoint})")
        if png is None:
            raise SystemExit("study_summary: no seed has both defences finished, so there is nothing to plot")
        atomic_write_bytes(args.plot, png)
        print(f"\nplot: {args.plot}")


if __name__ == "__main__":
    main()
