"""Backbones: shapes, named layers, early stopping, normalisation inside, gradients, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ask.errors import ConfigError, ModelError
from ask.models import FeatureModel, available_models, build_model
from ask.models.base import GlobalAvgPool

NUM_CLASSES = 7

# (name, channels, image size): every model on greyscale 8 px and colour 32 px, and the two
# paper backbones at the larger sizes where resnet18 switches to the ImageNet stem.
CASES = [
    ("smallcnn", 1, 8),
    ("smallcnn", 3, 32),
    ("vgg16", 1, 8),
    ("vgg16", 3, 32),
    ("vgg16", 3, 64),
    ("vgg16_authors", 3, 32),
    ("vgg16_authors", 3, 64),
    ("resnet18", 1, 8),
    ("resnet18", 3, 32),
    ("resnet18", 3, 128),
]

EXPECTED_LAYERS = {
    "smallcnn": ("block1", "block2", "block3", "pool"),
    "vgg16": ("block1", "block2", "block3", "block4", "block5", "pool"),
    "vgg16_authors": ("block1", "block2", "block3", "block4", "block5"),
    "resnet18": ("stem", "layer1", "layer2", "layer3", "layer4", "pool"),
}

_CACHE: dict[tuple[str, int, int, int], FeatureModel] = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny; with two threads a busy machine spends its time in thread
    barriers (the digits training ran 10x slower under load), so one thread it is."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(name: str, channels: int, size: int, width: int = 64, mean=None, std=None) -> FeatureModel:
    """Build (once per configuration) a model in eval mode with a fixed seed."""
    key = (name, channels, size, width)
    if mean is not None or key not in _CACHE:
        torch.manual_seed(0)
        model = build_model(
            name,
            NUM_CLASSES,
            channels,
            size,
            mean if mean is not None else [0.4 + 0.05 * c for c in range(channels)],
            std if std is not None else [0.2 + 0.02 * c for c in range(channels)],
            width=width,
        ).eval()
        if mean is not None:
            return model
        _CACHE[key] = model
    return _CACHE[key]


def images(n: int, channels: int, size: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g)


def test_registry_lists_the_four_models() -> None:
    assert available_models() == ["resnet18", "smallcnn", "vgg16", "vgg16_authors"]


@pytest.mark.parametrize("name,channels,size", CASES)
def test_logits_shape_and_layer_names(name: str, channels: int, size: int) -> None:
    model = make(name, channels, size)
    assert model.layer_names == EXPECTED_LAYERS[name]
    assert model.num_classes == NUM_CLASSES
    x = images(3, channels, size)
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (3, NUM_CLASSES)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name,channels,size", CASES)
def test_forward_features_matches_forward_and_hooks(name: str, channels: int, size: int) -> None:
    """Every layer's output equals what the stage module produced inside plain forward()."""
    model = make(name, channels, size)
    x = images(2, channels, size)
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.stages[layer].register_forward_hook(
            lambda _m, _i, out, layer=layer: seen.__setitem__(layer, out.detach().clone())
        )
        for layer in model.layer_names
    ]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        feats = model.forward_features(x, model.layer_names, with_logits=True)
    assert set(feats) == set(model.layer_names) | {"logits"}
    assert torch.equal(feats["logits"], logits)
    for layer in model.layer_names:
        assert torch.equal(feats[layer], seen[layer]), layer
    if "pool" in feats:
        assert feats["pool"].dim() == 2


def test_forward_features_equal_in_train_mode() -> None:
    """Batch-norm in train mode uses batch statistics: both paths must still agree exactly."""
    model = build_model("smallcnn", NUM_CLASSES, 3, 16, [0.5] * 3, [0.25] * 3, width=8).train()
    x = images(4, 3, 16)
    with torch.no_grad():
        a = model(x)
        b = model.forward_features(x, ["block2"], with_logits=True)["logits"]
    assert torch.equal(a, b)


