"""ResNet18 with named stages ``stem``, ``layer1`` .. ``layer4``, ``pool``.

Images up to 64 pixels get the CIFAR stem (3×3 stride-1 convolution, no max-pool), so a 32-pixel
image reaches ``layer4`` at 4×4; larger images get the ImageNet stem (7×7 stride-2 convolution and
a 3×3 stride-2 max-pool), so a 128-pixel Imagenette image also reaches ``layer4`` at 4×4.
``pool`` is a global average pool (flattened) and ``logits`` one linear layer. Channels are
``width``, 2, 4 and 8 times ``width`` (64 = the standard network).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from ask.models.base import LOGITS, FeatureModel, GlobalAvgPool, check_positive_int, init_weights

__all__ = ["ResNet18", "CIFAR_STEM_MAX_SIZE"]

logger = logging.getLogger(__name__)

#: Largest image side that still gets the CIFAR (stride-1, no max-pool) stem.
CIFAR_STEM_MAX_SIZE = 64
STANDARD_WIDTH = 64


def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    # Imported here: importing torchvision costs every process about 3.5 s, and only a ResNet
    # needs it (ask.models is imported by every console script, whatever the model).
    from torchvision.models.resnet import BasicBlock

    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(
            nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes),
        )
    layers = [BasicBlock(in_planes, planes, stride=stride, downsample=downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet18(FeatureModel):
    """ResNet18; layers ``stem``, ``layer1`` .. ``layer4``, ``pool``.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        image_size: image side, at least 8; above 64 the ImageNet stem is used.
        mean, std: per-channel normalisation applied inside the model.
        width: channels of the stem and ``layer1`` (64 = standard ResNet18).
        normalize: False feeds [0, 1] pixels to the first layer unchanged; None (default) = True.
    """

    name = "resnet18"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: int = STANDARD_WIDTH,
        normalize: bool | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, mean, std, normalize)
        check_positive_int(width, "model.width")
        if width != STANDARD_WIDTH:
            logger.info("resnet18 built with width %d (standard: %d)", width, STANDARD_WIDTH)
        self.imagenet_stem = image_size > CIFAR_STEM_MAX_SIZE
        if self.imagenet_stem:
            stem = nn.Sequential(
                nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        else:
            stem = nn.Sequential(
                nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            )
        w = width
        self._set_stages(
            [
                ("stem", stem),
                ("layer1", _make_layer(w, w, 2, stride=1)),
                ("layer2", _make_layer(w, 2 * w, 2, stride=2)),
                ("layer3", _make_layer(2 * w, 4 * w, 2, stride=2)),
                ("layer4", _make_layer(4 * w, 8 * w, 2, stride=2)),
                ("pool", GlobalAvgPool()),
                (LOGITS, nn.Linear(8 * w, num_classes)),
            ]
        )
        init_weights(self)
