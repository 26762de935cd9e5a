"""ask-report and the sweep callback, on hand-built run directories with known numbers."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from ask.reporting import ReportCallback, ReportError, write_report
from ask.reporting.intervals import t_interval, t_quantile_975, wilson_interval
from ask.reporting.labels import format_eps
from ask.reporting.report import default_out_dir
from tests.conftest import run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1)
EPS = (0.05, 0.1)
# (attack, victim, eps) -> seed -> (clean_acc, robust_acc); ASR follows from them.
NUMBERS = {
    ("ask", "knn", 0.05): {0: (0.90, 0.50), 1: (0.80, 0.30)},
    ("ask", "knn", 0.1): {0: (0.90, 0.20), 1: (0.80, 0.10)},
    ("pgd", "knn", 0.05): {0: (0.90, 0.70), 1: (0.80, 0.65)},
    ("pgd", "knn", 0.1): {0: (0.90, 0.40), 1: (0.80, 0.45)},
    ("pgd", "dnn", 0.05): {0: (0.95, 0.60), 1: (0.85, 0.50)},
    ("pgd", "dnn", 0.1): {0: (0.95, 0.15), 1: (0.85, 0.05)},
}
N_POINTS = 40


def _result(attack: str, victim: str, eps: float, clean: float, robust: float, n_points: int = N_POINTS) -> dict:
    return {"attack": attack, "victim": victim, "clean_acc": clean, "robust_acc": robust,
            "asr": 1 - robust / clean, "n_points": n_points, "seconds": 1.5, "eps": eps, "norm": "linf",
            "steps": 10, "mean_linf": eps, "max_linf": eps, "mean_l2": 3 * eps, "max_l2": 4 * eps,
            "images_per_second": 20.0, "zero_grad_points": 0}


def write_run(directory: Path, *, eps: float, seed: int, defense: str = "none", temperature: float = 0.01,
              checkpoint: str = "/nowhere/best.pt", numbers: dict = NUMBERS, n_points: int = N_POINTS,
              worst: dict | None = None) -> Path:
    """A run directory as ask-attack leaves it: metrics.json, config.yaml and .hydra/.

    ``worst`` adds worst-case rows: victim -> (clean_acc, robust_acc, the attacks combined).
    """
    (directory / ".hydra").mkdir(parents=True)
    results = [_result(a, v, e, *by_seed[seed], n_points=n_points)
               for (a, v, e), by_seed in numbers.items() if e == eps]
    for victim, (clean, robust, attacks) in (worst or {}).items():
        row = _result("any", victim, eps, clean, robust, n_points=n_points)
        for name in ("mean_linf", "max_linf", "mean_l2", "max_l2", "zero_grad_points"):
            del row[name]
        results.append({**row, "attacks": attacks, "broken_by": {a: 1 for a in attacks},
                        "only_by": {a: 0 for a in attacks}})
    metrics = {"dataset": "digits", "model": "smallcnn", "checkpoint": checkpoint, "layers": ["block2"],
               "k": 5, "metric": "cosine", "n_points": n_points, "eps": eps, "norm": "linf", "steps": 10,
               "seed": seed, "device": "cpu", "results": results, "warnings": []}
    config = {"task": "attack", "seed": seed, "device": "auto", "progress": False, "cache_dir": "/tmp/x",
              "dataset": {"name": "digits", "root": None}, "model": {"name": "smallcnn", "checkpoint": None},
              "knn": {"layers": ["block2"], "k": 5, "metric": "cosine"},
              "defense": {"name": defense, "params": {}},
              "attack": {"eps": eps, "norm": "linf", "steps": 10, "step_size": 0.01,
                         "methods": {"ask": {"temperature": temperature, "k": 5}, "pgd": {"keep_best": False}}},
              "eval": {"victims": ["dnn", "knn"], "n_points": N_POINTS, "batch_size": 128}}
    (directory / "metrics.json").write_text(json.dumps(metrics))
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    (directory / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    return directory


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Four jobs: two eps x two seeds, numbered as Hydra numbers them."""
    root = tmp_path / "attack-multirun" / "2024-01-01" / "12-00-00"
    for job, (eps, seed) in enumerate((e, s) for e in EPS for s in SEEDS):
        write_run(root / str(job), eps=eps, seed=seed)
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _find(rows: list[dict], attack: str, victim: str, eps: float) -> dict:
    (row,) = [r for r in rows if (r["attack"], r["victim"], float(r["eps"])) == (attack, victim, eps)]
    return row