def test_vgg16_block_shapes_on_cifar() -> None:
    model = make("vgg16", 3, 32)
    with torch.no_grad():
        feats = model.forward_features(images(2, 3, 32), model.layer_names)
    shapes = {k: tuple(v.shape) for k, v in feats.items()}
    assert shapes == {
        "block1": (2, 64, 16, 16),
        "block2": (2, 128, 8, 8),
        "block3": (2, 256, 4, 4),
        "block4": (2, 512, 2, 2),
        "block5": (2, 512, 1, 1),
        "pool": (2, 512),
    }
    # 13 conv layers, as in VGG16.
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 13


def test_vgg16_small_images_skip_pools() -> None:
    shapes = make("vgg16", 1, 8).feature_shapes()
    assert shapes["block1"] == (64, 4, 4)
    assert shapes["block3"] == (256, 1, 1)
    assert shapes["block4"] == (512, 1, 1)
    assert shapes["block5"] == (512, 1, 1)
    # Odd sizes floor like MaxPool2d and still reach 1x1 (28 -> 14 -> 7 -> 3 -> 1 -> 1).
    m28 = build_model("vgg16", 3, 1, 28, [0.5], [0.5], width=8)
    assert [m28.feature_shapes()[f"block{i}"][1] for i in range(1, 6)] == [14, 7, 3, 1, 1]


def test_vgg16_large_image_and_width() -> None:
    shapes = make("vgg16", 3, 64).feature_shapes()
    assert shapes["block4"] == (512, 4, 4) and shapes["pool"] == (512,)
    narrow = build_model("vgg16", 10, 3, 32, [0.5] * 3, [0.5] * 3, width=16)
    assert narrow.feature_shapes()["block4"] == (128, 2, 2)


# The authors' VGG16 for 10 classes at 32 px, counted by hand: 13 convolutions with bias, a
# (weight, bias) pair per batch-norm channel, and the three linear layers of the classifier.
_CONVS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256),
          (256, 512), (512, 512), (512, 512), (512, 512), (512, 512), (512, 512)]
AUTHORS_VGG16_PARAMS = (
    sum(i * o * 9 + o for i, o in _CONVS)  # 14,714,688
    + sum(2 * o for _, o in _CONVS)  # 8,448
    + (512 * 512 + 512) * 2 + (512 * 10 + 10)  # 525,312 + 5,130
)


def test_vgg16_authors_is_the_authors_network() -> None:
    assert AUTHORS_VGG16_PARAMS == 15_253_578
    torch.manual_seed(0)
    model = build_model("vgg16_authors", 10, 3, 32, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]).eval()
    assert sum(p.numel() for p in model.parameters()) == AUTHORS_VGG16_PARAMS
    assert model.feature_shapes() == {
        "block1": (64, 16, 16),
        "block2": (128, 8, 8),
        "block3": (256, 4, 4),
        "block4": (512, 2, 2),
        "block5": (512, 1, 1),
        "logits": (10,),
    }
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == _CONVS
    assert all(c.bias is not None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    # Every block: [conv, batch norm, ReLU] repeated, closed by a 2x2 max-pool.
    for block, n_convs in zip(model.layer_names, (2, 2, 3, 3, 3), strict=True):
        kinds = [type(m) for m in model.stages[block]]
        assert kinds == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU] * n_convs + [torch.nn.MaxPool2d]
    classifier = model.stages["logits"]
    assert [type(m) for m in classifier] == [
        torch.nn.Flatten, torch.nn.Dropout, torch.nn.Linear, torch.nn.ReLU,
        torch.nn.Dropout, torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear,
    ]
    assert [m.p for m in classifier if isinstance(m, torch.nn.Dropout)] == [0.5, 0.5]
    linears = [(m.in_features, m.out_features) for m in classifier if isinstance(m, torch.nn.Linear)]
    assert linears == [(512, 512), (512, 512), (512, 10)]

    # No input normalisation although mean/std were given: the network sees the pixels themselves.
    assert not model.input_normalized and model.config["normalize"] is False
    x = images(3, 3, 32)
    with torch.no_grad():
        bare = x
        for name in ("block1", "block2", "block3", "block4", "block5", "logits"):
            bare = model.stages[name](bare)
        assert torch.equal(model(x), bare)
        assert torch.equal(model.forward_features(x, ["block1"])["block1"], model.stages["block1"](x))


