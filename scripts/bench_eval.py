"""Full-evaluation wall time of this tree against an older commit: the same ``ask-attack`` run in both.

Usage (``scripts/bench.py --eval-against REF --eval-args ...`` calls the same code)::

    python scripts/bench_eval.py --against HEAD~8 --threads 1 --out /tmp/bench-eval -- \\
        dataset=cifar10_folder dataset.root=../shared/data/cifar10-jpeg \\
        model.checkpoint=outputs/train/cifar10/best.pt eval.n_points=1000

Everything after ``--`` is passed to ``ask-attack`` in both trees (default: the digits demo).
Relative paths among those values are made absolute first, since each run starts in its own tree.

1. The old tree: ``git archive REF`` exported to ``<cache>/bench-trees/<sha>`` (kept for the next
   run), or ``--old-tree DIR``, e.g. an existing worktree of REF. Both trees run with this
   Python (``python -m ask.cli.attack`` in the tree's root, so its own ``ask`` and ``conf/``).
2. One cache directory (``--cache-dir``, default ``$ASK_CACHE_DIR`` or ``<out>/cache``) serves both,
   and each tree first runs once with ``attack=[pgd] eval.n_points=<batch>``: the decoded dataset,
   an auto-trained model and the pool's features exist before any timed run, so the timings
   differ only by what the evaluation itself costs.
3. Timed runs, interleaved so that a change in the machine's load falls on every side: per
   repeat, ``old``, ``new-cold`` (this tree with the fitted-part cache, ``<features>/fitted``,
   emptied first: Adv-kNN's head fit and the DkNN attack's eta paid in the run) and ``new``
   (this tree as a later evaluation of the same checkpoint finds it: fitted parts cached); the
   order reverses on odd repeats.
4. Every new run's ``metrics.json`` is compared with the old run's: clean and robust accuracy,
   ASR, perturbation norms, zero-gradient counts and the worst-case breakdown must be equal.
5. Precision: a tree that has ``eval.amp`` runs it ``off`` (fp32) in those variants, so that the
   comparison measures the code, not the arithmetic, on a CPU whose bf16 units ``auto`` would
   use. Where ``auto`` does pick bf16 here, one more variant, ``new-auto``, runs the new tree as a
   user gets it (fitted parts cached, ``eval.amp=auto``) beside the others; its results are listed
   against the old run's but, differing by the rounding only, do not fail the comparison.

The table gives the median wall time per side and its ratio to the old one (target <= 1/3 for
``new``), the same for the runs' CPU time (user + system of the ``ask-attack`` process: with
``--threads 1`` it is the work done, which other programs on the machine do not inflate as they
do wall time), and each attack's seconds as ``metrics.json`` reports them (the time of its calls,
including any one-off fit in its first batch); ``other`` is the rest of the wall time: start-up,
loading, DkNN calibration and scoring the victims. ``bench_eval.json`` in ``--out`` holds the
environment, the commands and every run's numbers.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ask.utils.runfiles import METRICS_FILE

log = logging.getLogger("bench_eval")

REPO = Path(__file__).resolve().parents[1]
TARGET = 1 / 3  # new / old full-evaluation wall time (issue 16)
VARIANTS = ("old", "new-cold", "new")
AUTO_VARIANT = "new-auto"  # the new tree in its default precision, where that is bf16 (point 5)
# What must be equal between the old and new runs' result rows (timings are not).
COMPARED = ("clean_acc", "robust_acc", "asr", "n_points", "mean_linf", "max_linf", "mean_l2", "max_l2",
            "zero_grad_points", "mean_credibility_clean", "mean_credibility_adv", "broken_by", "only_by")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


def export_tree(ref: str, cache: Path) -> tuple[Path, str]:
    """``ref``'s files (``git archive``) under ``cache/bench-trees/<sha>``; reused when already there."""
    sha = _git("rev-parse", "--verify", f"{ref}^{{commit}}")
    tree = cache / "bench-trees" / sha
    if (tree / "ask").is_dir():
        return tree, sha
    partial = tree.with_name(f".{sha}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", sha], cwd=REPO, check=True, capture_output=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(partial, filter="data")
    os.replace(partial, tree)
    return tree, sha


