"""VGG16 with batch norm, CIFAR variant: ``vgg16`` (ours) and ``vgg16_authors`` (the ASK authors').

Configuration ``[64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M]``
(channels scaled by ``width / 64``; 64 is the standard network). Each ``M`` closes a block, so
``block1`` .. ``block5`` are the outputs after each max-pool: on a 32-pixel image ``block4`` is
512×2×2 (the layer the paper attacks) and ``block5`` 512×1×1. ``pool`` is an adaptive average
pool to 1×1, flattened, and ``logits`` a single linear layer.

Larger images keep the same layers (the adaptive pool absorbs the extra resolution). On images
smaller than 32 pixels, a max-pool that would shrink the map below 1×1 is skipped, so e.g. 8×8
digits still build: their blocks 4 and 5 stay at 1×1.

``vgg16_authors`` (:class:`VGG16Authors`) is the network of the authors' ``models/vgg.py``: the
same blocks, but convolutions with a bias, a three-layer classifier with dropout instead of
``pool`` + one linear layer, PyTorch's default initialisation, and no input normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from ask.errors import ConfigError
from ask.models.base import LOGITS, FeatureModel, GlobalAvgPool, check_positive_int, init_weights
from ask.models.smallcnn import conv_bn_relu

__all__ = ["VGG16", "VGG16Authors", "VGG16_CFG"]

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
        normalize: False feeds [0, 1] pixels to the first layer unchanged; None (default) = True.
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
        normalize: bool | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, mean, std, normalize)
        check_positive_int(width, "model.width")
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
        stages.append(("pool", GlobalAvgPool()))
        stages.append((LOGITS, nn.Linear(channels, num_classes)))
        self._set_stages(stages)
        init_weights(self)


class VGG16Authors(FeatureModel):
    """The ASK authors' CIFAR-10 VGG16; layers ``block1`` .. ``block5`` (after each max-pool).

    Five blocks of [conv3x3 with bias, batch norm, ReLU] with 64,64 | 128,128 | 256×3 | 512×3 |
    512×3 channels, each closed by a 2×2 max-pool (``block4`` is 512×2×2 on 32-pixel images, the
    authors' "layer index 3"); ``logits`` is their classifier: Flatten, Dropout(0.5),
    Linear(512·s², 512), ReLU, Dropout(0.5), Linear(512, 512), ReLU, Linear(512, num_classes), with
    s = image_size // 32 (the side of ``block5``). The weights keep PyTorch's default
    initialisation, as theirs do, and the network sees [0, 1] pixels: ``mean`` and ``std`` are
    only applied when built with ``normalize=True``.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        image_size: image side, at least 32 (five 2×2 max-pools; smaller images need ``vgg16``).
        mean, std: per-channel statistics, used only with ``normalize=True``.
        width: channels of the first block (64 = the authors' network); every conv layer and the
            classifier's hidden width (8 × width = 512) scale with it.
        normalize: True puts ``(x - mean) / std`` inside; None (default) = False, as the authors.
    """

    name = "vgg16_authors"
    normalizes_by_default = False
    #: The smallest side five 2×2 max-pools reduce to 1×1.
    MIN_SIZE = 32

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
        if image_size < self.MIN_SIZE:
            raise ConfigError(
                f"image_size={image_size} is too small for model '{self.name}' (five 2x2 max-pools need "
                f"at least {self.MIN_SIZE} pixels); use model=vgg16 or set dataset.image_size"
            )
        stages = []
        layers: list[nn.Module] = []
        channels = in_channels
        for item in VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                stages.append((f"block{len(stages) + 1}", nn.Sequential(*layers)))
                layers = []
            else:
                out = max(1, int(item) * width // STANDARD_WIDTH)
                layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=True),
                           nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        side = image_size // 32  # each max-pool floors, so five of them floor image_size / 32
        hidden = channels
        stages.append((LOGITS, nn.Sequential(
            nn.Flatten(1),
            nn.Dropout(0.5),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )))
        self._set_stages(stages)
        # No init_weights: the authors' network starts from PyTorch's default initialisation.
