"""The console scripts end to end, on the embedded digits data, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ask.utils.precision import precision_name, resolve_amp
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def demo(shared_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`make demo`: ask-attack with no checkpoint trains the digits model once, then attacks it."""
    work = tmp_path_factory.mktemp("demo")
    done = run_cli("ask-attack", ["progress=false", "hydra.run.dir=run"], work, shared_cache)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"metrics": json.loads((work / "run" / "metrics.json").read_text()), "stdout": done.stdout,
            "work": work}


def _row(metrics: dict, attack: str, victim: str) -> dict:
    (row,) = [r for r in metrics["results"] if r["attack"] == attack and r["victim"] == victim]
    return row


def test_demo_metrics_schema_and_accuracy(demo: dict) -> None:
    metrics = demo["metrics"]
    assert metrics["dataset"] == "digits" and metrics["model"] == "smallcnn"
    assert metrics["layers"] == ["block2"] and metrics["n_points"] == 540
    assert metrics["dknn_layers"] == ["block1", "block2", "block3"]
    assert metrics["knn_index"] == {"index": "flat", "feature_dtype": "float32", "n": 1157}
    # eval.amp=auto: bf16 only where the CPU has bf16 units; fp32 on the rest (CI's included)
    assert metrics["precision"] == precision_name(resolve_amp("auto", torch.device("cpu")))
    attacks = ("ask", "pgd", "dknn", "advknn", "feature", "minnorm")
    victims = ("dnn", "knn", "dknn", "dknn_vote")
    # One row per (attack, victim), then the per-point worst case over all six on each victim.
    assert [(r["attack"], r["victim"]) for r in metrics["results"]] == [
        (a, v) for a in (*attacks, "any") for v in victims]
    for row in metrics["results"]:
        assert {"attack", "victim", "clean_acc", "robust_acc", "asr", "n_points", "seconds"} <= set(row)
        assert row["n_points"] == 540 and row.get("max_linf", 0) <= metrics["eps"] + 1e-6
    for victim in victims:
        worst = _row(metrics, "any", victim)
        assert worst["attacks"] == list(attacks) and set(worst["broken_by"]) == set(attacks)
        assert worst["robust_acc"] <= min(_row(metrics, a, victim)["robust_acc"] for a in attacks)
        assert worst["asr"] >= max(_row(metrics, a, victim)["asr"] for a in attacks)
        clean_right = round(worst["clean_acc"] * 540)
        for attack in attacks:  # what each attack broke, counted point by point, is its ASR
            assert worst["broken_by"][attack] == round(_row(metrics, attack, victim)["asr"] * clean_right)
            assert worst["only_by"][attack] <= worst["broken_by"][attack]
    # Clean accuracy of both victims on the held-out digits.
    assert _row(metrics, "pgd", "dnn")["clean_acc"] >= 0.95
    assert _row(metrics, "ask", "knn")["clean_acc"] >= 0.95
    assert _row(metrics, "ask", "dknn")["clean_acc"] >= 0.95
    # Every attack does real work on the kNN victim at the default eps.
    for attack in attacks:
        assert _row(metrics, attack, "knn")["asr"] > 0.05, attack
    assert "robust" in demo["stdout"] and "ASR" in demo["stdout"]
    assert "(any: the per-point worst case over ask, pgd, dknn, advknn, feature, minnorm;" in demo["stdout"]


def test_ask_beats_pgd_on_the_knn_victim(demo: dict) -> None:
    metrics = demo["metrics"]
    assert _row(metrics, "ask", "knn")["asr"] > _row(metrics, "pgd", "knn")["asr"]


