"""VGG16 with batch norm, CIFAR variant (as in the ASK authors' code).

Configuration ``[64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M]``
(channels scaled by ``width / 64``; 64 is the standard network). Each ``M`` closes a block, so
``block1`` .. ``block5`` are the outputs after each max-pool: on a 32-pixel image ``block4`` is
512×2×2 (the layer the paper attacks) and ``block5`` 512×1×1. ``pool`` is an adaptive average
pool to 1×1, flattened, and ``logits`` a single linear layer.

Larger images keep the same layers (the adaptive pool absorbs the extra resolution). On images
smaller than 32 pixels, a max-pool that would shrink the map below 1×1 is skipped, so e.g. 8×8
digits still build: their blocks 4 and 5 stay at 1×1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from ask.errors import ConfigError
from ask.models.base import LOGITS, FeatureModel, init_weights
from ask.models.smallcnn import conv_bn_relu

__all__ = ["VGG16", "VGG16_CFG"]

logger = logging.getLogger(__name__)

#: Channels per conv, "M" for a max-pool that ends a block.
VGG16_CFG: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]  # fmt: skip

STANDARD_WIDTH = 64


class VGG16(FeatureModel):
    """VGG16-BN; layers ``block1`` .. ``block5`` (after each max-pool) and ``pool``.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        image_size: image side, at least 8.
        mean, std: per-channel normalisation applied inside the model.
        width: channels of the first block (64 = standard VGG16); every layer scales with it.
    """

    name = "vgg16"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: int = STANDARD_WIDTH,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, mean, std)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ConfigError(f"model.width={width!r} must be a positive integer")
        if width != STANDARD_WIDTH:
            logger.info("vgg16 built with width %d (standard: %d)", width, STANDARD_WIDTH)

        stages = []
        layers: list[nn.Module] = []
        channels, side = in_channels, image_size
        for item in VGG16_CFG:
            if item == "M":
                # Skip a pool that would leave less than 1×1 (small inputs such as 8×8 digits).
                if side // 2 >= 1:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    side //= 2
                stages.append((f"block{len(stages) + 1}", nn.Sequential(*layers)))
                layers = []
            else:
                out = max(1, int(item) * width // STANDARD_WIDTH)
                layers.extend(conv_bn_relu(channels, out))
                channels = out
        stages.append(("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))))
        stages.append((LOGITS, nn.Linear(channels, num_classes)))
        self._set_stages(stages)
        init_weights(self)
