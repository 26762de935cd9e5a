"""SmallCNN: the CPU workhorse, a plain Conv-BN-ReLU network with three resolution stages.

Layout for a ``width`` w (sizes for a 32-pixel input):

=========  ==============================================  ============
layer      what                                            output
=========  ==============================================  ============
block1     conv3x3(C -> w)                                 w × 32 × 32
block2     maxpool /2, conv3x3(w -> 2w), conv3x3(2w -> 2w)  2w × 16 × 16
block3     maxpool /2, conv3x3(2w -> 4w), conv3x3(4w -> 4w) 4w × 8 × 8
pool       global average pool                             4w
logits     linear(4w -> num_classes)                       num_classes
=========  ==============================================  ============

Every conv is followed by batch norm and ReLU. Only one conv runs at full resolution because that
is where a CPU spends its time; the two deeper stages carry the capacity. ``scripts/bench_smallcnn.py``
measures the training throughput for a few widths.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ask.models.base import LOGITS, FeatureModel, GlobalAvgPool, check_positive_int, init_weights

__all__ = ["SmallCNN", "conv_bn_relu"]


def conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    """3×3 convolution (no bias: batch norm follows), batch norm, ReLU."""
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


class SmallCNN(FeatureModel):
    """Three-stage Conv-BN-ReLU classifier; layers ``block1``, ``block2``, ``block3``, ``pool``.

    Args:
        num_classes: number of output classes.
        in_channels: image channels.
        image_size: image side (at least 8; the two max-pools leave at least 2×2).
        mean, std: per-channel normalisation applied inside the model.
        width: channels of ``block1``; ``block2`` has twice, ``block3`` four times as many.
        normalize: False feeds [0, 1] pixels to the first layer unchanged; None (default) = True.
    """

    name = "smallcnn"

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        width: int = 64,
        normalize: bool | None = None,
    ) -> None:
        super().__init__(num_classes, in_channels, image_size, mean, std, normalize)
        check_positive_int(width, "model.width")
        w1, w2, w3 = width, 2 * width, 4 * width
        self._set_stages(
            [
                ("block1", nn.Sequential(*conv_bn_relu(in_channels, w1))),
                (
                    "block2",
                    nn.Sequential(nn.MaxPool2d(2), *conv_bn_relu(w1, w2), *conv_bn_relu(w2, w2)),
                ),
                (
                    "block3",
                    nn.Sequential(nn.MaxPool2d(2), *conv_bn_relu(w2, w3), *conv_bn_relu(w3, w3)),
                ),
                ("pool", GlobalAvgPool()),
                (LOGITS, nn.Linear(w3, num_classes)),
            ]
        )
        init_weights(self)