def test_vgg16_authors_follows_classes_size_and_normalize() -> None:
    # The class count comes from the caller; the first linear layer from the image size (512 * (H/32)^2).
    big = build_model("vgg16_authors", 7, 3, 64, [0.5] * 3, [0.5] * 3, width=8)
    linears = [m for m in big.stages["logits"] if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64 * 2 * 2, 64), (64, 64), (64, 7)]
    assert big.feature_shapes()["block4"] == (64, 4, 4)
    # normalize=True puts the statistics inside, like the other models.
    torch.manual_seed(0)
    inside = build_model("vgg16_authors", 7, 3, 32, [0.3, 0.5, 0.7], [0.2, 0.3, 0.4], width=8,
                         normalize=True).eval()
    plain = build_model(**{**inside.config, "normalize": False}).eval()
    plain.load_state_dict(inside.state_dict())
    m, s = torch.tensor([0.3, 0.5, 0.7]).view(1, 3, 1, 1), torch.tensor([0.2, 0.3, 0.4]).view(1, 3, 1, 1)
    x = images(2, 3, 32)
    with torch.no_grad():
        torch.testing.assert_close(inside(x), plain((x - m) / s), rtol=1e-5, atol=1e-5)
    # The other models keep normalising unless told not to.
    assert make("vgg16", 3, 32).input_normalized
    assert not build_model("vgg16", 3, 3, 32, [0.5] * 3, [0.5] * 3, width=4, normalize=False).input_normalized
    with pytest.raises(ConfigError, match="image_size=16 is too small for model 'vgg16_authors'"):
        build_model("vgg16_authors", 10, 3, 16, [0.5] * 3, [0.5] * 3)


def test_resnet18_stems() -> None:
    cifar = make("resnet18", 3, 32).feature_shapes()
    assert cifar["stem"] == (64, 32, 32)
    assert cifar["layer4"] == (512, 4, 4)
    imagenet = make("resnet18", 3, 128).feature_shapes()
    assert imagenet["stem"] == (64, 32, 32)  # 7x7 stride 2 then max-pool stride 2
    assert imagenet["layer2"] == (128, 16, 16)
    assert imagenet["layer4"] == (512, 4, 4)
    assert make("resnet18", 3, 128).imagenet_stem and not make("resnet18", 3, 32).imagenet_stem
    # The boundary: 64 px still gets the CIFAR stem.
    r64 = build_model("resnet18", 5, 3, 64, [0.5] * 3, [0.5] * 3, width=8)
    assert not r64.imagenet_stem and r64.feature_shapes()["layer4"] == (64, 8, 8)


def test_smallcnn_shapes_follow_width() -> None:
    model = build_model("smallcnn", NUM_CLASSES, 3, 32, [0.5] * 3, [0.25] * 3, width=12)
    assert model.feature_shapes() == {
        "block1": (12, 32, 32),
        "block2": (24, 16, 16),
        "block3": (48, 8, 8),
        "pool": (48,),
        "logits": (NUM_CLASSES,),
    }


