"""``ask-train`` under ``torchrun`` with two gloo processes on the CPU: one output directory,
checkpoints from rank 0, weights kept in step by DistributedDataParallel, exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from ask.errors import ConfigError
from ask.models.checkpoint import load_checkpoint
from ask.training.distributed import collective_timeout
from ask.training.trainer import train
from tests.conftest import BIN, compose_run

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or shutil.which("torchrun", path=str(BIN)) is None,
                                reason="torch.distributed / torchrun not available")

AT = ["progress=false", "dataset.train_per_class=50", "train.batch_size=32", "model.width=16", "defense=at",
      "defense.steps=2"]


def _torchrun(work: Path, cache: Path, args: list[str], program: str = "ask-train") -> subprocess.CompletedProcess:
    env = {**os.environ, "ASK_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--no-python", str(BIN / program),
               *args]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_train_one_run_like_a_single_process(tmp_path: Path, shared_cache: Path) -> None:
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


# A torchrun worker that trains a step with DDP, ends with the same collective as the trainer
# (all_gather_object of the fingerprints) and leaves the group: how many threads are left.
_WORKER = """
import os
import torch
from ask.training import distributed

def threads():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:  # ended meanwhile
            pass
    return names

before = len(threads())
group = distributed.init_from_env()
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
model(torch.ones(4, 3)).sum().backward()
group.gather(distributed.parameter_fingerprint(model))
del model
distributed.shutdown()
left = threads()
print(f"rank {group.rank}: {len(left) - before} new threads left {sorted(left)}", flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc")
def test_leaving_the_group_stops_its_threads_before_the_interpreter_ends(tmp_path: Path) -> None:
    # A gloo worker thread still alive at interpreter exit may drop a finished collective's Python
    # tensors during finalisation and abort the process (SIGABRT) after a finished run. shutdown()
    # must really free the group, and with it those threads, even after DDP was built (it imports
    # torch.distributed.nn, whose default arguments capture whatever group exists at that moment).
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(script)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    for rank in (0, 1):
        assert f"rank {rank}: 0 new threads left" in output, output[-3000:]


def test_a_torchrun_worker_exits_with_the_status_python_would_give() -> None:
    from ask.cli.common import exit_status

    assert [exit_status(code) for code in (None, 0, 2, 143, True)] == [0, 0, 2, 143, 1]
    assert exit_status("ask-train: bad") == 1


def test_ask_def_trains_per_rank(tmp_path: Path, shared_cache: Path) -> None:
    args = ["progress=false", "dataset.train_per_class=20", "train.batch_size=20", "model.width=8", "defense=ask_def",
            "defense.steps=1", "defense.params.n_ref=2", "train.epochs=1", "hydra.run.dir=run"]
    done = _torchrun(tmp_path, shared_cache, args)
    assert "all 2 ranks hold identical weights" in done.stdout + done.stderr
    record = _records(tmp_path / "run")[0]
    assert record["train_loss"] > 0 and json.loads((tmp_path / "run" / "train_summary.json").read_text())[
        "world_size"] == 2


@pytest.mark.parametrize(("value", "minutes"), [(None, 120), ("", 120), ("45", 45), (" 1.5 ", 1.5), ("600", 600)])
def test_collective_timeout_comes_from_the_environment(value: str | None, minutes: float) -> None:
    environ = {} if value is None else {"ASK_DIST_TIMEOUT_MIN": value}
    assert collective_timeout(environ) == timedelta(minutes=minutes)


@pytest.mark.parametrize("value", ["0", "-5", "ten", "30m", "nan", "inf"])
def test_collective_timeout_refuses_what_is_not_a_positive_number(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        collective_timeout({"ASK_DIST_TIMEOUT_MIN": value})
    message = str(caught.value)
    assert message.startswith(f"ASK_DIST_TIMEOUT_MIN={value} is not a positive number of minutes")
    assert "\n" not in message and "ASK_DIST_TIMEOUT_MIN=120" in message


def test_the_group_forms_with_the_collective_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    from ask.training import distributed

    calls: list[dict] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("ASK_DIST_TIMEOUT_MIN", "7")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **options: calls.append(options))
    distributed.init_from_env()
    (options,) = calls
    assert options["timeout"] == timedelta(minutes=7)


def test_a_bad_collective_timeout_is_one_line_before_the_group_forms(tmp_path: Path) -> None:
    """A torchrun worker reads the variable before joining, so it fails at once, not at the rendezvous."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "ASK_DIST_TIMEOUT_MIN": "0",
           "ASK_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([str(BIN / "ask-train"), "progress=false"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines() == [
        "ask-train: error: ASK_DIST_TIMEOUT_MIN=0 is not a positive number of minutes; set it to how long a "
        "process may wait for the others, e.g. ASK_DIST_TIMEOUT_MIN=120, or unset it"
    ]


def test_ask_attack_under_torchrun_evaluates_once_on_rank_0(tmp_path: Path, shared_cache: Path) -> None:
    tiny = ["dataset.train_per_class=20", "model.width=8", "train.epochs=1", "train.schedule=constant"]
    train(compose_run("train", tiny, shared_cache), tmp_path / "model")
    done = _torchrun(tmp_path, shared_cache, [*tiny, "progress=false", f"model.checkpoint={tmp_path / 'model' / 'best.pt'}",
                                              "attack=[pgd]", "eval.victims=[dnn,knn]", "eval.n_points=12",
                                              "attack.steps=1"], program="ask-attack")
    output = done.stdout + done.stderr
    assert "rank 0 evaluates alone and the other 1 process(es) exit" in output
    assert output.count("wrote ") == 1  # one table, one metrics.json: rank 1 did not evaluate too
    # Rank 0's clock-named directory is an attack run's, under outputs/attack.
    (metrics_path,) = tmp_path.glob("outputs/*/*/*/metrics.json")
    assert metrics_path.parts[-4] == "attack"
    metrics = json.loads(metrics_path.read_text())
    assert metrics["n_points"] == 12
    assert [(r["attack"], r["victim"]) for r in metrics["results"]] == [
        ("pgd", "dnn"), ("pgd", "knn"), ("any", "dnn"), ("any", "knn")]
