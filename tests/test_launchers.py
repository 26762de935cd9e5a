"""Sweeps through Hydra's launcher plugins: local processes (joblib, submitit's local executor) and
the packaged SLURM config. A failing job is reported and does not stop the others."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ask.config import config_dir, register_configs
from tests.conftest import run_cli

# Two jobs on the cached digits model; the second asks for more neighbours than a class has.
SWEEP = ["attack=[pgd]", "eval.victims=[dnn,knn]", "eval.n_points=40", "progress=false", "knn.k=5,100000"]


def _check_sweep(sweep: Path) -> None:
    ok = json.loads((sweep / "0" / "metrics.json").read_text())
    assert ok["n_points"] == 40 and {r["victim"] for r in ok["results"]} == {"dnn", "knn"}
    failure = json.loads((sweep / "1" / "failure.json").read_text())
    assert "k=100000" in failure["error"] and failure["type"] == "ConfigError"
    assert not (sweep / "1" / "metrics.json").exists()
    report = (sweep / "report.md").read_text()
    assert "| pgd | knn |" in report
    assert "## Failures" in report and "k=100000" in report.split("## Failures")[1]


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_sweep_through_a_launcher_reports_its_failed_job(launcher: str, tmp_path: Path, shared_cache: Path) -> None:
    sweep = tmp_path / "sweep"
    extra = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.timeout_min=10"]
    done = run_cli("ask-attack", ["-m", f"hydra/launcher={launcher}", *extra, *SWEEP,
                                  f"hydra.sweep.dir={sweep}"], tmp_path, shared_cache)
    # The other job ran and the report lists the failure; the status tells a scheduler that one failed.
    assert done.returncode == 1, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"ask-attack: error: 1 sweep job(s) failed: see {sweep / '1' / 'failure.json'}; fix them and rerun those jobs")
    _check_sweep(sweep)
    if launcher == "submitit_local":
        assert any((sweep / ".submitit").rglob("*_log.out"))  # the jobs really went through submitit


def test_packaged_slurm_launcher_config() -> None:
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("attack", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 1 and launcher.timeout_min == 720
