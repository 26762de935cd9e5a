"""Training writes atomic checkpoints and resumes exactly where it stopped."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ask.training.checkpoint import load_checkpoint
from ask.training.trainer import train
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


def test_checkpoint_holds_plain_data(tmp_path: Path, cache_dir: Path) -> None:
    summary = train(compose_run("train", [*TINY, "train.epochs=1"], cache_dir), tmp_path)
    state = load_checkpoint(tmp_path / "best.pt")  # weights_only=True inside
    assert state["model"]["name"] == "smallcnn" and state["model"]["num_classes"] == 10
    assert state["config"]["dataset"]["name"] == "digits"
    assert {"optimizer", "scheduler", "rng", "order_rng", "augment_rng"} <= set(state)
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["n_train"] == 200
