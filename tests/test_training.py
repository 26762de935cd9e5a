"""Training writes atomic checkpoints and resumes exactly where it stopped."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch

from ask.config.schema import RunConfig, TrainConfig
from ask.errors import ConfigError
from ask.models.checkpoint import load_checkpoint, save_checkpoint
from ask.training.trainer import make_scheduler, train
from ask.utils.runtime import capture_rng_state, restore_generator, restore_rng_state
from tests.conftest import compose_run

TINY = ["dataset.train_per_class=20", "dataset.test_per_class=5", "train.batch_size=32",
        "train.schedule=constant", "model.width=8"]


def _epochs(path: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_resume_continues_from_the_saved_epoch(tmp_path: Path, cache_dir: Path) -> None:
    straight = tmp_path / "straight"
    train(compose_run("train", [*TINY, "train.epochs=3"], cache_dir), straight)

    resumed = tmp_path / "resumed"
    train(compose_run("train", [*TINY, "train.epochs=2"], cache_dir), resumed)
    assert load_checkpoint(resumed / "last.pt")["epoch"] == 2
    # Same directory, longer schedule: continues at epoch 3 instead of starting over.
    train(compose_run("train", [*TINY, "train.epochs=3"], cache_dir), resumed)
    assert _epochs(resumed) == [1, 2, 3]

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["metrics"]["train_loss"] == b["metrics"]["train_loss"]


def test_thread_counts_are_recorded_per_epoch_and_in_the_summary(tmp_path: Path, cache_dir: Path) -> None:
    """Summation order follows torch's thread count, so a run records it, per epoch (a resume may change it)."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(compose_run("train", [*TINY, "train.epochs=1"], cache_dir), tmp_path)
        torch.set_num_threads(2)
        summary = train(compose_run("train", [*TINY, "train.epochs=2"], cache_dir), tmp_path)
    finally:
        torch.set_num_threads(before)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["torch_threads"]) for r in records] == [(1, 1), (2, 2)]
    assert summary["torch_threads"] == [1, 2]
    assert json.loads((tmp_path / "train_summary.json").read_text())["torch_threads"] == [1, 2]


def test_checkpoint_holds_plain_data(tmp_path: Path, cache_dir: Path) -> None:
    summary = train(compose_run("train", [*TINY, "train.epochs=1"], cache_dir), tmp_path)
    state = load_checkpoint(tmp_path / "best.pt")  # weights_only=True inside
    assert state["model"]["name"] == "smallcnn" and state["model"]["num_classes"] == 10
    assert state["config"]["dataset"]["name"] == "digits"
    assert {"optimizer", "scheduler", "rng", "order_rng", "augment_rng"} <= set(state)
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["n_train"] == 200


