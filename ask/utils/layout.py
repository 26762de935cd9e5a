"""Memory layout of activations, for the autograd functions that hand gradients back in it."""

from __future__ import annotations

import torch


def is_channels_last(x: torch.Tensor) -> bool:
    """``x`` is a 4-d tensor laid out channels-last and not also contiguous.

    A tensor with 1x1 positions (or one channel) is both layouts at once; it counts as contiguous,
    so nothing is copied for it.
    """
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