def test_seeds_are_averaged_per_eps_attack_and_victim(sweep: Path) -> None:
    report = write_report([sweep])
    assert report.out_dir == sweep.resolve()
    rows = _csv_rows(sweep / "report.csv")
    assert len(rows) == len(NUMBERS)
    for (attack, victim, eps), by_seed in NUMBERS.items():
        row = _find(rows, attack, victim, eps)
        clean = [by_seed[s][0] for s in SEEDS]
        robust = [by_seed[s][1] for s in SEEDS]
        asr = [1 - r / c for c, r in zip(clean, robust, strict=True)]
        assert (row["defense"], row["dataset"], row["model"], row["norm"]) == ("none", "digits", "smallcnn", "linf")
        assert row["runs"] == "2" and row["seeds"] == "0 1" and row["settings"] == ""
        assert int(row["n_points"]) == N_POINTS and int(row["n_points_total"]) == 2 * N_POINTS
        for name, values in (("clean_acc", clean), ("robust_acc", robust), ("asr", asr)):
            assert float(row[f"{name}_mean"]) == pytest.approx(statistics.fmean(values))
            assert float(row[f"{name}_std"]) == pytest.approx(statistics.stdev(values))
            assert row[f"{name}_count"] == "2"
    # Two numbers worked by hand: ask on the kNN at eps 0.05 keeps 50% and 30% of the points.
    row = _find(rows, "ask", "knn", 0.05)
    assert float(row["robust_acc_mean"]) == pytest.approx(0.40)
    assert float(row["robust_acc_std"]) == pytest.approx(0.1414213562)

    text = (sweep / "report.md").read_text()
    assert "## defence: none — digits / smallcnn" in text
    assert "### linf eps = 0.05" in text and "### linf eps = 0.1" in text
    section_05 = text.split("### linf eps = 0.05")[1].split("###")[0]
    section_10 = text.split("### linf eps = 0.1")[1].split("###")[0]
    assert "| ask | knn | 85.0 ± 7.1 | 40.0 ± 14.1 |" in section_05
    assert "| ask | knn | 85.0 ± 7.1 | 15.0 ± 7.1 |" in section_10
    assert "| pgd | dnn | 90.0 ± 7.1 | 55.0 ± 7.1 |" in section_05
    # The pivot gives the robust accuracy at each eps on one line.
    assert "| ask | knn | 40.0 ± 14.1 | 15.0 ± 7.1 |" in text.split("robust accuracy (%) by eps")[1]
    assert "## Failures\n\nNone." in text

    assert [p.name for p in report.plots] == ["robust_vs_eps.png", "asr_bars.png"]
    for name in ("robust_vs_eps.png", "asr_bars.png"):
        data = (sweep / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_t_and_wilson_intervals_against_known_values() -> None:
    # Student's t_{0.975}: the tabulated values, then the series, which joins them smoothly.
    assert t_quantile_975(1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile_975(2) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile_975(10) == pytest.approx(2.2281, abs=1e-4)
    assert t_quantile_975(30) > t_quantile_975(31) == pytest.approx(2.0395, abs=1e-4)
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=1e-4)
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=1e-4)
    assert t_quantile_975(10 ** 6) == pytest.approx(1.96, abs=1e-4)
    with pytest.raises(ValueError):
        t_quantile_975(0)
    # 0.4, 0.5, 0.6: mean 0.5, s = 0.1, half-width 4.303 * 0.1 / sqrt(3) = 0.2484.
    low, high = t_interval([0.4, 0.5, 0.6])
    assert (low, high) == pytest.approx((0.2516, 0.7484), abs=1e-4)
    # Wilson, by hand for 8 of 10: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.7167, half-width 0.2266.
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)


OLD_CSV_COLUMNS = [  # report.csv before the intervals: kept, in this order, at the front
    "defense", "dataset", "model", "eps", "norm", "attack", "victim", "settings", "runs", "seeds", "n_points",
    "n_points_total", *(f"{name}_{stat}" for name in ("clean_acc", "robust_acc", "asr", "mean_linf", "mean_l2",
                                                       "seconds") for stat in ("mean", "std", "count")),
    "directories",
]


