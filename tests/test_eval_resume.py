"""An attack evaluation killed part-way and started again ends with the metrics of an uninterrupted
run (timings aside); a state saved for another evaluation, or a truncated one, is never used; and
two runs with the same seed write the same metrics.json byte for byte, timings aside."""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import ask.evaluation.evaluate as evaluate_module
from ask.data import ImageSplit, load_dataset
from ask.evaluation.evaluate import evaluation_key
from ask.evaluation.job import auto_checkpoint, run_attack_job
from ask.utils.io import LoadError, atomic_save, safe_load
from tests.conftest import compose_run, finish_cli, start_cli

# All six attacks (the default list) on the four victims. The killed run: 80 points in 10 batches
# of 8, about 0.25 s a batch on one core, time enough to land the signal part-way. The in-process
# runs: 40 points in 5 batches, and fewer steps (randomness is in the starts, not in the steps).
CLI_ARGS = ["progress=false", "eval.n_points=80", "eval.batch_size=8"]
IN_PROCESS = ["eval.n_points=40", "eval.batch_size=8", "attack.steps=5"]
# The only fields that differ between two identical runs.
TIMING_LINE = re.compile(r'^\s*"(seconds|images_per_second)": .*\n', re.MULTILINE)


@pytest.fixture(scope="module")
def checkpoint(shared_cache: Path) -> Path:
    """The digits model ask-attack trains on the fly, trained once (shared with the CLI tests)."""
    run = compose_run("attack", [], shared_cache)
    return auto_checkpoint(run, load_dataset(run.dataset, run.cache_dir, seed=run.seed, progress=False))


def _without_timings(run_dir: Path) -> str:
    return TIMING_LINE.sub("", (run_dir / "metrics.json").read_text())


def _cli(work: Path, cache: Path, extra: list[str]) -> subprocess.Popen:
    return start_cli("ask-attack", [*CLI_ARGS, *extra], work, cache)


def _kill_after_batch(work: Path, cache: Path, extra: list[str], run_dir: Path, batch: int) -> dict:
    """Start ask-attack, SIGKILL it once its saved state has passed ``batch``; the state it left."""
    state_path = run_dir / "eval_state.pt"
    process = _cli(work, cache, extra)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"finished before it could be killed:\n{process.communicate()[0][-3000:]}"
            try:
                state = safe_load(state_path)
            except LoadError:  # not written yet
                state = None
            if state is not None and state["next_batch"] >= batch:
                break
            time.sleep(0.01)
        else:
            raise AssertionError(f"{state_path} never reached batch {batch}")
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    return safe_load(state_path)


def test_a_killed_evaluation_resumes_to_the_same_metrics(tmp_path: Path, shared_cache: Path,
                                                          checkpoint: Path) -> None:
    model = f"model.checkpoint={checkpoint}"
    # The uninterrupted reference runs alongside the one to kill (each on one core).
    reference = _cli(tmp_path, shared_cache, [model, "hydra.run.dir=uninterrupted"])
    run_dir = tmp_path / "killed"
    left = _kill_after_batch(tmp_path, shared_cache, [model, "hydra.run.dir=killed"], run_dir, batch=2)
    assert 2 <= left["next_batch"] < left["n_batches"] == 10
    assert not (run_dir / "metrics.json").exists()
    output, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, output[-3000:]
    assert not (tmp_path / "uninterrupted" / "eval_state.pt").exists()

    output = finish_cli(_cli(tmp_path, shared_cache, [model, "hydra.run.dir=killed"]))
    points_done = left["next_batch"] * 8
    assert f"resuming evaluation at batch {left['next_batch'] + 1}/10 ({points_done} points done)" in output
    assert _without_timings(run_dir) == _without_timings(tmp_path / "uninterrupted")
    assert not list(run_dir.glob("*eval_state*")), "the state (or a temporary copy) outlived the results"


class _Interrupted(Exception):
    pass


def _interrupt_after(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the in-process evaluation stop right after saving its state for ``batch`` batches."""
    def save_then_stop(state: dict, path: Path) -> Path:
        saved = atomic_save(state, path)
        if state["next_batch"] == batch:
            raise _Interrupted
        return saved

    monkeypatch.setattr(evaluate_module, "atomic_save", save_then_stop)


def test_stale_or_truncated_state_is_not_used(tmp_path: Path, shared_cache: Path, checkpoint: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    def run(extra: list[str], run_dir: Path) -> None:
        run_attack_job(compose_run("attack", [f"model.checkpoint={checkpoint}", *IN_PROCESS, *extra], shared_cache),
                       run_dir)

    stale_dir, truncated_dir = tmp_path / "stale", tmp_path / "truncated"
    with monkeypatch.context() as patch:
        _interrupt_after(2, patch)
        with pytest.raises(_Interrupted):
            run(["attack.eps=0.05"], stale_dir)
    state = (stale_dir / "eval_state.pt").read_bytes()
    truncated_dir.mkdir()
    (truncated_dir / "eval_state.pt").write_bytes(state[: len(state) // 2])

    caplog.set_level(logging.INFO)
    run(["attack.eps=0.08"], stale_dir)
    assert "it was saved by an evaluation with another config" in caplog.text
    caplog.clear()
    run(["attack.eps=0.08"], truncated_dir)
    assert "cannot load" in caplog.text and "starting the evaluation over" in caplog.text
    assert "resuming evaluation" not in caplog.text

    # Both started over: had the stale state been used, its eps = 0.05 counts would show.
    assert _without_timings(stale_dir) == _without_timings(truncated_dir)
    assert not (stale_dir / "eval_state.pt").exists() and not (truncated_dir / "eval_state.pt").exists()


def test_same_seed_gives_byte_identical_metrics(tmp_path: Path, shared_cache: Path, checkpoint: Path) -> None:
    def run(name: str, extra: list[str]) -> str:
        run_attack_job(compose_run("attack", [f"model.checkpoint={checkpoint}", *IN_PROCESS, *extra], shared_cache),
                       tmp_path / name)
        return _without_timings(tmp_path / name)

    plain = run("a", [])
    assert run("b", []) == plain
    try:
        deterministic = run("c", ["deterministic=true"])
        assert run("d", ["deterministic=true"]) == deterministic
    finally:
        torch.use_deterministic_algorithms(False)  # deterministic=true sets a process-wide switch
    assert run("other_seed", ["seed=1"]) != plain


def test_the_key_follows_what_changes_the_numbers(shared_cache: Path) -> None:
    points = ImageSplit(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4))
    cpu = torch.device("cpu")

    def key(overrides: list[str], digest: str = "abc", split: ImageSplit = points) -> str:
        return evaluation_key(compose_run("attack", overrides, shared_cache), digest, split, cpu)

    base = key([])
    # Display, cache locations and the checkpoint's path (its digest stands in) do not count.
    assert key(["progress=true", "model.checkpoint=/elsewhere/best.pt"]) == base
    assert key([], split=ImageSplit(points.images.clone(), points.labels.clone())) == base
    for changed in (key(["attack.eps=0.05"]), key(["seed=1"]), key(["eval.batch_size=7"]),
                    key(["attack.methods.ask.temperature=0.1"]), key([], digest="abd"),
                    key([], split=points.subset(torch.tensor([0, 1, 3, 2])))):
        assert changed != base