@pytest.mark.parametrize(("milestones", "gamma"), [([100], 0.1), ([2, 5], 0.5), ([1, 2, 6], 0.1)])
def test_step_schedule_is_multisteplr_stepped_per_epoch(milestones: list[int], gamma: float) -> None:
    """The trainer steps its scheduler every batch; train.schedule=step must still give every step of
    epoch e the lr of torch's MultiStepLR after e epoch steps."""
    epochs, steps_per_epoch = (200, 3) if milestones == [100] else (8, 5)
    run = RunConfig(train=TrainConfig(epochs=epochs, lr=0.1, schedule="step", step_milestones=milestones,
                                      step_gamma=gamma))
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=run.train.lr)
    scheduler = make_scheduler(ours, run, steps_per_epoch)
    reference = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=run.train.lr)
    multistep = torch.optim.lr_scheduler.MultiStepLR(reference, milestones=milestones, gamma=gamma)
    seen = []
    for _epoch in range(epochs):
        expected = reference.param_groups[0]["lr"]
        for _step in range(steps_per_epoch):
            assert ours.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12, abs=0)
            ours.step()
            scheduler.step()
        seen.append(expected)
        reference.step()
        multistep.step()
    assert len(set(seen)) == len(milestones) + 1  # every milestone falls inside the run
    if milestones == [100]:  # the authors' schedule: 100 epochs at 0.1, then 100 at 0.01
        assert seen[:100] == [0.1] * 100 and seen[100:] == pytest.approx([0.01] * 100)


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.schedule=step"], r"train.schedule=step needs train.step_milestones"),
    (["train.schedule=step", "train.step_milestones=[0]"], r"every milestone must be an epoch in 1..29"),
    (["train.schedule=step", "train.step_milestones=[30]"], r"every milestone must be an epoch in 1..29"),
    (["train.schedule=step", "train.step_milestones=[20,10]"], r"\[20,10\] must be strictly ascending"),
    (["train.schedule=step", "train.step_milestones=[10,10]"], r"must be strictly ascending"),
    (["train.step_gamma=0"], r"train.step_gamma=0.0 must be in \(0, 1\]"),
    (["train.step_gamma=1.5"], r"train.step_gamma=1.5 must be in \(0, 1\]"),
])
def test_step_schedule_settings_are_checked(overrides: list[str], message: str, cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_run("train", ["train.epochs=30", *overrides], cache_dir)
    # Milestones only matter to the step schedule: another schedule ignores them.
    compose_run("train", ["train.epochs=30", "train.schedule=cosine", "train.step_milestones=[40]"], cache_dir)


def test_step_schedule_resumes_only_with_its_milestones(tmp_path: Path, cache_dir: Path) -> None:
    base = [override for override in TINY if not override.startswith("train.schedule=")]
    step = [*base, "train.schedule=step", "train.lr=0.1"]
    train(compose_run("train", [*step, "train.epochs=2", "train.step_milestones=[1]"], cache_dir), tmp_path)
    with pytest.raises(ConfigError) as error:
        train(compose_run("train", [*step, "train.epochs=3", "train.step_milestones=[2]"], cache_dir), tmp_path)
    assert str(error.value) == (
        f"{tmp_path / 'last.pt'} follows a step schedule (lr x0.1 after epochs [1]), not step (lr x0.1 after "
        "epochs [2]); set train.schedule=step train.step_milestones=[1] train.step_gamma=0.1 to resume it, "
        "or choose a new hydra.run.dir to start afresh"
    )
    with pytest.raises(ConfigError, match="follows a step schedule .* not cosine of 3 epochs"):
        train(compose_run("train", [*base, "train.schedule=cosine", "train.epochs=3"], cache_dir), tmp_path)
    # Same milestones, more epochs: the lr of every epoch is what a fresh 3-epoch run would use.
    train(compose_run("train", [*step, "train.epochs=3", "train.step_milestones=[1]"], cache_dir), tmp_path)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.1, 0.01, 0.01])


def test_resume_under_other_settings_names_them(tmp_path: Path, cache_dir: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """train.resume may continue a checkpoint under another defence or loss: the log says which settings
    changed, since the new run's config.yaml describes only the epochs after the checkpoint's."""
    first, second = tmp_path / "first", tmp_path / "second"
    train(compose_run("train", [*TINY, "train.epochs=1"], cache_dir), first)
    with caplog.at_level(logging.WARNING, logger="ask.training.resume"):
        train(compose_run("train", [*TINY, "train.epochs=2", "train.label_smoothing=0.1", "defense=at",
                                    "defense.steps=1", f"train.resume={first / 'last.pt'}"], cache_dir), second)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "ask.training.resume"]
    assert message.startswith(f"{first / 'last.pt'} was trained with other settings; epochs after 1 follow this "
                              "run's (defense.name: none -> at, ")
    assert "defense.steps: 10 -> 1" in message and message.endswith(" and 1 more)")  # at most eight named
    assert "defense.params: {}" not in message  # no-defence's empty group is not a setting of its own
    assert _epochs(second) == [1, 2]  # the checkpoint's history comes along

    caplog.clear()  # the same settings, one epoch more, in the run's own directory: nothing to say but the length
    with caplog.at_level(logging.WARNING, logger="ask.training.resume"):
        train(compose_run("train", [*TINY, "train.epochs=3", "train.label_smoothing=0.1", "defense=at",
                                    "defense.steps=1"], cache_dir), second)
    assert [r.getMessage().split("(")[-1] for r in caplog.records if r.name == "ask.training.resume"] == [
        "train.epochs: 2 -> 3)"]


@pytest.mark.parametrize(("override", "saved", "given"), [
    ("train.lr=0.02", "train.lr=0.05", "train.lr=0.02"),
    ("train.nesterov=false", "train.nesterov=true", "train.nesterov=false"),
    ("train.batch_size=16", "train.batch_size=32", "train.batch_size=16"),
])
def test_resume_refuses_settings_the_checkpoint_would_override(override: str, saved: str, given: str,
                                                               tmp_path: Path, cache_dir: Path) -> None:
    """torch restores the optimiser's lr, momentum, Nesterov flag and weight decay with its state, so a
    new value would be ignored while config.yaml claimed it (train.lr=500 used to run at the old lr);
    the batch size sets the steps per epoch that the restored schedule counts in."""
    train(compose_run("train", [*TINY, "train.epochs=1"], cache_dir), tmp_path / "first")
    with pytest.raises(ConfigError) as error:
        train(compose_run("train", [*TINY, "train.epochs=1", override,
                                    f"train.resume={tmp_path / 'first' / 'last.pt'}"], cache_dir), tmp_path / "second")
    assert str(error.value) == (f"{tmp_path / 'first' / 'last.pt'} was trained with {saved}, not {given}; a resumed "
                                "run keeps the checkpoint's optimiser settings and steps per epoch, so set "
                                f"{saved} to resume it, or drop train.resume to start afresh")
    assert not (tmp_path / "second" / "last.pt").exists()