def absolute_paths(overrides: list[str], cwd: Path) -> list[str]:
    """``key=value`` overrides whose value names an existing relative path, made absolute."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if sep and value and not os.path.isabs(value) and (cwd / value).exists():
            item = f"{key}={(cwd / value).resolve()}"
        out.append(item)
    return out


def _child_env(cache: Path, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(ASK_CACHE_DIR=str(cache), HYDRA_FULL_ERROR="1", PYTHONDONTWRITEBYTECODE="1")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def run_attack(tree: Path, overrides: list[str], run_dir: Path, cache: Path, threads: int) -> dict[str, Any]:
    """One ``ask-attack`` run in ``tree``: wall and CPU seconds, load average, its metrics.json."""
    cmd = [sys.executable, "-m", "ask.cli.attack", *overrides, "progress=false", f"hydra.run.dir={run_dir}"]
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover eval_state.pt would resume, not rerun
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=_child_env(cache, threads), capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"ask-attack failed in {tree} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    return {
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "load_average_start": load,
        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "attack_seconds": attack_seconds(metrics),
        "metrics": metrics,
    }


def attack_seconds(metrics: dict[str, Any]) -> dict[str, float]:
    """Each attack's ``seconds`` (the same on every victim's row; the worst-case row left out)."""
    return {row["attack"]: row["seconds"] for row in metrics["results"] if row["attack"] != "any"}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Where two runs' result rows disagree (empty when every compared number is equal)."""
    rows_old = {(r["attack"], r["victim"]): r for r in old["results"]}
    rows_new = {(r["attack"], r["victim"]): r for r in new["results"]}
    if rows_old.keys() != rows_new.keys():
        return [f"different rows: {sorted(rows_old.keys() ^ rows_new.keys())}"]
    found = []
    for key, row in rows_old.items():
        for name in COMPARED:
            if row.get(name) != rows_new[key].get(name):
                found.append(f"{key[0]}/{key[1]} {name}: {row.get(name)!r} -> {rows_new[key].get(name)!r}")
    return found


def knows_eval_amp(tree: Path) -> bool:
    """Whether ``tree``'s config has the ``eval.amp`` setting (older commits ran every attack in fp32)."""
    from omegaconf import OmegaConf

    # The eval section lived in train.yaml before 33e20f8 and in run.yaml since.
    files = [tree / "conf" / name for name in ("run.yaml", "train.yaml")]
    return any(f.is_file() and "amp" in (OmegaConf.load(f).get("eval") or {}) for f in files)


def auto_picks_bf16(overrides: list[str]) -> bool:
    """Whether this tree's ``eval.amp=auto`` runs bf16 on the device those overrides select."""
    from ask.utils.precision import resolve_amp
    from ask.utils.runtime import select_device

    spec = next((o.partition("=")[2] for o in reversed(overrides) if o.startswith("device=")), None)
    device = select_device(spec or os.environ.get("ASK_DEVICE", "auto"))
    return resolve_amp("auto", device) is not None


