"""An attack evaluation killed part-way and started again ends with the metrics of an uninterrupted
run (timings aside); a state saved for another evaluation, or a truncated one, is never used; and
two runs with the same seed write the same metrics.json byte for byte, timings aside."""

from __future__ import annotations

import csv
import json
import logging
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

import ask.evaluation.evaluate as evaluate_module
from ask.cli.attack import auto_checkpoint
from ask.data import ImageSplit, load_dataset, point_indices
from ask.evaluation.evaluate import evaluation_key
from ask.evaluation.job import run_attack_job
from ask.reporting import write_report
from ask.utils import precision
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


def test_the_key_follows_the_resolved_precision(shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval.amp=auto is fp32 on one machine and bf16 on another: a saved state must not cross over."""
    points = ImageSplit(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.arange(4))
    run = compose_run("attack", ["eval.amp=auto"], shared_cache)
    keys = []
    for native in (False, True):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        keys.append(evaluation_key(run, "abc", points, torch.device("cpu")))
    assert keys[0] != keys[1]


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
                    key([], split=points.subset(torch.tensor([0, 1, 3, 2]))), key(["eval.amp=bf16"])):
        assert changed != base


# Two attacks on two victims: enough for the worst case, small enough for three in-process runs.
TWO_ATTACKS = ["attack=[ask,pgd]", "eval.victims=[dnn,knn]", *IN_PROCESS]


def _per_point(run_dir: Path) -> tuple[list[int], list[int], dict[str, dict[str, list[bool]]]]:
    """per_point.csv read back: the points, their labels, and per victim the columns (clean, attacks)."""
    with open(run_dir / "per_point.csv", newline="") as handle:
        lines = list(csv.DictReader(handle))
    victims = list(dict.fromkeys(line["victim"] for line in lines))
    points = [int(line["point"]) for line in lines if line["victim"] == victims[0]]
    labels = [int(line["label"]) for line in lines if line["victim"] == victims[0]]
    columns = {victim: {name: [line[name] == "1" for line in lines if line["victim"] == victim]
                        for name in lines[0] if name not in ("point", "label", "victim")}
               for victim in victims}
    return points, labels, columns


def test_worst_case_rows_follow_the_saved_per_point_results_and_survive_a_resume(
        tmp_path: Path, shared_cache: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    def run(run_dir: Path) -> dict:
        return run_attack_job(compose_run("attack", [f"model.checkpoint={checkpoint}", *TWO_ATTACKS], shared_cache),
                              run_dir)

    metrics = run(tmp_path / "whole")
    rows = {(r["attack"], r["victim"]): r for r in metrics["results"]}
    assert list(rows) == [(a, v) for a in ("ask", "pgd", "any") for v in ("dnn", "knn")]
    assert metrics["torch_threads"] == torch.get_num_threads()
    written = json.loads((tmp_path / "whole" / "metrics.json").read_text())["results"]
    assert [r["attack"] for r in written][-2:] == ["any", "any"]

    points, labels, per_point = _per_point(tmp_path / "whole")
    data = load_dataset(compose_run("attack", [], shared_cache).dataset, shared_cache, seed=0, progress=False)
    assert points == point_indices(len(data.test), 40, seed=0).tolist()
    assert labels == data.test.labels[points].tolist()
    assert list(per_point) == ["dnn", "knn"]
    for victim, columns in per_point.items():
        assert list(columns) == ["clean", "ask", "pgd"] and all(len(flags) == 40 for flags in columns.values())
        clean = columns.pop("clean")
        adv = columns
        right = sum(clean)
        # The saved points are the ones the counts were made of: they give each attack's row.
        for attack, flags in adv.items():
            row = rows[(attack, victim)]
            assert row["clean_acc"] == right / 40 and row["robust_acc"] == sum(flags) / 40
            assert row["asr"] == sum(c and not a for c, a in zip(clean, flags, strict=True)) / right
        # The worst case, recomputed point by point.
        robust = [c and all(flags[i] for flags in adv.values()) for i, c in enumerate(clean)]
        broken = {attack: {i for i, (c, a) in enumerate(zip(clean, flags, strict=True)) if c and not a}
                  for attack, flags in adv.items()}
        worst = rows[("any", victim)]
        assert worst["robust_acc"] == sum(robust) / 40
        assert worst["robust_acc"] <= min(rows[(attack, victim)]["robust_acc"] for attack in adv)
        assert worst["clean_acc"] == right / 40 and worst["n_points"] == 40
        assert worst["asr"] == len(broken["ask"] | broken["pgd"]) / right
        assert worst["broken_by"] == {attack: len(points) for attack, points in broken.items()}
        assert worst["only_by"] == {"ask": len(broken["ask"] - broken["pgd"]),
                                    "pgd": len(broken["pgd"] - broken["ask"])}
        both = len(broken["ask"] & broken["pgd"])
        assert worst["times_broken"] == [sum(robust), len(broken["ask"] ^ broken["pgd"]), both]
        assert worst["attacks"] == ["ask", "pgd"]
        assert (worst["eps"], worst["norm"], worst["steps"]) == (metrics["eps"], metrics["norm"], metrics["steps"])
        assert worst["seconds"] == pytest.approx(sum(rows[(a, victim)]["seconds"] for a in adv))
    assert rows[("any", "knn")]["asr"] > 0  # the attacks do break points on the kNN
    # ask-report carries the worst case over, with what each attack broke.
    report = write_report([tmp_path / "whole"], tmp_path / "report", plots=False)
    reported = {(r["attack"], r["victim"]): r for r in report.rows}
    for victim in ("dnn", "knn"):
        worst = rows[("any", victim)]
        assert reported[("any", victim)]["robust_acc_mean"] == worst["robust_acc"]
        assert reported[("any", victim)]["asr_mean"] == worst["asr"]
        assert reported[("any", victim)]["only_by"] == {a: float(n) for a, n in worst["only_by"].items()}
    text = report.markdown.read_text()
    knn = rows[("any", "knn")]
    assert f"| any | knn | {100 * knn['clean_acc']:.1f} | {100 * knn['robust_acc']:.1f} |" in text

    # Stopped after two of five batches and run again: the worst case needs the flags of the
    # points done before the stop, so it is right only if they were saved and restored.
    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        _interrupt_after(2, patch)
        with pytest.raises(_Interrupted):
            run(resumed)
    assert not (resumed / "per_point.csv").exists()
    caplog.set_level(logging.INFO)
    run(resumed)
    assert "resuming evaluation at batch 3/5 (16 points done)" in caplog.text
    assert _without_timings(resumed) == _without_timings(tmp_path / "whole")
    assert (resumed / "per_point.csv").read_bytes() == (tmp_path / "whole" / "per_point.csv").read_bytes()


def test_with_one_attack_the_worst_case_is_that_attacks_row(tmp_path: Path, shared_cache: Path,
                                                           checkpoint: Path) -> None:
    overrides = [f"model.checkpoint={checkpoint}", "attack=[pgd]", "eval.victims=[dnn,knn]", *IN_PROCESS]
    metrics = run_attack_job(compose_run("attack", overrides, shared_cache), tmp_path)
    rows = {(r["attack"], r["victim"]): r for r in metrics["results"]}
    assert list(rows) == [(a, v) for a in ("pgd", "any") for v in ("dnn", "knn")]
    _, _, per_point = _per_point(tmp_path)
    for victim in ("dnn", "knn"):
        pgd, worst = rows[("pgd", victim)], rows[("any", victim)]
        for key in ("clean_acc", "asr", "n_points", "eps", "norm", "steps", "seconds"):
            assert worst[key] == pgd[key], key
        assert worst["attacks"] == ["pgd"] and worst["only_by"] == worst["broken_by"]
        assert worst["broken_by"] == {"pgd": round(pgd["asr"] * pgd["clean_acc"] * 40)}
        # The attack's row counts right on x'; the worst case also asks right on x. They part only
        # by the points wrong on x that the attack's x' happens to get right.
        clean, flags = per_point[victim]["clean"], per_point[victim]["pgd"]
        recovered = sum(a and not c for c, a in zip(clean, flags, strict=True))
        assert worst["robust_acc"] == pytest.approx(pgd["robust_acc"] - recovered / 40)
        assert worst["times_broken"] == [round(worst["robust_acc"] * 40), worst["broken_by"]["pgd"]]
    assert rows[("any", "dnn")]["asr"] > 0  # PGD breaks points on the network it attacks


@pytest.fixture(scope="module")
def cuda_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small digits model trained on the GPU (the CPU's auto-trained one would take a minute)."""
    from ask.training.trainer import train

    directory = tmp_path_factory.mktemp("cuda-model")
    train(compose_run("train", ["dataset.train_per_class=40", "model.width=8", "train.epochs=2", "device=cuda"],
                      directory / "cache"), directory / "run")
    return directory / "run" / "best.pt"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_deterministic_cuda_evaluation_repeats_and_resumes_to_the_same_metrics(
        tmp_path: Path, shared_cache: Path, cuda_checkpoint: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """All six attacks on the four victims on a GPU: the attacks' CUDA generators, the faiss GPU
    searches and the saved state must give the same metrics twice, and after a stop part-way."""
    def run(name: str) -> dict:
        overrides = [f"model.checkpoint={cuda_checkpoint}", "device=cuda", "deterministic=true", *IN_PROCESS]
        return run_attack_job(compose_run("attack", overrides, shared_cache), tmp_path / name)

    try:
        metrics = run("a")
        run("b")
        with monkeypatch.context() as patch:
            _interrupt_after(2, patch)
            with pytest.raises(_Interrupted):
                run("resumed")
        caplog.set_level(logging.INFO)
        run("resumed")
    finally:
        torch.use_deterministic_algorithms(False)
    assert "resuming evaluation at batch 3/5 (16 points done)" in caplog.text
    assert _without_timings(tmp_path / "a") == _without_timings(tmp_path / "b") == _without_timings(
        tmp_path / "resumed")
    assert metrics["device"].startswith("cuda") and metrics["float32_precision"] == "ieee"
    assert len(metrics["results"]) == 7 * 4 and metrics["n_points"] == 40


@pytest.mark.parametrize(("signum", "status", "said"), [
    (signal.SIGTERM, 143, "stopped by SIGTERM; the completed batches (eval_state.pt) in {run} are kept; "
                          "run the same command to resume"),
    (signal.SIGINT, 130, "interrupted; the completed batches (eval_state.pt) in {run} are kept; "
                         "run the same command to continue"),
])
def test_a_stop_signal_says_what_is_kept_and_the_same_command_resumes(
        tmp_path: Path, shared_cache: Path, checkpoint: Path, signum: int, status: int, said: str) -> None:
    # Before, SIGTERM killed ask-attack without a word, and SIGINT spoke of epochs, not of rerunning.
    run_dir = tmp_path / "run"
    args = [f"model.checkpoint={checkpoint}", "attack=[pgd]", "eval.victims=[knn]", "attack.steps=100",
            f"hydra.run.dir={run_dir}"]
    process = _cli(tmp_path, shared_cache, args)
    deadline = time.monotonic() + 240
    while not (run_dir / "eval_state.pt").exists():  # one batch done: the signal lands mid-evaluation
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.01)
    process.send_signal(signum)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == status, output[-3000:]
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1] == f"ask-attack: {said.format(run=run_dir)}"
    done = safe_load(run_dir / "eval_state.pt")["next_batch"]
    resumed = finish_cli(_cli(tmp_path, shared_cache, args))
    assert f"resuming evaluation at batch {done + 1}/10" in resumed
    assert (run_dir / "metrics.json").is_file() and not (run_dir / "eval_state.pt").exists()