def test_intervals_t_across_seeds_and_wilson_for_one_run(tmp_path: Path) -> None:
    three = {("ask", "knn", 0.1): {0: (1.0, 0.4), 1: (1.0, 0.5), 2: (1.0, 0.6)}}
    for seed in (0, 1, 2):
        write_run(tmp_path / "seeds" / str(seed), eps=0.1, seed=seed, numbers=three)
    one = {("ask", "knn", 0.1): {0: (1.0, 0.8)}}  # 8 of 10 points stay right, 2 of 10 broken
    write_run(tmp_path / "single" / "0", eps=0.1, seed=0, numbers=one, n_points=10)

    write_report([tmp_path / "seeds"])
    with (tmp_path / "seeds" / "report.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header[:len(OLD_CSV_COLUMNS)] == OLD_CSV_COLUMNS
    (row,) = _csv_rows(tmp_path / "seeds" / "report.csv")
    assert row["robust_acc_ci_kind"] == "t" and row["runs"] == "3"
    assert (float(row["robust_acc_ci_low"]), float(row["robust_acc_ci_high"])) == pytest.approx(
        (0.2516, 0.7484), abs=1e-4)
    assert float(row["clean_acc_ci_low"]) == float(row["clean_acc_ci_high"]) == 1.0  # no spread at all
    assert "| 50.0 ± 10.0 | [25.2, 74.8] t |" in (tmp_path / "seeds" / "report.md").read_text()

    write_report([tmp_path / "single"])
    (row,) = _csv_rows(tmp_path / "single" / "report.csv")
    assert row["robust_acc_ci_kind"] == row["asr_ci_kind"] == row["clean_acc_ci_kind"] == "wilson"
    assert (float(row["robust_acc_ci_low"]), float(row["robust_acc_ci_high"])) == pytest.approx(
        (0.4902, 0.9433), abs=1e-4)
    # ASR 2 of the 10 points right on x; clean 10 of 10.
    assert (float(row["asr_ci_low"]), float(row["asr_ci_high"])) == pytest.approx((0.0567, 0.5098), abs=1e-4)
    assert (float(row["clean_acc_ci_low"]), float(row["clean_acc_ci_high"])) == pytest.approx((0.7225, 1.0), abs=1e-4)
    text = (tmp_path / "single" / "report.md").read_text()
    assert "| ask | knn | 100.0 | 80.0 | [49.0, 94.3] W | 20.0 | [5.7, 51.0] W | 10 | 1 |" in text
    assert "Wilson" in text and "Student" in text


def test_worst_case_rows_are_reported_and_never_joined_across_attack_lists(sweep: Path) -> None:
    # The fixture's four runs, now with worst-case rows over [ask, pgd] on the kNN.
    for job, (eps, seed) in enumerate((e, s) for e in EPS for s in SEEDS):
        metrics_path = sweep / str(job) / "metrics.json"
        metrics = json.loads(metrics_path.read_text())
        by_seed = {0: (0.90, 0.10), 1: (0.80, 0.05)} if eps == 0.1 else {0: (0.90, 0.40), 1: (0.80, 0.30)}
        clean, robust = by_seed[seed]
        metrics["results"].append({**_result("any", "knn", eps, clean, robust), "attacks": ["ask", "pgd"],
                                   "broken_by": {"ask": 20, "pgd": 15 + seed}, "only_by": {"ask": 5 + seed, "pgd": 1}})
        metrics_path.write_text(json.dumps(metrics))
    report = write_report([sweep])
    rows = _csv_rows(sweep / "report.csv")
    worst = _find(rows, "any", "knn", 0.1)
    assert worst["runs"] == "2" and worst["settings"] == "" and worst["attacks"] == "ask pgd"
    assert float(worst["robust_acc_mean"]) == pytest.approx(0.075)
    assert _find(rows, "ask", "knn", 0.1)["attacks"] == ""
    # What each attack broke, and broke alone, averaged over the two seeds.
    assert (worst["broken_by"], worst["only_by"]) == ("ask=20.0 pgd=15.5", "ask=5.5 pgd=1.0")
    assert _find(rows, "ask", "knn", 0.1)["only_by"] == ""
    text = report.markdown.read_text()
    assert text.count("| knn | ask 5.5, pgd 1 | ask 20, pgd 15.5 |") == 2  # both eps
    assert "| any | knn | 85.0 ± 7.1 | 7.5 ± 3.5 |" in text
    assert "| any | knn | 35.0 ± 7.1 | 7.5 ± 3.5 |" in text.split("robust accuracy (%) by eps")[1]
    assert "per-point worst case" in text
    assert [p.name for p in report.plots] == ["robust_vs_eps.png", "asr_bars.png"]

    # A run of three attacks at a third eps: its worst case is not the same quantity as the
    # two-attack one, so the rows say which attacks they combine.
    write_run(sweep / "4", eps=0.2, seed=0, numbers={("ask", "knn", 0.2): {0: (0.9, 0.0)}},
              worst={"knn": (0.9, 0.0, ["ask", "pgd", "feature"])})
    report = write_report([sweep])
    worst_rows = {(r["eps"], r["settings"]) for r in report.rows if r["attack"] == "any"}
    assert worst_rows == {(0.05, "attacks=[ask,pgd]"), (0.1, "attacks=[ask,pgd]"),
                          (0.2, "attacks=[ask,pgd,feature]")}
    assert {r["settings"] for r in report.rows if r["attack"] != "any"} == {""}
    text = report.markdown.read_text()
    assert "| any | knn | attacks=[ask,pgd,feature] | 90.0 | 0.0 |" in text
    assert [p.name for p in report.plots] == ["robust_vs_eps.png", "asr_bars.png"]


def test_one_eps_has_no_eps_curve(tmp_path: Path) -> None:
    for seed in SEEDS:
        write_run(tmp_path / "sweep" / str(seed), eps=0.1, seed=seed)
    report = write_report([tmp_path / "sweep"])
    assert [p.name for p in report.plots] == ["asr_bars.png"]
    assert not (tmp_path / "sweep" / "robust_vs_eps.png").exists()
    assert "by eps" not in report.markdown.read_text()


def test_failed_and_broken_jobs_are_named_not_fatal(sweep: Path) -> None:
    failed = sweep / "4"
    (failed / ".hydra").mkdir(parents=True)
    (failed / "failure.json").write_text(json.dumps(
        {"error": "knn.k=50 is larger than the reference pool", "type": "ConfigError"}))
    (sweep / "5" / ".hydra").mkdir(parents=True)  # killed before writing anything
    write_run(sweep / "6", eps=0.2, seed=0)
    (sweep / "6" / "metrics.json").write_text('{"dataset": "digits", "results": [')  # truncated

    report = write_report([sweep])
    assert len(report.collection.runs) == 4 and len(report.rows) == len(NUMBERS)
    text = report.markdown.read_text()
    failures = text.split("## Failures")[1].split("##")[0]
    assert "`4`: ConfigError: knn.k=50 is larger than the reference pool" in failures
    problems = text.split("## Problems")[1].split("##")[0]
    assert "`5`: no metrics.json" in problems
    assert "`6/metrics.json`: unreadable metrics.json" in problems
    assert "eps = 0.2" not in text


def test_a_setting_that_differs_splits_rows_instead_of_averaging(tmp_path: Path) -> None:
    other = {key: {1: (0.9, 0.05)} for key in NUMBERS if key[2] == 0.1}
    write_run(tmp_path / "s" / "0", eps=0.1, seed=0, temperature=0.01)
    write_run(tmp_path / "s" / "1", eps=0.1, seed=1, temperature=0.3, numbers=other)
    report = write_report([tmp_path / "s"])
    ask_rows = [r for r in report.rows if r["attack"] == "ask"]
    assert sorted(r["settings"] for r in ask_rows) == ["ask.temperature=0.01", "ask.temperature=0.3"]
    assert all(r["runs"] == 1 for r in ask_rows)
    by_setting = {r["settings"]: r["robust_acc_mean"] for r in ask_rows}
    assert by_setting == {"ask.temperature=0.01": 0.20, "ask.temperature=0.3": 0.05}
    # PGD does not use the temperature: its two runs are replicates.
    pgd_knn = [r for r in report.rows if (r["attack"], r["victim"]) == ("pgd", "knn")]
    assert len(pgd_knn) == 1 and pgd_knn[0]["runs"] == 2 and pgd_knn[0]["settings"] == ""
    assert pgd_knn[0]["robust_acc_mean"] == pytest.approx((0.40 + 0.05) / 2)
    assert "| ask | knn | ask.temperature=0.3 | 90.0 | 5.0 |" in report.markdown.read_text()


def test_defence_comes_from_the_checkpoint_that_was_attacked(tmp_path: Path) -> None:
    trained = tmp_path / "train" / "at"
    trained.mkdir(parents=True)
    (trained / "train_summary.json").write_text(json.dumps({"defense": "at", "test_acc": 0.8}))
    # Attacked with the default `defense=none` on the command line, but the model is adversarially trained.
    write_run(tmp_path / "runs" / "a", eps=0.1, seed=0, checkpoint=str(trained / "best.pt"))
    write_run(tmp_path / "runs" / "b", eps=0.1, seed=0)
    report = write_report([tmp_path / "runs" / "a", tmp_path / "runs" / "b"], tmp_path / "out")
    assert {r["defense"] for r in report.rows} == {"at", "none"}
    text = report.markdown.read_text()
    assert "## defence: at — digits / smallcnn" in text and "## defence: none — digits / smallcnn" in text
    assert "trained with 'at'" in text.split("## Notes")[1]


def test_default_out_dir_and_eps_names(tmp_path: Path) -> None:
    (tmp_path / "a" / "x").mkdir(parents=True)
    (tmp_path / "a" / "y").mkdir(parents=True)
    assert default_out_dir([tmp_path / "a" / "x"]) == (tmp_path / "a" / "x").resolve()
    assert default_out_dir([tmp_path / "a" / "x", tmp_path / "a" / "y"]) == (tmp_path / "a").resolve()
    assert format_eps(8 / 255) == "8/255" and format_eps(0.05) == "0.05" and format_eps(0.5, "l2") == "0.5"
    assert format_eps(0.2) == "0.2"  # also 51/255, but typed as 0.2
    assert format_eps(2 / 255, "l2") == "0.007843"


def test_nothing_to_report_raises(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no runs found"):
        write_report([tmp_path])


def test_cli_on_an_empty_directory_exits_2_with_one_line(tmp_path: Path) -> None:
    done = run_cli("ask-report", [str(tmp_path)], tmp_path, tmp_path / "cache", timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ask-report: error: no runs found"), done.stderr
    assert not (tmp_path / "report.md").exists()


def test_cli_writes_into_the_common_parent(sweep: Path) -> None:
    done = run_cli("ask-report", ["0", "1", "2"], sweep, sweep / "cache", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 runs, 0 failed jobs" in done.stdout
    assert (sweep / "report.md").is_file() and (sweep / "robust_vs_eps.png").is_file()
    rows = _csv_rows(sweep / "report.csv")
    assert _find(rows, "ask", "knn", 0.1)["runs"] == "1"  # only job 2 (seed 0) at eps 0.1


def test_callback_reports_the_sweep(sweep: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    with caplog.at_level(logging.INFO, logger="ask.reporting.callback"):
        ReportCallback().on_multirun_end(config)
    assert (sweep / "report.md").is_file() and (sweep / "asr_bars.png").is_file()
    assert "sweep report: " in caplog.text and str(sweep / "report.md") in caplog.text


def test_callback_after_a_training_sweep_is_quiet(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = tmp_path / "train-multirun" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / "config.yaml").write_text("task: train\nseed: 0\n")
    (job / "train_summary.json").write_text("{}")
    with caplog.at_level(logging.INFO):
        ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(job.parent)}}}))
        ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "gone")}}}))
    assert not list(tmp_path.rglob("report.md"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_callback_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    ReportCallback().on_multirun_end(OmegaConf.create({}))  # no hydra node at all
    write_run(tmp_path / "s" / "0", eps=0.1, seed=0)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("ask.reporting.report.write_report", broken)
    with caplog.at_level(logging.WARNING):
        ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "s")}}}))
    assert "disk full" in caplog.text


