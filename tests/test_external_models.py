"""A network ask did not define, from the command line: model=torchvision and model=module."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from tests.conftest import REPO, run_cli

CLASSES = ("ant", "bee", "cat")


class TinyNet(nn.Module):
    """A user's own classifier, built by model=module model.target=tests.test_external_models.TinyNet."""

    def __init__(self, classes: int = 3, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.head = nn.Linear(width * 16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@pytest.fixture(scope="module")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ImageFolder tree (three classes of 32x32 PNGs) and plain state_dicts saved by torch.save."""
    root = tmp_path_factory.mktemp("external")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 6)):
        for label, name in enumerate(CLASSES):
            folder = root / "tree" / split / name
            folder.mkdir(parents=True)
            for i in range(count):  # a class-coloured tint, so a trained network could tell them apart
                image = rng.integers(0, 160, (32, 32, 3)).astype(np.uint8)
                image[..., label] += 90
                Image.fromarray(image).save(folder / f"{i}.png")
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=len(CLASSES))
    torch.save(resnet.state_dict(), root / "resnet18.pt")
    tiny = TinyNet()
    torch.save({"epoch": 7, "model": {f"module.{k}": v for k, v in tiny.state_dict().items()}}, root / "tiny.pt")
    return {"root": root, "tree": root / "tree", "resnet18": root / "resnet18.pt", "tiny": root / "tiny.pt"}


def _images(tree: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in sorted((tree / split / name).glob("*.png")):
            images.append(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1))
            labels.append(label)
    return torch.stack(images).float() / 255, torch.tensor(labels)


def _rows(run: Path) -> dict[tuple[str, str], dict]:
    metrics = json.loads((run / "metrics.json").read_text())
    return {(row["attack"], row["victim"]): row for row in metrics["results"]}


def test_a_torchvision_state_dict_is_attacked_without_training(user_files: dict[str, Path], tmp_path: Path,
                                                                shared_cache: Path) -> None:
    done = run_cli("ask-attack", [
        "model=torchvision", "model.arch=resnet18", f"model.weights={user_files['resnet18']}",
        "dataset=folder", f"dataset.root={user_files['tree']}", "knn.layers=[layer3]",
        "attack=[ask,pgd]", "eval.victims=[dnn,knn]", "progress=false", "hydra.run.dir=run"], tmp_path, shared_cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.search(r"^any\s+knn\s", done.stdout, flags=re.M), done.stdout  # the worst-case rows are printed
    rows = _rows(tmp_path / "run")
    assert set(rows) == {(a, v) for a in ("ask", "pgd", "any") for v in ("dnn", "knn")}
    # The weights really are the file's: the clean accuracy is the network's own on the test images.
    net = torchvision.models.resnet18(num_classes=len(CLASSES))
    net.load_state_dict(torch.load(user_files["resnet18"], weights_only=True))
    images, labels = _images(user_files["tree"], "test")
    # dataset=folder normalises with the training split's own statistics.
    train = _images(user_files["tree"], "train")[0].double().transpose(0, 1).reshape(3, -1)
    mean, std = train.mean(1).float().view(1, 3, 1, 1), train.std(1).float().view(1, 3, 1, 1)
    with torch.no_grad():
        expected = (net.eval()((images - mean) / std).argmax(1) == labels).float().mean().item()
    assert rows[("pgd", "dnn")]["clean_acc"] == pytest.approx(expected, abs=1e-6)
    assert rows[("any", "knn")]["robust_acc"] <= min(rows[("ask", "knn")]["robust_acc"],
                                                    rows[("pgd", "knn")]["robust_acc"])


def test_an_importable_class_with_a_wrapped_state_dict(user_files: dict[str, Path], tmp_path: Path,
                                                        shared_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    done = run_cli("ask-attack", [
        "model=module", "model.target=tests.test_external_models.TinyNet", "+model.kwargs.width=8",
        f"model.weights={user_files['tiny']}", "model.state_dict_key=model", "model.mean=[0.5,0.5,0.5]",
        "model.std=[0.25,0.25,0.25]", "dataset=cifar10_folder", f"dataset.root={user_files['tree']}",
        "knn.layers=[features.1]", "attack=[ask]", "eval.victims=[knn]", "progress=false", "hydra.run.dir=run"],
        tmp_path, shared_cache)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("ask", "knn") in _rows(tmp_path / "run")


def test_ask_train_trains_a_torchvision_architecture_that_ask_attack_reloads(
        user_files: dict[str, Path], tmp_path: Path, shared_cache: Path) -> None:
    common = ["model=torchvision", "model.arch=resnet18", "dataset=cifar10_folder", f"dataset.root={user_files['tree']}",
              "knn.layers=[layer2]", "progress=false"]
    done = run_cli("ask-train", [*common, "defense=at", "defense.steps=1", "train.epochs=1", "train.batch_size=12",
                                 "hydra.run.dir=train"], tmp_path, shared_cache)
    assert done.returncode == 0, done.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "train" / "best.pt", weights_only=True)
    assert checkpoint["model"]["name"] == "torchvision" and checkpoint["model"]["arch"] == "resnet18"
    assert next(iter(checkpoint["state_dict"])).startswith("network.")
    done = run_cli("ask-attack", [*common, f"model.checkpoint={tmp_path / 'train' / 'best.pt'}", "attack=[pgd]",
                                  "eval.victims=[dnn]", "hydra.run.dir=attack"], tmp_path, shared_cache)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "train" / "train_summary.json").read_text())
    assert _rows(tmp_path / "attack")[("pgd", "dnn")]["clean_acc"] == pytest.approx(summary["test_acc"], abs=1e-6)
