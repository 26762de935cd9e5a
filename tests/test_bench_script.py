"""scripts/bench.py in its --quick mode: it runs end to end and bench.json holds what it promises."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ask.utils import precision

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    # One thread: the test must not depend on how busy the machine's other cores are.
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--threads", "1", "--out", str(out),
         "--attack-amp", "bf16", "--attack-channels-last"],  # as ask-attack runs on a bf16 CPU
        cwd=REPO, capture_output=True, text=True, timeout=600,  # minutes only on a starved machine
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ASK-Atk / PGD-CE per step" in proc.stdout
    return json.loads((out / "bench.json").read_text())


def test_bench_json_has_environment_settings_and_targets(report: dict) -> None:
    env = report["environment"]
    for key in ("device", "device_name", "torch", "faiss", "cpu_count", "python", "load_average_start"):
        assert key in env
    assert env["device"] in ("cpu", "cuda")
    s = report["settings"]
    assert (s["batch"], s["pool"], s["steps"], s["repeats"], s["threads"]) == (8, 2000, [1, 2], 2, 1)
    assert report["errors"] == {}
    targeted = {r["measurement"]: r for r in report["summary"] if r["target"] is not None}
    # The 2x training target holds only where bf16 runs in hardware; elsewhere the row has no target.
    native = {"bf16 + channels_last / fp32 per training step"} if report["results"]["train"]["native_bf16"] else set()
    assert set(targeted) == {
        "ASK-Atk / PGD-CE per step", "ASK-Atk instance-wise / PGD-CE per step", "store cached / fresh",
        "faiss search / forward", "torch brute force / forward",
    } | native
    assert targeted["ASK-Atk / PGD-CE per step"]["target"] == 1.0
    for row in targeted.values():
        assert row["passed"] == (row["value"] <= row["target"])


def test_attack_ratio_comes_from_the_raw_timings(report: dict) -> None:
    a = report["results"]["attack"]
    wall = a["raw"]["wall_s"]
    assert a["store_from_cache"] is True  # the attack reused the pool cache the store worker wrote
    for name in ("ask", "ask_instance", "pgd"):
        t1, t2 = wall[f"{name}_steps1"], wall[f"{name}_steps2"]
        assert len(t1) == len(t2) == 2
        per_step = [b - c for c, b in zip(t1, t2, strict=True)]  # S2 - S1 = 1 step
        assert a[f"{name}_step_s"] == pytest.approx(statistics.median(per_step))
    for name in ("ask", "ask_instance"):
        assert a[f"{name}_over_pgd_step"] == pytest.approx(a[f"{name}_step_s"] / a["pgd_step_s"])
        assert a[f"{name}_references_s"] > 0
    assert a["search_per_class_s"] > 0
    assert a["ask_margin_s"] == pytest.approx(statistics.median(wall["ask_margin"]))
    assert a["ask_less_margin_over_pgd_step"] == pytest.approx((a["ask_step_s"] - a["ask_margin_s"]) / a["pgd_step_s"])
    assert a["ask_sums_read_s"] == pytest.approx(statistics.median(wall["ask_sums_read"]))
    assert a["ask_one_pass_floor_over_pgd_step"] == pytest.approx(
        a["ask_less_margin_over_pgd_step"] + a["ask_sums_read_s"] / a["pgd_step_s"])
    assert a["torch_threads"] == 1
    # --attack-amp bf16 --attack-channels-last reached the timed passes
    assert (a["attack_precision"], a["attack_logits_dtype"]) == ("bf16", "bfloat16")
    assert a["attack_channels_last"] and a["attack_conv_weights_channels_last"]
    for label in ("ask_steps2", "ask_instance_steps2", "pgd_steps2", "ask_references", "ask_instance_references"):
        assert a["peak_memory"][label]["host_delta_mb"] >= 0


def test_store_and_search_results(report: dict) -> None:
    b = report["results"]["store"]
    assert len(b["raw"]["wall_s"]["fresh_build"]) == len(b["raw"]["wall_s"]["cached_build"]) == 1
    assert b["cached_over_fresh_build"] == pytest.approx(b["cached_build_s"] / b["fresh_build_s"])
    # smallcnn width 8 taps block3: 32 channels of 8x8.
    assert b["feature_dim"] == 32 * 8 * 8
    c = report["results"]["search"]
    assert c["pool_points"] == 2000 and c["feature_dim"] == 32 * 8 * 8
    assert c["faiss_over_forward"] == pytest.approx(c["faiss_search_s"] / c["forward_s"])
    # Both searches are exact, so they find the same neighbours.
    assert c["faiss_torch_neighbour_agreement"] == pytest.approx(1.0)
    assert {"forward", "faiss_search", "torch_brute_force", "faiss_index_build"} <= set(c["peak_memory"])
    assert c["process_max_rss_mb"] > 0


def test_training_variants_side_by_side(report: dict) -> None:
    t = report["results"]["train"]
    variants = ("fp32", "channels_last", "bf16", "bf16_channels_last")
    wall = t["raw"]["wall_s"]
    for name in variants:
        assert len(wall[name]) == 2
        assert t["step_s"][name] == pytest.approx(statistics.median(wall[name]))
        assert t["over_fp32"][name] == pytest.approx(t["step_s"][name] / t["step_s"]["fp32"])
        assert t["images_per_second"][name] == pytest.approx(8 / t["step_s"][name])
    # train.amp=auto's choice: bf16 only on bf16 hardware, channels-last always
    assert t["default_variant"] == ("bf16_channels_last" if t["native_bf16"] else "channels_last")


# ------------------------------------------------------------------ --eval-against (bench_eval.py)
sys.path.insert(0, str(REPO / "scripts"))
import bench_eval  # noqa: E402


@pytest.fixture(scope="module")
def eval_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    # This tree against its own HEAD on a tiny digits run: the mechanics, not a speed-up.
    out = tmp_path_factory.mktemp("bench-eval")
    args = ["train.epochs=1", "model.width=8", "eval.n_points=8", "attack=[pgd,advknn,dknn]", "attack.steps=2",
            "attack.methods.advknn.fit_steps=5", "eval.victims=[dnn,knn]"]
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--eval-against", "HEAD", "--threads", "1",
         "--out", str(out), "--eval-args", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "ASK_CACHE_DIR": str(out / "cache")},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "new-cold" in proc.stdout and "vs old" in proc.stdout
    return json.loads((out / "bench_eval.json").read_text()), out


# Slow: it trains and evaluates three times over (old tree, new cold, new warm); `make test-all` runs it.
@pytest.mark.slow
def test_eval_against_times_both_trees_and_compares_their_results(eval_report: tuple[dict, Path]) -> None:
    report, out = eval_report
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert report["against"]["sha"] == head
    assert (Path(report["against"]["tree"]) / "ask" / "attacks" / "advknn.py").is_file()
    # Where eval.amp=auto means bf16 (a CPU with bf16 units), the default precision runs as well.
    bf16_here = bench_eval.auto_picks_bf16(report["overrides"])
    assert [r["variant"] for r in report["runs"]] == ["old", "new-cold", "new"] + ["new-auto"] * bf16_here
    # Both trees know eval.amp, so the compared runs are pinned to fp32 and new-auto is the default.
    assert report["variant_overrides"]["old"] == report["variant_overrides"]["new"] == ["eval.amp=off"]
    assert report["variant_overrides"].get("new-auto", []) == []
    summary = report["summary"]
    for variant in ("new-cold", "new"):
        assert summary[variant]["differences"] == []  # the same code gives the same numbers
        assert summary[variant]["over_old"] == pytest.approx(summary[variant]["wall_s"] / summary["old"]["wall_s"])
        assert summary[variant]["cpu_over_old"] == pytest.approx(summary[variant]["cpu_s"] / summary["old"]["cpu_s"])
    for run in report["runs"]:
        assert set(run["attack_seconds"]) == {"pgd", "advknn", "dknn"} and run["wall_s"] > 0 and run["cpu_s"] > 0
    entry = summary["old"]
    assert entry["other_s"] == pytest.approx(entry["wall_s"] - sum(entry["attack_seconds"].values()))
    # The new tree fitted Adv-kNN's head and cached it beside the pool's features.
    assert list((out / "cache" / "features").glob("*/fitted/advknn-head-*.pt"))


def test_eval_benchmark_pins_fp32_only_in_trees_that_know_eval_amp(tmp_path: Path) -> None:
    assert bench_eval.knows_eval_amp(REPO)
    before, after = tmp_path / "before", tmp_path / "after"
    for tree, name, text in ((before, "train.yaml", "eval:\n  n_points: null\n"),
                             (after, "run.yaml", "eval:\n  n_points: null\n  amp: auto\n")):
        (tree / "conf").mkdir(parents=True)
        (tree / "conf" / name).write_text(text)
    assert not bench_eval.knows_eval_amp(before)  # 8c01cd1's layout: every attack ran in fp32
    assert bench_eval.knows_eval_amp(after)
    # The extra new-auto variant runs exactly where the CPU's bf16 units would be used.
    assert bench_eval.auto_picks_bf16(["device=cpu", "eval.n_points=8"]) == precision.cpu_has_native_bf16()


def test_eval_differences_name_each_changed_number(tmp_path: Path) -> None:
    row = {"attack": "pgd", "victim": "knn", "robust_acc": 0.5, "asr": 0.25, "mean_linf": 0.03, "seconds": 9.0}
    old = {"results": [row, {**row, "victim": "dnn"}]}
    new = {"results": [{**row, "seconds": 1.0}, {**row, "victim": "dnn", "asr": 0.3}]}
    assert bench_eval.differences(old, new) == ["pgd/dnn asr: 0.25 -> 0.3"]  # timings are not compared
    assert bench_eval.differences(old, {"results": [row]}) == ["different rows: [('pgd', 'dnn')]"]
    (tmp_path / "data").mkdir()
    assert bench_eval.absolute_paths(["dataset.root=data", "eval.n_points=8", "x=/abs"], tmp_path) == [
        f"dataset.root={tmp_path / 'data'}", "eval.n_points=8", "x=/abs"]


def test_defence_bench_times_the_steps_as_the_trainer_runs_them(tmp_path: Path) -> None:
    """scripts/bench_defenses.py with --amp bf16 --channels-last: every defence's step ran in bf16."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_defenses.py"), "--width", "8", "--batch-size", "16",
         "--image-size", "16", "--steps", "1", "--repeats", "1", "--amp", "bf16", "--channels-last",
         "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "bench_defenses.json").read_text())
    assert (record["precision"], record["channels_last"]) == ("bf16", True)
    assert record["logits_dtype"] == {name: "bfloat16" for name in ("none", "at", "ask_def", "trades")}
    median = record["median_seconds"]
    assert all(value > 0 for value in median.values())
    assert record["ask_def_over_at"] == pytest.approx(median["ask_def"] / median["at"])
