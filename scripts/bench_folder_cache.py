"""Decoded image folders on disk, not in RAM: peak memory and time of the folder cache.

    python scripts/bench_folder_cache.py --root ../shared/data/cifar10-jpeg --image-size 64

Three fresh subprocesses load the same ImageFolder tree (``dataset=cifar10_folder``, or
``--dataset imagenet`` for a train/val tree) and report their peak RSS above the pre-load peak
(``VmHWM``) and wall time:

* ram: ``dataset.cache=false``: every split decoded into one in-memory uint8 tensor;
* build: the cache is on and empty: pixels go from the decoder into the cache's ``.npy`` files;
* load: the cache is on and filled: the splits are memory maps of those files.

The ``load`` worker then reads the training split in random batches of 256, as training does,
and reports images per second (first pass: from disk or the page cache). A checksum of the
pixels must agree across the three. Exit status 1 when the build or load peak exceeds
``--bound-mib`` (default: a quarter of the decoded pixels).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ask.utils.memory import status_mib


def worker(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from PIL import Image, JpegImagePlugin, PngImagePlugin  # noqa: F401  imported before the baseline

    from ask.config.schema import DatasetConfig
    from ask.data import load_dataset

    cfg = DatasetConfig(name=a.dataset, root=a.root, image_size=a.image_size, cache=a.mode != "ram")
    before, started = status_mib("VmHWM"), time.perf_counter()
    bundle = load_dataset(cfg, a.cache, seed=0, progress=False)
    result = {"mode": a.mode, "seconds": time.perf_counter() - started, "peak_mib": status_mib("VmHWM") - before,
              "images": len(bundle.train) + len(bundle.test),
              "pixels_mib": (bundle.train.images.numel() + bundle.test.images.numel()) / 2**20}
    result["checksum"] = int(bundle.train.images.sum(dtype=torch.int64)) + int(bundle.test.images.sum(dtype=torch.int64))
    if a.mode == "load":
        order = torch.randperm(len(bundle.train), generator=torch.Generator().manual_seed(0))
        started = time.perf_counter()
        for start in range(0, len(order), 256):
            bundle.train.images[order[start:start + 256]].float()
        result["random_batches_images_per_second"] = len(order) / (time.perf_counter() - started)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True)
    parser.add_argument("--dataset", default="cifar10_folder")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--bound-mib", type=float, default=None)
    parser.add_argument("--worker", choices=["ram", "build", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.worker:
        a.mode = a.worker
        print(json.dumps(worker(a)))
        return 0

    cache = Path(tempfile.mkdtemp(prefix="ask-folder-cache-"))
    results = []
    try:
        for mode in ("ram", "build", "load"):
            command = [sys.executable, __file__, "--root", a.root, "--dataset", a.dataset, "--worker", mode,
                       "--cache", str(cache / ("unused" if mode == "ram" else "cache"))]
            if a.image_size:
                command += ["--image-size", str(a.image_size)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(results[-1]))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if len({r["checksum"] for r in results}) != 1:
        print("error: the three loads disagree on the pixels", file=sys.stderr)
        return 1
    bound = a.bound_mib if a.bound_mib is not None else results[0]["pixels_mib"] / 4
    print(f"machine: {os.cpu_count()} CPUs; {results[0]['images']} images, {results[0]['pixels_mib']:.0f} MiB of pixels")
    for r in results:
        extra = f", {r['random_batches_images_per_second']:.0f} img/s in random batches" if "random_batches_images_per_second" in r else ""
        print(f"{r['mode']:>5}: peak +{r['peak_mib']:.0f} MiB, {r['seconds']:.1f} s{extra}")
    over = [r["mode"] for r in results[1:] if r["peak_mib"] > bound]
    if over:
        print(f"error: {', '.join(over)} exceeded the bound of {bound:.0f} MiB", file=sys.stderr)
        return 1
    print(f"build and load stayed under the bound of {bound:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