@pytest.mark.parametrize("name", ["smallcnn", "vgg16", "vgg16_authors", "resnet18"])
def test_forward_features_stops_early(name: str) -> None:
    model = make(name, 3, 32)
    first = model.layer_names[0]
    fired = []
    later = list(model.layer_names[1:]) + ["logits"]
    handles = [
        model.stages[layer].register_forward_hook(lambda *_a, layer=layer: fired.append(layer))
        for layer in later
    ]
    try:
        with torch.no_grad():
            feats = model.forward_features(images(2, 3, 32), [first])
        assert list(feats) == [first]
        assert fired == []
        with torch.no_grad():
            model.forward_features(images(2, 3, 32), [model.layer_names[2]])
        assert fired == [model.layer_names[1], model.layer_names[2]]
        fired.clear()
        with torch.no_grad():
            feats = model.forward_features(images(2, 3, 32), [first], with_logits=True)
        assert fired == later  # each later stage runs exactly once
        assert set(feats) == {first, "logits"}
    finally:
        for h in handles:
            h.remove()


def test_forward_features_accepts_logits_and_single_string() -> None:
    model = make("smallcnn", 3, 32)
    x = images(2, 3, 32)
    with torch.no_grad():
        a = model.forward_features(x, ["logits"])
        b = model.forward_features(x, "block2")
        ref = model(x)
    assert list(a) == ["logits"] and torch.equal(a["logits"], ref)
    assert list(b) == ["block2"]
    assert model.forward_features(x, []) == {}


def test_unknown_layer_lists_the_layers() -> None:
    model = make("vgg16", 3, 32)
    with pytest.raises(ModelError) as err:
        model.check_layers(["block4", "block9"])
    msg = str(err.value)
    assert "model 'vgg16' has no layer 'block9'" in msg
    assert "block1, block2, block3, block4, block5, pool, logits" in msg
    assert "\n" not in msg
    with pytest.raises(ModelError, match="block9"):
        model.forward_features(images(1, 3, 32), ["block9"])
    model.check_layers(["block4", "logits"])  # valid names pass silently


def test_unknown_model_lists_the_models() -> None:
    with pytest.raises(ModelError) as err:
        build_model("vgg19", 10, 3, 32, [0.5] * 3, [0.5] * 3)
    assert "vgg19" in str(err.value)
    for name in available_models():
        assert name in str(err.value)
    # Names are case-insensitive.
    assert build_model("SmallCNN", 3, 1, 8, [0.5], [0.5], width=4).name == "smallcnn"


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mean": [0.5, 0.5]}, "mean has 2 values"),
        ({"std": [0.5, 0.0, 0.5]}, "std"),
        ({"image_size": 7}, "image_size=7"),
        ({"num_classes": 0}, "num_classes"),
        ({"in_channels": 0, "mean": [], "std": []}, "in_channels"),
        ({"width": 0}, "width"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, match: str) -> None:
    args = dict(
        name="smallcnn", num_classes=3, in_channels=3, image_size=16, mean=[0.5] * 3, std=[0.5] * 3, width=4
    )
    args.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        build_model(**args)


def test_wrong_channel_count_is_a_model_error() -> None:
    model = make("smallcnn", 3, 32)
    with pytest.raises(ModelError, match="N×3×H×W"):
        model(images(1, 1, 32))


@pytest.mark.parametrize("name", ["smallcnn", "vgg16", "resnet18"])
def test_normalisation_is_inside_and_not_in_state_dict(name: str) -> None:
    mean, std = [0.3, 0.5, 0.7], [0.2, 0.3, 0.4]
    model = make(name, 3, 32, width=8, mean=mean, std=std)
    keys = model.state_dict().keys()
    assert "mean" not in keys and "std" not in keys
    assert all(not k.endswith(("mean", "std")) or "running" in k for k in keys)

    # Same weights with identity normalisation, fed pre-normalised images: same logits.
    plain = make(name, 3, 32, width=8, mean=[0.0] * 3, std=[1.0] * 3)
    plain.load_state_dict(model.state_dict())
    x = images(2, 3, 32)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain((x - m) / s), rtol=1e-5, atol=1e-5)
        before = model(x)
        model.mean.add_(0.1)
        after = model(x)
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("name", ["smallcnn", "vgg16", "vgg16_authors", "resnet18"])
def test_input_gradients_flow_through_forward_features(name: str) -> None:
    model = make(name, 3, 32)
    x = images(2, 3, 32).requires_grad_(True)
    layer = model.layer_names[1]
    model.forward_features(x, [layer])[layer].square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    # Each image's gradient depends on that image only (eval mode: no batch coupling).
    assert (x.grad[0].abs().sum() > 0) and (x.grad[1].abs().sum() > 0)

    # Logits through forward_features give the same input gradient as forward().
    x1 = images(2, 3, 32).requires_grad_(True)
    model.forward_features(x1, [model.layer_names[0]], with_logits=True)["logits"][:, 2].sum().backward()
    x2 = images(2, 3, 32).requires_grad_(True)
    model(x2)[:, 2].sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