def test_the_callback_is_registered_for_every_command() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from ask.config import config_dir, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("attack", return_hydra_config=True)
    assert isinstance(instantiate(cfg.hydra.callbacks.report), ReportCallback)


@pytest.mark.slow
def test_attack_sweep_writes_its_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = run_cli("ask-attack", ["-m", "attack.eps=0.05,0.1", "attack=[pgd]", "eval.n_points=40",
                                  "progress=false", f"hydra.sweep.dir={sweep}"], tmp_path, tmp_path / "cache")
    assert done.returncode == 0, done.stderr[-2000:]
    text = (sweep / "report.md").read_text()
    assert "### linf eps = 0.05" in text and "### linf eps = 0.1" in text and "| pgd | knn |" in text
    rows = _csv_rows(sweep / "report.csv")
    for job, eps in enumerate((0.05, 0.1)):
        metrics = json.loads((sweep / str(job) / "metrics.json").read_text())
        for result in metrics["results"]:
            row = _find(rows, result["attack"], result["victim"], eps)
            assert float(row["robust_acc_mean"]) == pytest.approx(result["robust_acc"])
    assert (sweep / "robust_vs_eps.png").stat().st_size > 0 and (sweep / "asr_bars.png").stat().st_size > 0


def test_the_sweep_report_can_be_switched_off_from_the_command_line(sweep: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate

    from ask.config import config_dir, register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("attack", overrides=["hydra.callbacks.report.enabled=false"], return_hydra_config=True)
    callback = instantiate(cfg.hydra.callbacks.report)
    callback.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert callback.enabled is False and not (sweep / "report.md").exists()
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / "report.md").exists()  # the fixture is a reportable sweep: the switch did it


