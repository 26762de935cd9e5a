"""Tensor image operations: scaling to [0, 1], batched augmentation and resizing."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ask.errors import ConfigError

AUGMENT_MODES = ("none", "crop", "crop_flip")


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """``uint8`` images to ``float32`` in ``[0, 1]`` on the same device.

    Floating-point input is assumed to be in ``[0, 1]`` already and is returned as ``float32``.
    """
    if images_uint8.is_floating_point():
        return images_uint8.float()
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 or float images, got {images_uint8.dtype}")
    return images_uint8.float().div_(255.0)


def augment_batch(images: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Randomly crop (and flip) a float batch ``N x C x H x W`` on any device.

    ``crop`` pads each side by ``max(1, H // 8)`` pixels with reflection and takes a random
    ``H x W`` window per image (4 pixels on CIFAR-10, the usual setting); ``crop_flip`` also
    mirrors each image horizontally with probability 0.5; ``none`` returns ``images`` unchanged.
    Random numbers come from ``generator`` (on its own device) or, when it is None, from torch's
    global CPU generator, then move to the images' device, so a seed gives the same result on CPU
    and GPU.
    """
    if mode not in AUGMENT_MODES:
        raise ConfigError(f"dataset.augment={mode!r} is not one of {', '.join(AUGMENT_MODES)}")
    if mode == "none" or images.numel() == 0:
        return images
    if images.dim() != 4:
        raise ValueError(f"augment_batch expects N x C x H x W, got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    device = images.device
    rng_device = generator.device if generator is not None else torch.device("cpu")

    pad = max(1, h // 8)
    # Reflection needs a pad smaller than the side; tiny images fall back to edge replication.
    pad_mode = "reflect" if pad < min(h, w) else "replicate"
    padded = F.pad(images, (pad, pad, pad, pad), mode=pad_mode)
    offsets = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=rng_device)
    offsets = offsets.to(device)
    rows = offsets[0, :, None] + torch.arange(h, device=device)  # N x H
    cols = offsets[1, :, None] + torch.arange(w, device=device)  # N x W
    out = padded[
        torch.arange(n, device=device)[:, None, None, None],
        torch.arange(c, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    if mode == "crop_flip":
        flip = torch.rand(n, generator=generator, device=rng_device).to(device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize a ``uint8`` batch ``N x C x H x W`` to ``size x size`` (bilinear, antialiased)."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.empty((images.shape[0], images.shape[1], size, size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].float()
        part = F.interpolate(part, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out
