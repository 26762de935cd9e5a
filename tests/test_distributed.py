"""``ask-train`` under ``torchrun`` with two gloo processes on the CPU: one output directory,
checkpoints from rank 0, weights kept in step by DistributedDataParallel, exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ask.training.checkpoint import load_checkpoint
from ask.training.trainer import train
from tests.conftest import BIN, compose_run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or shutil.which("torchrun", path=str(BIN)) is None,
                                reason="torch.distributed / torchrun not available")

AT = ["progress=false", "dataset.train_per_class=50", "train.batch_size=32", "model.width=16", "defense=at",
      "defense.steps=2"]


def _torchrun(work: Path, cache: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASK_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", str(BIN / "ask-train"),
               *args]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_train_one_run_and_resume_exactly(tmp_path: Path, shared_cache: Path) -> None:
    done = _torchrun(tmp_path, shared_cache, [*AT, "train.epochs=2"])
    # Rank 0 chose the clock-named directory and both ranks used it.
    (run_dir,) = [p.parent for p in tmp_path.glob("outputs/train/*/*/last.pt")]
    assert len(list(tmp_path.glob("outputs/train/*/*"))) == 1
    assert "all 2 ranks hold identical weights" in done.stdout + done.stderr
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["n_train"] == 500
    records = _records(run_dir)
    assert [r["epoch"] for r in records] == [1, 2]

    # The ranks split each global batch of 32, so the run follows a single process with the same
    # global batch closely (not exactly: batch norm normalises each rank's half separately).
    single = train(compose_run("train", [*AT, "train.epochs=2"], shared_cache), tmp_path / "single")
    single_records = _records(tmp_path / "single")
    assert abs(records[-1]["train_loss"] - single_records[-1]["train_loss"]) < 0.1
    assert abs(summary["test_acc"] - single["test_acc"]) < 0.15



def test_sigterm_to_torchrun_stops_every_rank_at_one_step_and_resumes_exactly(
        tmp_path: Path, shared_cache: Path) -> None:
    # The full digits split: an epoch of 73 steps lasts long enough to land the signal inside it.
    args = ["progress=false", "train.batch_size=16", "model.width=16", "defense=at", "defense.steps=4",
            "train.epochs=2"]
    _torchrun(tmp_path, shared_cache, [*args, "hydra.run.dir=straight"])
    env = {**os.environ, "ASK_CACHE_DIR": str(shared_cache), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", str(BIN / "ask-train"), *args,
         "hydra.run.dir=stopped"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "stopped" / "last.pt").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.02)
    time.sleep(0.3 * _records(tmp_path / "straight")[0]["seconds"])
    process.send_signal(signal.SIGTERM)  # torchrun passes it on to both workers
    output, _ = process.communicate(timeout=120)
    assert output.count("ask-train: stopped by SIGTERM at epoch 2, step") == 2, output[-3000:]
    state = load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert state["partial"]["epoch"] == 2 and len(state["rank_states"]) == 2

    _torchrun(tmp_path, shared_cache, [*args, "hydra.run.dir=stopped"])
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "stopped" / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, tensor in a["state_dict"].items():
        assert torch.equal(tensor, b["state_dict"][key]), key
    assert [r["train_loss"] for r in _records(tmp_path / "straight")] == [
        r["train_loss"] for r in _records(tmp_path / "stopped")]


def test_ask_def_trains_per_rank(tmp_path: Path, shared_cache: Path) -> None:
    args = ["progress=false", "dataset.train_per_class=20", "train.batch_size=20", "model.width=8", "defense=ask_def",
            "defense.steps=1", "defense.params.n_ref=2", "train.epochs=1", "hydra.run.dir=run"]
    done = _torchrun(tmp_path, shared_cache, args)
    assert "all 2 ranks hold identical weights" in done.stdout + done.stderr
    record = _records(tmp_path / "run")[0]
    assert record["train_loss"] > 0 and json.loads((tmp_path / "run" / "train_summary.json").read_text())[
        "world_size"] == 2