def test_resume_elsewhere_carries_best_pt_with_its_score(tmp_path: Path, cache_dir: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """train.resume into a new directory carries the best score on, so the epoch holding it must come
    too: otherwise no new epoch below that score is kept, and the run ended by calling its last epoch
    best. Without a matching best.pt beside the checkpoint, selection restarts among the new epochs."""
    with_val = [*TINY, "dataset.val_per_class=5"]
    first = tmp_path / "first"
    train(compose_run("train", [*with_val, "train.epochs=2"], cache_dir), first)
    # An unbeatable best epoch: epoch 1 at val_acc 1.0, recorded in best.pt and in last.pt's carried score.
    best, last = load_checkpoint(first / "best.pt"), load_checkpoint(first / "last.pt")
    best.update(epoch=1, best_metric=1.0, metrics={**best["metrics"], "epoch": 1, "val_acc": 1.0})
    last["best_metric"] = 1.0
    save_checkpoint(first / "best.pt", best)
    save_checkpoint(first / "last.pt", last)

    carried = train(compose_run("train", [*with_val, "train.epochs=3", f"train.resume={first / 'last.pt'}"], cache_dir),
                    tmp_path / "carried")
    assert carried["best_epoch"] == 1 and carried["best_val_acc"] == 1.0
    assert _epochs(tmp_path / "carried") == [1, 2, 3]
    assert (tmp_path / "carried" / "best.pt").read_bytes() == (first / "best.pt").read_bytes()

    (first / "best.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="ask.training.resume"):
        restarted = train(compose_run("train", [*with_val, "train.epochs=3", f"train.resume={first / 'last.pt'}"],
                                      cache_dir), tmp_path / "restarted")
    assert [r.getMessage() for r in caplog.records if "best.pt" in r.getMessage()] == [
        f"{first / 'last.pt'} has no best.pt beside it holding its best epoch so far (score 1.0000), so best.pt will "
        "be the best of the epochs this run trains"]
    assert restarted["best_epoch"] == 3 and restarted["best_val_acc"] < 1.0


def test_resume_keeps_the_rule_that_picked_best_pt(tmp_path: Path, cache_dir: Path) -> None:
    with_val = [*TINY, "dataset.val_per_class=5"]
    train(compose_run("train", [*with_val, "train.epochs=1"], cache_dir), tmp_path)
    with pytest.raises(ConfigError) as error:
        train(compose_run("train", [*with_val, "train.epochs=2", "train.select_min_val_acc=0.5"], cache_dir), tmp_path)
    assert str(error.value) == (
        f"{tmp_path / 'last.pt'} kept best.pt by val_acc with no clean floor, not by val_acc with a clean floor "
        "of 0.5; set train.select_metric=val_acc train.select_min_val_acc=0.0 to resume it, or choose a new "
        "hydra.run.dir to start afresh"
    )
    assert _epochs(tmp_path) == [1]  # refused before anything was written
    # The same rule resumes; with no val split nothing was scored, so any rule may take over.
    train(compose_run("train", [*with_val, "train.epochs=2"], cache_dir), tmp_path)
    assert _epochs(tmp_path) == [1, 2]
    no_val = tmp_path / "no-val"
    train(compose_run("train", [*TINY, "train.epochs=1"], cache_dir), no_val)
    train(compose_run("train", [*TINY, "train.epochs=2", "train.select_metric=val_robust_knn"], cache_dir), no_val)
    assert _epochs(no_val) == [1, 2]


def _fake_cuda_states(n: int) -> list[torch.Tensor]:
    """What ``torch.cuda.get_rng_state_all`` gives on ``n`` GPUs: one 16-byte Philox state (seed, offset) each."""
    return [torch.full((16,), index, dtype=torch.uint8) for index in range(n)]


def _runtime_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "ask.utils.runtime" and r.levelno == logging.WARNING]


def test_rng_state_saved_on_four_gpus_restores_on_the_cpu(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A checkpoint written with 4 GPUs resumes where none is visible: CPU streams exact, one warning."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(3)
    random.seed(3)
    state = {**capture_rng_state(), "cuda": _fake_cuda_states(4)}
    expected = (torch.rand(5), random.random())
    torch.manual_seed(99)
    random.seed(99)
    with caplog.at_level(logging.WARNING, logger="ask.utils.runtime"):
        restore_rng_state(state)
    assert torch.equal(torch.rand(5), expected[0]) and random.random() == expected[1]
    (message,) = _runtime_warnings(caplog)
    assert "saved with 4 CUDA device(s) and 0 are visible" in message


def test_rng_state_saved_on_four_gpus_restores_what_fits_on_two(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    restored: dict[int, torch.Tensor] = {}

    def set_rng_state(state: torch.Tensor, device: int = 0) -> None:
        if not 0 <= device < 2:  # as torch does on a machine with two GPUs
            raise RuntimeError(f"invalid device ordinal {device}")
        restored[device] = state

    state = {**capture_rng_state(), "cuda": _fake_cuda_states(4)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    monkeypatch.setattr(torch.cuda.random, "set_rng_state", set_rng_state)  # what set_rng_state_all calls
    with caplog.at_level(logging.WARNING, logger="ask.utils.runtime"):
        restore_rng_state(state)
    assert sorted(restored) == [0, 1]
    assert all(torch.equal(restored[i], state["cuda"][i]) for i in restored)
    (message,) = _runtime_warnings(caplog)
    assert "saved with 4 CUDA device(s) and 2 are visible" in message


def test_generator_state_of_another_device_restarts_the_stream(caplog: pytest.LogCaptureFixture) -> None:
    """A CUDA Philox state (16 bytes) does not fit a CPU generator (5056 bytes): reseeded, not an error."""
    generator = torch.Generator().manual_seed(5)
    seeded = generator.get_state()
    with pytest.raises(RuntimeError, match="size"):  # what the trainer used to hit
        torch.Generator().set_state(_fake_cuda_states(1)[0])
    with caplog.at_level(logging.WARNING, logger="ask.utils.runtime"):
        restore_generator(generator, _fake_cuda_states(1)[0], "augmentation")
    assert torch.equal(generator.get_state(), seeded)
    (message,) = _runtime_warnings(caplog)
    assert "augmentation" in message and "16 bytes" in message and "5056 bytes" in message
    # A state that fits is restored exactly, without a warning.
    caplog.clear()
    other = torch.Generator().manual_seed(7)
    restore_generator(generator, other.get_state(), "augmentation")
    assert torch.equal(torch.rand(4, generator=generator), torch.rand(4, generator=other))
    assert not _runtime_warnings(caplog)


@pytest.mark.slow
def test_run_saved_on_gpus_resumes_on_the_cpu(tmp_path: Path, cache_dir: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """last.pt as a 4-GPU CUDA run writes it (CUDA augmentation state, 4 CUDA streams) resumes here."""
    train(compose_run("train", [*TINY, "train.epochs=1"], cache_dir), tmp_path)
    state = load_checkpoint(tmp_path / "last.pt")
    state["augment_rng"] = _fake_cuda_states(1)[0]
    state["rng"]["cuda"] = _fake_cuda_states(4)
    save_checkpoint(tmp_path / "last.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    with caplog.at_level(logging.WARNING, logger="ask.utils.runtime"):
        train(compose_run("train", [*TINY, "train.epochs=2"], cache_dir), tmp_path)
    assert _epochs(tmp_path) == [1, 2]
    assert len(_runtime_warnings(caplog)) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_resumes_exactly_and_its_checkpoint_serves_the_cpu(tmp_path: Path, cache_dir: Path) -> None:
    """The trainer on a GPU with its CUDA defaults (mixed precision, channels_last), deterministic:
    a run stopped after epoch 1 and resumed ends with the weights of a straight run."""
    cuda = [*TINY, "device=cuda", "deterministic=true"]
    try:
        summary = train(compose_run("train", [*cuda, "train.epochs=2"], cache_dir), tmp_path / "straight")
        train(compose_run("train", [*cuda, "train.epochs=1"], cache_dir), tmp_path / "resumed")
        train(compose_run("train", [*cuda, "train.epochs=2"], cache_dir), tmp_path / "resumed")
    finally:
        torch.use_deterministic_algorithms(False)
    assert _epochs(tmp_path / "resumed") == [1, 2]
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert len(a["rng"]["cuda"]) == torch.cuda.device_count()  # the CUDA generators were saved
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["metrics"]["train_loss"] == b["metrics"]["train_loss"]
    # The GPU's checkpoint continues on the CPU (its CUDA random state cannot, with a warning).
    cpu = train(compose_run("train", [*TINY, "train.epochs=3"], cache_dir), tmp_path / "straight")
    assert _epochs(tmp_path / "straight") == [1, 2, 3] and 0 <= cpu["test_acc"] <= 1
    assert summary["n_train"] == 200 and summary["config"]["device"] == "cuda"