def test_input_gradient_matches_finite_differences() -> None:
    """Direction derivative of a block2 feature vs a central difference, in float64."""
    torch.manual_seed(0)
    model = build_model("smallcnn", 3, 1, 8, [0.45], [0.3], width=4).double().eval()
    x = images(1, 1, 8).double().requires_grad_(True)
    v = torch.randn_like(x)
    f = lambda z: model.forward_features(z, ["block2"])["block2"].pow(2).sum()  # noqa: E731
    (g,) = torch.autograd.grad(f(x), x)
    h = 1e-6
    with torch.no_grad():
        numeric = (f(x + h * v) - f(x - h * v)) / (2 * h)
    assert math.isclose(float((g * v).sum()), float(numeric), rel_tol=1e-5)


@pytest.mark.parametrize("name", ["smallcnn", "vgg16", "vgg16_authors", "resnet18"])
def test_every_parameter_gets_a_gradient(name: str) -> None:
    size = 32 if name == "vgg16_authors" else 16  # its five max-pools need 32 px
    torch.manual_seed(0)  # dropout in the authors' classifier
    model = build_model(name, NUM_CLASSES, 3, size, [0.5] * 3, [0.25] * 3, width=4).train()
    loss = F.cross_entropy(model(images(4, 3, size)), torch.arange(4) % NUM_CLASSES)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_kaiming_init() -> None:
    model = make("vgg16", 3, 32)
    conv = model.stages["block2"][0]  # first conv of block2: 64 -> 128, 3x3
    assert isinstance(conv, torch.nn.Conv2d)
    expected = math.sqrt(2.0 / (conv.out_channels * 9))  # fan-out mode, ReLU gain
    assert abs(conv.weight.std().item() / expected - 1) < 0.05
    bn = model.stages["block2"][1]
    assert torch.equal(bn.weight, torch.ones_like(bn.weight))
    assert torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_config_rebuilds_the_same_model() -> None:
    model = build_model("resnet18", 4, 3, 96, [0.4, 0.5, 0.6], [0.2, 0.2, 0.2], width=8)
    twin = build_model(**model.config)
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in twin.state_dict().items()
    }
    twin.load_state_dict(model.state_dict())
    model.eval(), twin.eval()
    x = images(2, 3, 96)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def test_feature_shapes_keeps_training_mode() -> None:
    model = build_model("smallcnn", 3, 3, 16, [0.5] * 3, [0.25] * 3, width=4).train()
    model.feature_shapes()
    assert model.training


def test_channels_last_gives_same_features() -> None:
    model = build_model("smallcnn", NUM_CLASSES, 3, 32, [0.5] * 3, [0.25] * 3, width=8).eval()
    x = images(2, 3, 32)
    with torch.no_grad():
        ref = model.forward_features(x, ["block2"], with_logits=True)
        cl = model.to(memory_format=torch.channels_last)
        out = cl.forward_features(
            x.contiguous(memory_format=torch.channels_last), ["block2"], with_logits=True
        )
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)