def clear_fitted(cache: Path) -> None:
    """Empty the fitted-part caches (Adv-kNN heads, DkNN eta) that live beside each feature cache."""
    for fitted in (cache / "features").glob("*/fitted"):
        shutil.rmtree(fitted, ignore_errors=True)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median wall time and attack seconds per variant, ratios to ``old`` and the equality check."""
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run)
    summary: dict[str, Any] = {}
    for variant, items in by_variant.items():
        attacks = items[0]["attack_seconds"].keys()
        wall = statistics.median(r["wall_s"] for r in items)
        seconds = {a: statistics.median(r["attack_seconds"][a] for r in items) for a in attacks}
        summary[variant] = {"wall_s": wall, "runs": len(items), "attack_seconds": seconds,
                            "other_s": wall - sum(seconds.values()),
                            "cpu_s": statistics.median(r["cpu_s"] for r in items)}
    old = summary.get("old")
    reference = by_variant.get("old", [None])[0]
    for variant, entry in summary.items():
        if old is not None and variant != "old":
            entry["over_old"] = entry["wall_s"] / old["wall_s"]
            entry["cpu_over_old"] = entry["cpu_s"] / old["cpu_s"]
            entry["differences"] = sorted({d for r in by_variant[variant]
                                           for d in differences(reference["metrics"], r["metrics"])})
    return summary


def format_table(summary: dict[str, Any]) -> str:
    attacks = list(next(iter(summary.values()))["attack_seconds"])
    head = ["variant", "runs", "wall s", "vs old", "cpu s", "vs old", *attacks, "other", "results"]
    lines = ["  ".join(f"{h:>8}" for h in head)]
    for variant, entry in summary.items():
        ratio = entry.get("over_old")
        verdict = "" if ratio is None else ("pass" if ratio <= TARGET else "MISS") if variant == "new" else ""
        ratio_text = "" if ratio is None else f"{ratio:.3f}{' ' + verdict if verdict else ''}"
        same = "" if "differences" not in entry else (
            "equal" if not entry["differences"] else "bf16" if variant == AUTO_VARIANT else "DIFFER")
        cpu_ratio = entry.get("cpu_over_old")
        cells = [variant, str(entry["runs"]), f"{entry['wall_s']:.0f}", ratio_text, f"{entry['cpu_s']:.0f}",
                 "" if cpu_ratio is None else f"{cpu_ratio:.3f}",
                 *(f"{entry['attack_seconds'][a]:.1f}" for a in attacks), f"{entry['other_s']:.1f}", same]
        lines.append("  ".join(f"{c:>8}" for c in cells))
    return "\n".join(lines)


def run_eval_benchmark(against: str, overrides: list[str], *, out: Path, repeats: int = 1, threads: int = 0,
                       cache: Path | None = None, old_tree: Path | None = None) -> int:
    """The whole measurement (see the module docstring); 0, or 1 when the results differ."""
    out.mkdir(parents=True, exist_ok=True)
    cache = (cache or Path(os.environ.get("ASK_CACHE_DIR") or out / "cache")).expanduser().resolve()
    if old_tree is None:
        old_tree, sha = export_tree(against, cache)
    else:
        old_tree, sha = old_tree.resolve(), _git("rev-parse", "--verify", f"{against}^{{commit}}")
    trees = {"old": old_tree, "new-cold": REPO, "new": REPO, AUTO_VARIANT: REPO}
    overrides = absolute_paths(overrides, Path.cwd())
    log.info("old tree %s (%s), new tree %s, cache %s", old_tree, sha[:10], REPO, cache)
    # Point 5 of the module docstring: fp32 wherever a tree can be told so, unless the caller chose.
    user_amp = any(o.startswith("eval.amp=") for o in overrides)
    pinned = {variant: [] if user_amp or not knows_eval_amp(tree) else ["eval.amp=off"]
              for variant, tree in trees.items()}
    pinned[AUTO_VARIANT] = []
    variants = VARIANTS + ((AUTO_VARIANT,) if not user_amp and auto_picks_bf16(overrides) else ())

    # Warm the shared caches (dataset, model, pool features) with a cheap run of each tree: PGD
    # only, 8 points; the store holds the same layers, since the attacks tap knn.layers.
    replaced = ("attack=", "attack.methods.", "eval.n_points=")
    warm = [o for o in overrides if not o.startswith(replaced)] + ["attack=[pgd]", "eval.n_points=8"]
    for side in ("old", "new"):
        log.info("warming the caches with the %s tree", side)
        run_attack(trees[side], warm + pinned[side], out / "runs" / f"warm-{side}", cache, threads)

    runs = []
    for repeat in range(repeats):
        for variant in variants if repeat % 2 == 0 else variants[::-1]:
            if variant == "new-cold":
                clear_fitted(cache)
            log.info("repeat %d: %s", repeat + 1, variant)
            result = run_attack(trees[variant], overrides + pinned[variant], out / "runs" / f"{variant}-{repeat}", cache, threads)
            log.info("%s took %.0f s", variant, result["wall_s"])
            runs.append({"variant": variant, "repeat": repeat, **result})

    summary = summarise(runs)
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpu_count": os.cpu_count(), "threads": threads,
                        "new_commit": _git("rev-parse", "HEAD"), "new_tree_dirty": bool(_git("status", "--porcelain"))},
        "against": {"ref": against, "sha": sha, "tree": str(old_tree)},
        "overrides": overrides, "variant_overrides": {v: pinned[v] for v in variants},
        "repeats": repeats, "target_new_over_old": TARGET, "cache": str(cache),
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "metrics"} for r in runs],
    }
    (out / "bench_eval.json").write_text(json.dumps(report, indent=1))
    loads = [r["load_average_start"] for r in runs if r["load_average_start"] is not None]
    sys.stdout.write(f"ask-attack {' '.join(overrides)}\nold = {against} ({sha[:10]}), new = {REPO} "
                     f"(HEAD {report['environment']['new_commit'][:10]}); {repeats} repeat(s), threads "
                     f"{threads or 'default'}, load average {min(loads, default=0):.1f}-{max(loads, default=0):.1f}\n")
    sys.stdout.write(format_table(summary) + "\n")
    for variant, entry in summary.items():
        found = entry.get("differences", [])
        if variant == AUTO_VARIANT and found:
            sys.stdout.write(f"{variant} (bf16) differs from old in {len(found)} numbers, e.g. {found[0]}\n")
            continue
        for line in found[:20]:
            sys.stdout.write(f"{variant} differs from old: {line}\n")
    sys.stdout.write(f"bench_eval.json in {out.resolve()}\n")
    # new-auto differs from fp32 by rounding; only the fp32 variants must give the old numbers.
    return 1 if any(entry.get("differences") for v, entry in summary.items() if v != AUTO_VARIANT) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, metavar="REF", help="the old commit (any git revision)")
    parser.add_argument("--old-tree", type=Path, help="a checkout of REF to use instead of exporting it")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds of (old, new-cold, new)")
    parser.add_argument("--threads", type=int, default=0, help="OMP/MKL threads of the runs (0: torch's default)")
    parser.add_argument("--cache-dir", type=Path, help="ASK_CACHE_DIR of both trees (default $ASK_CACHE_DIR)")
    parser.add_argument("--out", type=Path, default=Path("bench-eval"), help="runs and bench_eval.json go here")
    parser.add_argument("overrides", nargs="*", help="ask-attack overrides (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    return run_eval_benchmark(args.against, args.overrides, out=args.out, repeats=args.repeats,
                              threads=args.threads, cache=args.cache_dir, old_tree=args.old_tree)


if __name__ == "__main__":
    sys.exit(main())
