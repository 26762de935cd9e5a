"""Backbones with named hidden layers: ``smallcnn``, ``vgg16``, ``vgg16_authors`` and ``resnet18``.

>>> model = build_model("vgg16", num_classes=10, in_channels=3, image_size=32,
...                     mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])
>>> feats = model.forward_features(images, ["block4"], with_logits=True)
>>> feats["block4"].shape, feats["logits"].shape      # (N, 512, 2, 2), (N, 10)
"""

from __future__ import annotations

from collections.abc import Sequence

from ask.errors import ModelError
from ask.models.base import LOGITS, FeatureModel, init_weights
from ask.models.resnet import ResNet18
from ask.models.smallcnn import SmallCNN
from ask.models.vgg import VGG16, VGG16Authors

__all__ = [
    "LOGITS",
    "FeatureModel",
    "ResNet18",
    "SmallCNN",
    "VGG16",
    "VGG16Authors",
    "available_models",
    "build_model",
    "init_weights",
]

_REGISTRY: dict[str, type[FeatureModel]] = {
    cls.name: cls for cls in (SmallCNN, VGG16, VGG16Authors, ResNet18)
}


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted."""
    return sorted(_REGISTRY)


def build_model(
    name: str,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    width: int = 64,
    normalize: bool | None = None,
) -> FeatureModel:
    """Build an untrained backbone by name.

    Args:
        name: one of :func:`available_models` (case-insensitive).
        num_classes: number of output classes.
        in_channels: image channels (1 for greyscale).
        image_size: image side in pixels, at least 8.
        mean, std: per-channel normalisation, applied inside the model to [0, 1] inputs.
        width: base channel count; for ``vgg16``, ``vgg16_authors`` and ``resnet18`` 64 is the
            standard network.
        normalize: whether ``mean`` and ``std`` are applied; None = the architecture's default
            (True for all but ``vgg16_authors``, which sees [0, 1] pixels as the authors' does).

    Returns:
        The model in training mode on the CPU, Kaiming-initialised (``vgg16_authors``: PyTorch's
        default initialisation, as the authors'). ``model.config`` holds the
        keyword arguments that rebuild it (for checkpoints).

    Raises:
        ModelError: unknown ``name``.
        ConfigError: a size, channel count or normalisation statistic is out of range.
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise ModelError(f"unknown model '{name}'; choose one of: {', '.join(available_models())}")
    model = _REGISTRY[key](
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=mean,
        std=std,
        width=width,
        normalize=normalize,
    )
    model.config = {
        "name": key,
        "num_classes": int(num_classes),
        "in_channels": int(in_channels),
        "image_size": int(image_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "width": int(width),
        "normalize": model.input_normalized,
    }
    return model