def test_smallcnn_learns_digits() -> None:
    """sklearn digits (8x8, fixed stratified 70/30 split): >= 95 % test accuracy in seconds."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, digits.target, test_size=0.3, stratify=digits.target, random_state=0
    )
    x_tr, x_te = torch.from_numpy(x_tr)[:, None], torch.from_numpy(x_te)[:, None]
    y_tr, y_te = torch.from_numpy(y_tr), torch.from_numpy(y_te)
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 1, 8, [x_tr.mean().item()], [x_tr.std().item()], width=16)
    epochs, batch, lr = 5, 64, 0.05
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * math.ceil(len(x_tr) / batch), pct_start=0.25
    )
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        block3 = model.forward_features(x_te, ["block3"])["block3"]
    assert acc >= 0.95, acc
    assert block3.shape == (len(x_te), 64, 2, 2)


# Modules whose CUDA backward has no deterministic kernel: under deterministic=true the first
# gradient through one of them raises (torch.use_deterministic_algorithms lists them).
NO_DETERMINISTIC_CUDA_BACKWARD = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.AvgPool3d,
                                  nn.FractionalMaxPool2d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.Upsample)


@pytest.mark.parametrize("name", ["smallcnn", "vgg16", "vgg16_authors", "resnet18"])
def test_no_module_lacks_a_deterministic_cuda_backward(name: str) -> None:
    model = make(name, 3, 32)
    offending = [type(m).__name__ for m in model.modules() if isinstance(m, NO_DETERMINISTIC_CUDA_BACKWARD)]
    assert offending == []


def test_global_average_pool_is_adaptive_average_pooling_bit_for_bit() -> None:
    torch.manual_seed(0)
    for shape in [(8, 64, 2, 2), (4, 128, 4, 4), (2, 32, 7, 7), (3, 16, 1, 1)]:
        x = torch.randn(shape, requires_grad=True)
        pooled = GlobalAvgPool()(x)
        (grad,) = torch.autograd.grad(pooled.square().sum(), x)
        expected = nn.AdaptiveAvgPool2d(1)(x).flatten(1)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
        assert pooled.shape == (shape[0], shape[1])
        assert torch.equal(pooled, expected) and torch.equal(grad, expected_grad)


def test_global_average_pool_hands_the_gradient_back_in_the_input_layout() -> None:
    # Autograd's mean returns its gradient in the default layout whatever the input's; the pool
    # must return the same values laid out as its input, so the backward pass stays channels-last.
    torch.manual_seed(0)
    x = torch.randn(4, 16, 5, 5)
    weights = torch.randn(4, 16)
    for layout in (torch.channels_last, torch.contiguous_format):
        leaf = x.contiguous(memory_format=layout).requires_grad_(True)
        (grad,) = torch.autograd.grad((GlobalAvgPool()(leaf) * weights).sum(), leaf)
        (plain,) = torch.autograd.grad((leaf.mean(dim=(2, 3)) * weights).sum(), leaf)
        assert plain.is_contiguous()  # what the pool replaces, channels-last input or not
        assert grad.is_contiguous(memory_format=layout) and torch.equal(grad, plain)


def test_global_average_pool_is_twice_differentiable() -> None:
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: GlobalAvgPool()(t).square(), (x,))
    assert torch.autograd.gradgradcheck(lambda t: GlobalAvgPool()(t).square(), (x,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["smallcnn", "vgg16", "vgg16_authors", "resnet18"])
def test_deterministic_cuda_backward_runs_and_repeats_exactly(name: str) -> None:
    model = make(name, 3, 32).cuda().train()
    x = torch.rand(8, 3, 32, 32, device="cuda")
    try:
        torch.use_deterministic_algorithms(True)
        grads = []
        for _ in range(2):
            torch.manual_seed(0)  # the same dropout masks (vgg16_authors) both times
            images = x.clone().requires_grad_(True)
            loss = F.cross_entropy(model(images), torch.arange(8, device="cuda") % NUM_CLASSES)
            grads.append(torch.autograd.grad(loss, images)[0])
    finally:
        torch.use_deterministic_algorithms(False)
        model.cpu().eval()
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