def test_second_demo_reuses_the_cached_model(demo: dict, shared_cache: Path) -> None:
    done = run_cli("ask-attack", ["progress=false", "hydra.run.dir=run2", "attack=[pgd]", "eval.n_points=50",
                                  "eval.victims=[dnn]"],
                   demo["work"], shared_cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "using the cached digits model" in done.stdout + done.stderr
    assert len(list((shared_cache / "models").iterdir())) == 1


def test_each_task_names_its_runs_log_and_help_after_itself(demo: dict, shared_cache: Path, tmp_path: Path) -> None:
    # Before, ask-attack composed the training config with task=attack: its log was common.log and
    # --help said "common is powered by Hydra"; the output root was hard-coded to outputs/.
    done = run_cli("ask-attack", ["progress=false", f"output_root={tmp_path / 'runs'}", "attack=[pgd]",
                                  "eval.n_points=20", "eval.victims=[dnn]"], tmp_path, shared_cache)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = (tmp_path / "runs" / "attack").glob("*/*")  # <output_root>/<task>/<date>/<time>
    assert (run / "metrics.json").is_file() and (run / "ask-attack.log").is_file()
    assert not (tmp_path / "outputs").exists()
    assert json.loads((run / "metrics.json").read_text())["n_points"] == 20
    for program in ("ask-attack", "ask-train"):
        shown = run_cli(program, ["--help"], tmp_path, shared_cache)
        assert shown.returncode == 0 and shown.stdout.startswith(f"{program} is powered by Hydra."), shown.stdout[:200]


def _fails_cleanly(done, *needles: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_dataset_root(tmp_path: Path, shared_cache: Path) -> None:
    done = run_cli("ask-attack", ["dataset=cifar10_folder", f"dataset.root={tmp_path}/nowhere"], tmp_path,
                   shared_cache)
    _fails_cleanly(done, "nowhere", "dataset.root")


def test_unknown_layer(demo: dict, tmp_path: Path, shared_cache: Path) -> None:
    done = run_cli("ask-attack", ["knn.layers=[block9]", "eval.n_points=10"], tmp_path, shared_cache)
    _fails_cleanly(done, "block9", "block2")


def test_negative_eps(tmp_path: Path, shared_cache: Path) -> None:
    _fails_cleanly(run_cli("ask-attack", ["attack.eps=-0.1"], tmp_path, shared_cache), "attack.eps", ">= 0")


def test_k_larger_than_the_pool(demo: dict, tmp_path: Path, shared_cache: Path) -> None:
    done = run_cli("ask-attack", ["knn.pool_per_class=3", "eval.n_points=10"], tmp_path, shared_cache)
    _fails_cleanly(done, "k=5", "has only 3 reference points")


def test_truncated_checkpoint(demo: dict, tmp_path: Path, shared_cache: Path) -> None:
    (good,) = (shared_cache / "models").glob("*/best.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    done = run_cli("ask-attack", [f"model.checkpoint={bad}"], tmp_path, shared_cache)
    _fails_cleanly(done, "bad.pt", "unreadable")
    assert good.exists()


def test_dknn_without_calibration_says_so(demo: dict, tmp_path: Path, shared_cache: Path) -> None:
    done = run_cli("ask-attack", ["dataset.calib_per_class=0", "eval.victims=[dknn]", "attack=[pgd]", "progress=false"],
                   tmp_path, shared_cache)
    _fails_cleanly(done, "victim 'dknn' needs a calibration split", "dataset.calib_per_class")


def test_unknown_attack_lists_the_available_ones(tmp_path: Path, shared_cache: Path) -> None:
    done = run_cli("ask-attack", ["attack=[ask,cw]"], tmp_path, shared_cache)
    _fails_cleanly(done, "unknown attack 'cw'", "ask", "pgd")
    done = run_cli("ask-train", ["model=alexnet"], tmp_path, shared_cache)
    _fails_cleanly(done, "unknown model 'alexnet'", "smallcnn, torchvision, vgg16")


def _user_config_dir(tmp_path: Path) -> Path:
    """A user's config folder holding one dataset of their own (the digits, under another option name)."""
    from ask.config import config_dir

    folder = tmp_path / "my-conf"
    (folder / "dataset").mkdir(parents=True)
    digits = (Path(config_dir()) / "dataset" / "digits.yaml").read_text()
    (folder / "dataset" / "mine.yaml").write_text(digits)
    return folder


@pytest.mark.parametrize("how", ["--config-dir", "hydra.searchpath"])
def test_a_users_config_dir_is_composed(demo: dict, tmp_path: Path, shared_cache: Path, how: str) -> None:
    folder = _user_config_dir(tmp_path)
    where = ["--config-dir", str(folder)] if how == "--config-dir" else [f"hydra.searchpath=[file://{folder}]"]
    checkpoint = demo["metrics"]["checkpoint"]
    done = run_cli("ask-attack", [*where, "dataset=mine", f"model.checkpoint={checkpoint}", "attack=pgd",
                                  "eval.victims=[dnn]", "eval.n_points=20", "progress=false", "hydra.run.dir=run"],
                   tmp_path, shared_cache)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["dataset"] == "digits" and metrics["n_points"] == 20
    assert "pgd" in {row["attack"] for row in metrics["results"]}


def test_a_typo_beside_a_users_config_dir_lists_both_kinds_of_option(tmp_path: Path, shared_cache: Path) -> None:
    folder = _user_config_dir(tmp_path)
    done = run_cli("ask-attack", ["-cd", str(folder), "dataset=mnie"], tmp_path, shared_cache)
    line = _fails_cleanly(done, "unknown dataset 'mnie'")
    assert "cifar10, cifar10_folder, digits, folder, imagenet, imagenette, mine" in line, line


def test_an_ivf_index_records_its_recall_in_the_metrics(demo: dict, shared_cache: Path) -> None:
    done = run_cli("ask-attack", ["progress=false", "hydra.run.dir=ivf", "attack=[pgd]", "eval.n_points=40",
                                  "eval.victims=[knn]", "knn.index=ivf", "knn.nprobe=2", "knn.feature_dtype=float16"],
                   demo["work"], shared_cache)
    assert done.returncode == 0, done.stderr[-2000:]
    index = json.loads((demo["work"] / "ivf" / "metrics.json").read_text())["knn_index"]
    layer = index["layers"]["block2"]
    assert index["index"] == "ivf" and layer["kind"] == "ivf" and layer["nprobe"] == 2
    # Two of about 30 cells probed: close to exact on digits, but not exact.
    assert 0.8 < layer["recall_at_k"] < 1.0 and layer["queries"] == 1000


_WORKSPACE_PROBE = """
import importlib, importlib.abc, os, sys
seen = []
class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        return None
sys.meta_path.insert(0, Watch())
importlib.import_module(sys.argv[1])
import torch  # noqa: F401
print(seen[0])
"""


@pytest.mark.parametrize("module", ["ask.cli.train", "ask.cli.attack", "ask.cli.report"])
def test_console_scripts_set_the_cublas_workspace_before_torch(module: str) -> None:
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG at the first GEMM: it must be there before torch can run one."""
    env = {key: value for key, value in os.environ.items() if key != "CUBLAS_WORKSPACE_CONFIG"}
    done = subprocess.run([sys.executable, "-c", _WORKSPACE_PROBE, module], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ":4096:8"
    # A value the user chose is kept.
    done = subprocess.run([sys.executable, "-c", _WORKSPACE_PROBE, module],
                          env={**env, "CUBLAS_WORKSPACE_CONFIG": ":16:8"}, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == ":16:8", done.stderr[-2000:]
