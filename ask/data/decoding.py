"""Image files decoded into RGB uint8 tensors: one file (:func:`decode_image`) or a whole list
with a thread pool (:func:`decode_split`), into memory or straight into a ``.npy`` file.

Resizing, centre crop and colour conversion (16-bit greyscale keeps its high byte) happen here;
the folder cache (:mod:`ask.data.folders`) stores what this module decodes, so a change to the
decoded pixels must bump its ``CACHE_VERSION``.
"""

from __future__ import annotations

import os
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ask.errors import DataError
from ask.utils.diskarrays import allocate_npy, open_mapped, pwrite_all

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["decode_image", "decode_split"]

_CHUNK = 256  # images per pool task: large enough to amortise scheduling, small for a smooth bar


def decode_image(path: str, size: int | None, short_side: int | None = None) -> torch.Tensor:
    """Decode one file to an RGB ``3 x H x W`` uint8 tensor.

    With ``size``, the shorter side is resized to ``short_side`` (default ``size``; bilinear,
    antialiased) and the centre ``size x size`` square is kept: ``short_side=256, size=224`` is
    the usual ImageNet evaluation recipe. Images already at ``size x size`` with no larger
    ``short_side`` are left untouched.
    """
    from PIL import Image

    side = size if short_side is None else max(short_side, size or 0)
    with Image.open(path) as img:
        if size is not None and img.format == "JPEG":
            # Lets libjpeg skip detail by DCT scaling; the result stays at least side x side.
            img.draft("RGB", (side, side))
        img = _to_rgb(img)
        if size is not None and (img.size != (size, size) or side != size):
            w, h = img.size
            if w <= h:
                new_w, new_h = side, int(side * h / w)
            else:
                new_w, new_h = int(side * w / h), side
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
            left = int(round((new_w - size) / 2.0))
            top = int(round((new_h - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


# Modes in which Pillow opens 16-bit greyscale files (PNG, TIFF: "I;16..."; PGM: "I", scaled to 0..65535).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_rgb(img: Image.Image) -> Image.Image:
    """An RGB copy of a Pillow image; 16-bit greyscale keeps its high byte.

    Pillow's own ``convert("RGB")`` clips 16-bit values at 255, so every pixel above 255/65535 of
    full scale came out white. The high byte (``value >> 8``) is what Pillow itself keeps of
    16-bit RGB PNGs, so both kinds of 16-bit file decode alike.
    """
    from PIL import Image

    if img.mode not in _SIXTEEN_BIT_MODES:
        return img.convert("RGB")
    values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    return Image.fromarray((values >> 8).astype(np.uint8)).convert("RGB")


def _decode_checked(path: str, size: int | None, short_side: int | None = None) -> torch.Tensor:
    try:
        image = decode_image(path, size, short_side)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"cannot decode image '{path}' ({type(exc).__name__}: {exc}); replace or remove the file"
        ) from exc
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise DataError(f"image '{path}' decoded to {image.dtype} {tuple(image.shape)}, not 3 x H x W")
    return image


def _workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    # PIL releases the GIL while decoding and resizing; a few extra threads hide file latency.
    return max(1, min(32, 2 * cpus))


def decode_split(
    paths: list[str], size: int | None, progress: bool, desc: str, out: Path | None = None,
    short_side: int | None = None,
) -> torch.Tensor:
    """Decode ``paths`` into one ``N x 3 x H x W`` uint8 tensor with a thread pool.

    Without ``size`` every image must have the size of the first one. With ``out``, each image
    is written into the ``.npy`` file ``out`` as soon as it is decoded (RAM holds one image per
    thread) and the result is a memory map of that file.
    """
    if not paths:
        return torch.empty((0, 3, size or 0, size or 0), dtype=torch.uint8)
    first = _decode_checked(paths[0], size, short_side)
    height, width = first.shape[1:]
    shape = (len(paths), 3, height, width)
    in_memory = torch.empty(shape, dtype=torch.uint8) if out is None else None
    fd, data_offset = -1, 0
    if out is not None:
        data_offset = allocate_npy(out, shape, np.uint8)
        fd = os.open(out, os.O_WRONLY)
    image_bytes = 3 * height * width

    def run_chunk(start: int, stop: int) -> int:
        for i in range(start, stop):
            image = first if i == 0 else _decode_checked(paths[i], size, short_side)
            if image.shape[1:] != (height, width):
                raise DataError(
                    f"image '{paths[i]}' is {image.shape[2]}x{image.shape[1]} but "
                    f"'{paths[0]}' is {width}x{height}; set dataset.image_size to resize all images"
                )
            if in_memory is not None:
                in_memory[i] = image
            else:
                pwrite_all(fd, image.contiguous().numpy().data, data_offset + i * image_bytes)
        return stop - start

    bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not progress, leave=False)
    pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="ask-decode")
    try:
        pending = {
            pool.submit(run_chunk, start, min(start + _CHUNK, len(paths)))
            for start in range(0, len(paths), _CHUNK)
        }
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                bar.update(future.result())  # re-raises a worker's DataError here
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        if fd >= 0:
            os.close(fd)
    return in_memory if in_memory is not None else torch.from_numpy(open_mapped(out))