def _record(run: Path, **fields: object) -> Path:
    """Add what ask-attack records about the data and the model (dataset_root, checkpoint_digest)."""
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, **fields}))
    return run


def test_runs_of_one_seed_on_other_data_or_models_are_not_averaged(tmp_path: Path) -> None:
    other = {key: {0: (0.6, 0.3)} for key in NUMBERS if key[2] == 0.1}
    # Two datasets (and so two models), both seed 0: two experiments, not two replicates.
    _record(write_run(tmp_path / "data" / "a", eps=0.1, seed=0), dataset_root="/data/a", checkpoint_digest="aa")
    _record(write_run(tmp_path / "data" / "b", eps=0.1, seed=0, numbers=other), dataset_root="/data/b",
            checkpoint_digest="bb")
    rows = [r for r in write_report([tmp_path / "data"], tmp_path / "out1").rows if r["attack"] == "ask"]
    assert sorted((r["settings"], r["runs"], r["robust_acc_mean"]) for r in rows) == [
        ("dataset.root=/data/a", 1, 0.20), ("dataset.root=/data/b", 1, 0.30)]

    # One dataset, two models of one training seed (or none known), one attack seed: split by checkpoint.
    _record(write_run(tmp_path / "models" / "a", eps=0.1, seed=0), checkpoint_digest="aa")
    _record(write_run(tmp_path / "models" / "b", eps=0.1, seed=0, numbers=other), checkpoint_digest="bb")
    rows = [r for r in write_report([tmp_path / "models"], tmp_path / "out2").rows if r["attack"] == "ask"]
    assert sorted((r["settings"], r["runs"], r["robust_acc_mean"]) for r in rows) == [
        ("checkpoint=aa", 1, 0.20), ("checkpoint=bb", 1, 0.30)]


