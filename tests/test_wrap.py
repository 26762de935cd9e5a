"""``ask.wrap``: any classifier nn.Module as ask's model (ask/models/wrapped.py)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import ask
from ask.attacks import ThreatModel, build_attack
from ask.errors import ConfigError, ModelError
from ask.knn import KNNClassifier, ReferenceStore
from tests.conftest import REPO

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def _resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10)


def test_the_readme_snippet_runs() -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## From Python, on your own network", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
    assert len(code.strip().splitlines()) <= 15
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.fullmatch(r"kNN accuracy clean [\d.]+ under ASK-Atk [\d.]+\n", done.stdout), done.stdout


def test_layers_and_logits_are_the_networks_own_outputs() -> None:
    net = _resnet().eval()
    model = ask.wrap(net, layers=["layer3", "layer1.0"], image_size=32, mean=MEAN, std=STD).eval()
    seen = {}
    net.layer3.register_forward_hook(lambda m, i, o: seen.__setitem__("layer3", o))
    net.layer1[0].register_forward_hook(lambda m, i, o: seen.__setitem__("layer1.0", o))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        feats = model.forward_features(x, ["layer3", "layer1.0"], with_logits=True)
        # After the wrapper's first call: tracing runs the hooks too, on symbolic values.
        logits = net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    assert torch.allclose(feats["layer3"], seen["layer3"], atol=1e-6)
    assert torch.allclose(feats["layer1.0"], seen["layer1.0"], atol=1e-6)
    assert torch.allclose(feats["logits"], logits, atol=1e-5) and torch.allclose(model(x), logits, atol=1e-5)
    assert model.num_classes == 10 and model.name == "ResNet"
    assert model.layer_names[:5] == ("conv1", "bn1", "relu", "maxpool", "layer1")


def test_the_extractors_share_the_networks_weights_and_mode() -> None:
    net = _resnet()
    model = ask.wrap(net, image_size=32, mean=MEAN, std=STD)
    before = net.bn1.running_mean.clone()
    model.train()
    model.forward_features(torch.rand(4, 3, 32, 32), ["layer1"])  # train mode: batch-norm statistics move
    assert not torch.equal(net.bn1.running_mean, before)
    after = net.bn1.running_mean.clone()
    model.eval()
    model.forward_features(torch.rand(4, 3, 32, 32), ["layer1"])
    assert torch.equal(net.bn1.running_mean, after)
    assert list(model.state_dict()) == ["network." + key for key in net.state_dict()]  # one set of weights


def test_ask_atk_moves_the_wrapped_networks_features_within_the_ball() -> None:
    model = ask.wrap(_resnet().eval(), image_size=32, mean=MEAN, std=STD)
    pool_x, pool_y = torch.rand(60, 3, 32, 32), torch.arange(60) % 10
    store = ReferenceStore.build(model, pool_x, pool_y, ["layer2"], "cosine", num_classes=10, progress=False)
    x, y = torch.rand(6, 3, 32, 32), torch.arange(6)
    threat = ThreatModel(eps=4 / 255, steps=5, step_size=1 / 255, random_start=False)
    attack = build_attack("ask", model, threat, store=store, layers=["layer2"])
    x_adv = attack(x, y)
    assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6 and (x_adv - x).abs().max() > 3 / 255
    # The class-wise ASK loss at the network's own layer2, written out: it rose for every point,
    # far more than under random signs of the same size.
    refs = attack.references(x)[0]["layer2"]

    def ask_loss(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            feats = model.forward_features(images, ["layer2"])["layer2"].flatten(1)
        similarity = F.cosine_similarity(feats[:, None, None, :], refs, dim=-1).mean(dim=2)
        return F.cross_entropy(similarity / attack.temperature, y, reduction="none")

    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    clean = ask_loss(x)
    gain, noise_gain = ask_loss(x_adv) - clean, ask_loss((x + signs * 4 / 255).clamp(0, 1)) - clean
    assert bool((gain > 0).all()) and float(gain.mean()) > 5 * float(noise_gain.abs().mean())
    knn = KNNClassifier(model, store, "layer2", k=3)
    assert knn.predict(x_adv).shape == (6,)


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fc(x.flatten(1))
        return out, out


class _TimmLike(nn.Module):
    """Has timm's forward_features(x), which is not ask's forward_features(x, layers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 10)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean((2, 3)))


def test_bad_models_and_settings_are_refused_in_one_line() -> None:
    with pytest.raises(ModelError, match=r"has no layer 'layer9'; its module paths include: conv1, bn1, relu, maxpool, layer1, layer1\.0"):
        ask.wrap(_resnet(), layers=["layer9"], image_size=32)
    with pytest.raises(ConfigError, match="mean has 2 values but the images have 3 channels"):
        ask.wrap(_resnet(), image_size=32, mean=[0.5, 0.5], std=[0.2, 0.2])
    with pytest.raises(ModelError, match="forward returned tuple, not a tensor of logits"):
        ask.wrap(_TupleOut(), image_size=8)
    with pytest.raises(ModelError, match="returns 10 logits but num_classes=100"):
        ask.wrap(_resnet(), image_size=32, num_classes=100)
    with pytest.raises(ModelError, match="give ask.wrap both mean and std"):
        ask.wrap(_resnet(), image_size=32, mean=MEAN)
    timm_like = _TimmLike()
    with pytest.raises(ModelError, match=r"_TimmLike is a plain module: wrap it first, model = ask\.wrap"):
        ReferenceStore.build(timm_like, torch.rand(20, 3, 8, 8), torch.arange(20) % 10, ["conv"], "cosine",
                             num_classes=10, progress=False)
    wrapped = ask.wrap(timm_like, layers=["conv"], image_size=8)  # the wrapper never calls its forward_features
    assert wrapped.forward_features(torch.rand(2, 3, 8, 8), ["conv"])["conv"].shape == (2, 4, 6, 6)


def test_import_ask_stays_free_of_torch() -> None:
    done = subprocess.run([sys.executable, "-c", "import sys, ask; print('torch' in sys.modules, callable(ask.wrap))"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr
