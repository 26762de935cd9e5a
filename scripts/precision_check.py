"""Does bf16 autocast change the numbers? fp32 against bf16, same schedule, same points.

Usage::

    python scripts/precision_check.py --out outputs/precision/cifar10          # the CIFAR-10 check
    python scripts/precision_check.py --budget digits --out outputs/precision/digits

Trains the same model twice with the same seed and schedule, ``train.amp=off`` and
``train.amp=bf16``, and reports both test accuracies. Then attacks the fp32 model with PGD-CE
and ASK-Atk on the same points twice, ``eval.amp=off`` and ``eval.amp=bf16`` (victims always
judge in fp32), and reports the attack success rates. ``train.amp=bf16`` forces autocast even on
a CPU without bf16 units (slow there, but the same rounding), so the numerics can be checked on
any machine; the speed of the fast path is ``scripts/bench.py --kinds train``'s business.

The check passes when each difference is within ``--tolerance`` points (default 1, the issue's
criterion). The attacks run on every test point of the budget unless ``--points`` says fewer:
bf16 flips a few points each way (about 1 % of them on CIFAR-10, see docs/RESULTS.md), so on
500 points the net difference alone can pass 1 point. Each attack check counts those flips:
``robust_fp32_only`` points the attack broke in bf16 but not in fp32, ``robust_bf16_only`` the
reverse. Everything is written under ``--out`` (the runs' own directories, then ``precision_check.json``,
or ``precision_check-eps2_255.json`` with ``--eps 2/255``); the same command resumes, since
``ask-train`` and ``ask-attack`` resume in their run directories and finished runs are skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ask.utils.runfiles import BEST_CHECKPOINT, METRICS_FILE, PER_POINT_FILE, TRAIN_SUMMARY_FILE

ROOT = Path(__file__).resolve().parents[1]
BUDGETS: dict[str, list[str]] = {
    # CIFAR-10 smallcnn width 16 on 10,000 training images for 5 epochs, 2,000 test images; no
    # robust validation (the attacks' check is the second half).
    "cifar10": ["dataset=cifar10_folder", f"dataset.root={ROOT.parent / 'shared/data/cifar10-jpeg'}",
                "dataset.train_per_class=1000", "dataset.test_per_class=200", "knn.pool_per_class=1000",
                "model.width=16", "train.val_points=0",
                "train.epochs=5", "train.batch_size=128"],
    "digits": ["dataset=digits", "train.epochs=10"],
}
ATTACK = ["attack=[ask,pgd]", "eval.victims=[dnn,knn]"]


def _cli(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _run(command: list[str], done: Path) -> None:
    if done.exists():
        print(f"done already: {done}", flush=True)
        return
    print("+ " + " ".join(command), flush=True)
    if subprocess.run(command, cwd=ROOT).returncode != 0:
        raise SystemExit(f"precision_check: {Path(command[0]).name} failed (its message is above); "
                         "fix it and run the same command again: finished runs are kept")


def _asr(metrics: dict[str, Any], attack: str, victim: str) -> float:
    row = next(r for r in metrics["results"] if r["attack"] == attack and r["victim"] == victim)
    return 100.0 * row["asr"]


def _flips(off_run: Path, bf16_run: Path, attack: str, victim: str) -> dict[str, int]:
    """Points right on x in both runs whose fate under ``attack`` differs between them."""
    def fates(run: Path) -> dict[str, tuple[str, str]]:
        with (run / PER_POINT_FILE).open(newline="") as handle:
            return {row["point"]: (row["clean"], row[attack]) for row in csv.DictReader(handle)
                    if row["victim"] == victim}
    off, bf16 = fates(off_run), fates(bf16_run)
    both_right = [p for p in off if off[p][0] == "1" and bf16.get(p, ("0",))[0] == "1"]
    return {"robust_fp32_only": sum(off[p][1] == "1" and bf16[p][1] == "0" for p in both_right),
            "robust_bf16_only": sum(off[p][1] == "0" and bf16[p][1] == "1" for p in both_right)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cifar10")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--points", type=int, default=None,
                        help="attacked test points (default: every test point of the budget)")
    parser.add_argument("--tolerance", type=float, default=1.0, help="allowed difference, in points")
    parser.add_argument("--eps", default=None,
                        help="attack radius, e.g. 2/255 (default: the budget's); its runs get their own directories")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both trainings")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    budget = BUDGETS[args.budget] + args.overrides

    summaries = {}
    for amp in ("off", "bf16"):
        run_dir = out / f"train-{amp}"
        _run([_cli("ask-train"), *budget, f"train.amp={amp}", f"hydra.run.dir={run_dir}"],
             run_dir / TRAIN_SUMMARY_FILE)
        summaries[amp] = json.loads((run_dir / TRAIN_SUMMARY_FILE).read_text())

    checkpoint = out / "train-off" / BEST_CHECKPOINT
    attacks = {}
    suffix = "" if args.eps is None else "-eps" + args.eps.replace("/", "_")
    radius = [] if args.eps is None else [f"attack.eps={args.eps}"]
    # The point count names the run directories, so that a finished run on other points is not reused.
    points = "all" if args.points is None else str(args.points)
    attack_dirs = {amp: out / f"attack-{amp}-{points}{suffix}" for amp in ("off", "bf16")}
    for amp, run_dir in attack_dirs.items():
        _run([_cli("ask-attack"), *budget, *ATTACK, *radius, f"model.checkpoint={checkpoint}",
              f"eval.n_points={'null' if args.points is None else args.points}", f"eval.amp={amp}",
              f"hydra.run.dir={run_dir}"],
             run_dir / METRICS_FILE)
        attacks[amp] = json.loads((run_dir / METRICS_FILE).read_text())

    checks = {"test_acc": (100 * summaries["off"]["test_acc"], 100 * summaries["bf16"]["test_acc"])}
    flips = {}
    for attack, victim in (("pgd", "dnn"), ("pgd", "knn"), ("ask", "knn")):
        checks[f"asr_{attack}_{victim}"] = (_asr(attacks["off"], attack, victim), _asr(attacks["bf16"], attack, victim))
        flips[f"asr_{attack}_{victim}"] = _flips(attack_dirs["off"], attack_dirs["bf16"], attack, victim)
    report = {
        "budget": budget,
        "points": attacks["off"]["n_points"],
        "eps": attacks["off"]["eps"],
        "tolerance_points": args.tolerance,
        "precision": {"train": {amp: s["precision"] for amp, s in summaries.items()},
                      "attack": {amp: m["precision"] for amp, m in attacks.items()}},
        "checks": {name: {"fp32": a, "bf16": b, "difference": b - a, "passed": abs(b - a) <= args.tolerance,
                          **flips.get(name, {})}
                   for name, (a, b) in checks.items()},
    }
    report["passed"] = all(c["passed"] for c in report["checks"].values())
    (out / f"precision_check{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{report['points']} attacked points")
    print(f"{'check':<16} {'fp32 %':>8} {'bf16 %':>8} {'diff':>7}        flips (fp32-robust only / bf16-robust only)")
    for name, c in report["checks"].items():
        flipped = f"  {c['robust_fp32_only']:>5} / {c['robust_bf16_only']}" if "robust_fp32_only" in c else ""
        print(f"{name:<16} {c['fp32']:>8.2f} {c['bf16']:>8.2f} {c['difference']:>+7.2f}  "
              f"{'pass' if c['passed'] else 'MISS'}{flipped}")
    print(f"wrote {out / f'precision_check{suffix}.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
