"""A training run killed or pre-empted part-way and started again ends exactly where an
uninterrupted run ends: same weights, same metrics (timings aside)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ask.errors import ConfigError
from ask.models.checkpoint import load_checkpoint
from ask.training.trainer import train
from ask.utils.rundir import ADOPTED_MARKER, run_lock
from tests.conftest import compose_run, finish_cli, start_cli

# Adversarial training on the full digits split: about a second per epoch on one core, long
# enough to land a signal inside an epoch.
ARGS = ["progress=false", "train.epochs=3", "train.batch_size=16", "model.width=16", "defense=at",
        "defense.steps=4", "train.val_points=0"]
TIMING_KEYS = {"seconds", "images_per_second", "val_seconds"}


def _start(work: Path, cache: Path, extra: list[str]) -> subprocess.Popen:
    return start_cli("ask-train", [*ARGS, *extra], work, cache)


def _finish(work: Path, cache: Path, extra: list[str]) -> None:
    finish_cli(_start(work, cache, extra))


def _wait_for(path_glob: str, root: Path, process: subprocess.Popen, timeout: float = 120) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.glob(path_glob))
        if found:
            return found[0]
        assert process.poll() is None, process.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError(f"{path_glob} did not appear under {root}")


def _epoch_seconds(run_dir: Path) -> float:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])["seconds"]


def _without_timings(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in records]


def _assert_same_run(reference: Path, other: Path) -> None:
    ref_metrics = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (other / "metrics.jsonl").read_text().splitlines()]
    assert _without_timings(metrics) == _without_timings(ref_metrics)
    ref_summary = json.loads((reference / "train_summary.json").read_text())
    summary = json.loads((other / "train_summary.json").read_text())
    for key in ("checkpoint", "config"):
        ref_summary.pop(key), summary.pop(key)
    assert summary == ref_summary
    for name in ("last.pt", "best.pt"):
        a, b = load_checkpoint(reference / name), load_checkpoint(other / name)
        assert a["epoch"] == b["epoch"]
        for key, tensor in a["state_dict"].items():
            assert torch.equal(tensor, b["state_dict"][key]), (name, key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, shared_cache: Path) -> Path:
    work = tmp_path_factory.mktemp("straight")
    _finish(work, shared_cache, ["hydra.run.dir=run"])
    return work / "run"


def test_sigkill_mid_epoch_then_the_same_command_continues_identically(
        uninterrupted: Path, tmp_path: Path, shared_cache: Path) -> None:
    # Hydra's default, clock-named run directory: the restart lands in a new directory and must
    # find the killed run by its config.
    process = _start(tmp_path, shared_cache, [])
    last = _wait_for("outputs/train/*/*/last.pt", tmp_path, process)
    time.sleep(0.4 * _epoch_seconds(uninterrupted))  # inside epoch 2
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    killed_dir = last.parent
    assert process.returncode == -signal.SIGKILL
    assert not (killed_dir / "train_summary.json").exists()
    completed = load_checkpoint(killed_dir / "last.pt")["epoch"]
    assert 1 <= completed < 3

    time.sleep(1.1)  # a new clock-named directory for the restart
    _finish(tmp_path, shared_cache, [])
    (resumed_dir,) = [p.parent for p in tmp_path.glob("outputs/train/*/*/train_summary.json")]
    assert resumed_dir != killed_dir
    assert (killed_dir / ADOPTED_MARKER).read_text().strip() == str(resumed_dir.resolve())
    _assert_same_run(uninterrupted, resumed_dir)


def test_sigterm_saves_the_current_step_and_the_run_resumes_identically(
        uninterrupted: Path, tmp_path: Path, shared_cache: Path) -> None:
    process = _start(tmp_path, shared_cache, ["hydra.run.dir=run"])
    _wait_for("run/last.pt", tmp_path, process)
    time.sleep(0.3 * _epoch_seconds(uninterrupted))
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 143, output[-2000:]
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    partial = state["partial"]
    assert partial is not None and partial["epoch"] == state["epoch"] + 1 and partial["step"] >= 1
    message = output.strip().splitlines()[-1]
    assert message.startswith("ask-train: stopped by SIGTERM at epoch") and "run the same command" in message

    _finish(tmp_path, shared_cache, ["hydra.run.dir=run"])
    _assert_same_run(uninterrupted, tmp_path / "run")


def test_a_second_live_run_in_the_same_directory_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    run = compose_run("train", ["train.epochs=1", "dataset.train_per_class=20", "model.width=8"], cache_dir)
    with run_lock(tmp_path), pytest.raises(ConfigError, match="another ask run is still working"):
        train(run, tmp_path)
    assert not (tmp_path / "last.pt").exists()


def test_same_seed_gives_identical_metrics_and_weights(tmp_path: Path, cache_dir: Path) -> None:
    tiny = ["dataset.train_per_class=20", "dataset.test_per_class=5", "train.batch_size=32", "model.width=8",
            "train.epochs=2", "defense=at", "defense.steps=2"]
    try:
        for name, extra in (("a", []), ("b", []), ("c", ["deterministic=true"]), ("other_seed", ["seed=1"])):
            train(compose_run("train", [*tiny, *extra], cache_dir), tmp_path / name)
    finally:
        torch.use_deterministic_algorithms(False)  # deterministic=true sets a process-wide switch

    def records(name: str) -> list[dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return _without_timings([json.loads(line) for line in lines])

    assert records("a") == records("b") == records("c")
    assert records("a") != records("other_seed")
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


def test_a_stop_signal_only_sets_a_flag_then_reaches_the_previous_handler() -> None:

    from ask.training.preemption import StopRequest

    seen: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: seen.append(signum))
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(0.05)
            assert stop.requested and stop.signal_name == "SIGUSR2" and seen == []
            stop.forward()  # after the checkpoint: the scheduler's own handler (submitit requeues)
            assert seen == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_sigterm_that_lands_in_a_log_call_still_stops_the_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """ask-attack's SIGTERM raises from its handler, wherever the process is. Logging catches
    ``Exception`` in its handlers and, with ``raiseExceptions`` off as the console scripts set it,
    said nothing: a signal that landed while a batch was logged let the evaluation run to the end
    (once in a loaded CI run). The stop must reach the caller."""
    from ask.training.preemption import RunStopped, stop_on_sigterm

    class SignalWhileFormatting(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            os.kill(os.getpid(), signal.SIGTERM)
            return super().format(record)

    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(SignalWhileFormatting())
    log = logging.getLogger("ask.test_signal_in_logging")
    log.addHandler(handler)
    log.propagate = False
    monkeypatch.setattr(logging, "raiseExceptions", False)
    reached: list[str] = []
    try:
        with pytest.raises(RunStopped, match="stopped by SIGTERM"):
            with stop_on_sigterm(lambda name: f"stopped by {name}"):
                log.warning("attacked 8/80 points")
                reached.append("the next batch")
    finally:
        log.removeHandler(handler)
    assert reached == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back


def test_a_fresh_directory_takes_over_only_an_unfinished_run_of_the_same_config(tmp_path: Path) -> None:
    from ask.utils.rundir import continue_unfinished_run
    from ask.utils.runfiles import RunFiles

    def run_dir(stamp: str, config: str, files: dict[str, str]) -> Path:
        directory = tmp_path / "outputs" / "attack" / "2026-11-24" / stamp
        directory.mkdir(parents=True)
        (directory / "config.yaml").write_text(config)
        for name, text in files.items():
            (directory / name).write_text(text)
        return directory

    same, other = "seed: 0\nprogress: true\n", "seed: 1\nprogress: true\n"
    run_dir("10-00-00", same, {"eval_state.pt": "finished", "metrics.json": "{}"})  # done: not taken
    run_dir("10-00-01", other, {"eval_state.pt": "other config"})  # another command: not taken
    crashed = run_dir("10-00-02", same, {"eval_state.pt": "crashed"})
    fresh = run_dir("10-00-03", "seed: 0\nprogress: false\n", {})  # progress does not change results

    files = RunFiles("metrics.json", ("eval_state.pt",))
    assert continue_unfinished_run(fresh, files) == crashed
    assert (fresh / "eval_state.pt").read_text() == "crashed"
    assert (crashed / ADOPTED_MARKER).read_text().strip() == str(fresh.resolve())
    # A directory with progress of its own resumes by itself; a crashed run is taken over once, so a
    # later restart continues the newest copy, never the old one again.
    assert continue_unfinished_run(fresh, files) is None
    later = run_dir("10-00-04", same, {})
    assert continue_unfinished_run(later, files) == fresh


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deterministic_cuda_training_gives_identical_metrics_and_weights(tmp_path: Path, cache_dir: Path) -> None:
    tiny = ["dataset.train_per_class=20", "dataset.test_per_class=5", "train.batch_size=32", "model.width=8",
            "train.epochs=2", "defense=at", "defense.steps=2", "device=cuda", "deterministic=true"]
    try:
        for name, extra in (("a", []), ("b", []), ("other_seed", ["seed=1"])):
            train(compose_run("train", [*tiny, *extra], cache_dir), tmp_path / name)
    finally:
        torch.use_deterministic_algorithms(False)

    def records(name: str) -> list[dict]:
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return _without_timings([json.loads(line) for line in lines])

    assert records("a") == records("b") != records("other_seed")
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(tmp_path / "b" / "last.pt")
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