def test_models_trained_with_other_seeds_are_replicates_under_one_attack_seed(tmp_path: Path) -> None:
    other = {key: {0: (0.6, 0.3)} for key in NUMBERS if key[2] == 0.1}
    for train_seed, numbers in ((0, NUMBERS), (1, other)):
        trained = tmp_path / "train" / str(train_seed)
        trained.mkdir(parents=True)
        (trained / "train_summary.json").write_text(json.dumps({"defense": "none", "config": {"seed": train_seed}}))
        _record(write_run(tmp_path / "runs" / str(train_seed), eps=0.1, seed=0, numbers=numbers,
                          checkpoint=str(trained / "best.pt")), checkpoint_digest=f"d{train_seed}")
    (row,) = [r for r in write_report([tmp_path / "runs"], tmp_path / "out").rows
              if (r["attack"], r["victim"]) == ("ask", "knn")]
    assert (row["runs"], row["settings"], row["robust_acc_mean"]) == (2, "", pytest.approx(0.25))


def test_a_repeated_run_or_result_is_counted_once(tmp_path: Path) -> None:
    first = _record(write_run(tmp_path / "runs" / "a", eps=0.1, seed=0), checkpoint_digest="aa")
    shutil.copytree(first, tmp_path / "runs" / "b")  # the same experiment again
    metrics = json.loads((first / "metrics.json").read_text())
    metrics["results"].append(dict(metrics["results"][0]))  # as eval.victims=[knn,knn] once wrote
    (first / "metrics.json").write_text(json.dumps(metrics))
    report = write_report([tmp_path / "runs"], tmp_path / "out")
    row = _find(report.rows, "ask", "knn", 0.1)
    assert (row["runs"], row["n_points_total"], row["robust_acc_std"]) == (1, N_POINTS, None)
    text = report.markdown.read_text()
    assert "result 3 repeats attack 'ask' on victim 'knn'; counted once" in text
    assert f"{tmp_path / 'runs' / 'b'} repeats {first} (same settings, checkpoint and seeds)" in text
