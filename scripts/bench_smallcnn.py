"""Training throughput of SmallCNN on the CPU (forward + backward + SGD step).

Usage::

    python scripts/bench_smallcnn.py --widths 16 24 32 48 64 --batch-size 256 --threads 2

Prints, per width and memory format, the median images per second over the timed steps and the
resulting seconds per 50,000-image CIFAR-10 epoch. Wall time is what a training run sees; it is
also reported from this process's CPU time divided by the thread count, which is less disturbed
when other programs share the cores (the load average is printed to judge that).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ask.models import build_model  # noqa: E402


def bench(
    width: int,
    channels_last: bool,
    batch_size: int,
    image_size: int,
    steps: int,
    warmup: int,
    threads: int,
) -> dict[str, float]:
    """Time `steps` SGD steps after `warmup` untimed ones; return images/second (wall, CPU)."""
    torch.manual_seed(0)
    model = build_model("smallcnn", 10, 3, image_size, [0.5] * 3, [0.25] * 3, width=width)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    x = torch.rand(batch_size, 3, image_size, image_size)
    y = torch.randint(0, 10, (batch_size,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    wall: list[float] = []
    cpu: list[float] = []
    for i in range(warmup + steps):
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if i >= warmup:
            wall.append(time.perf_counter() - t_wall)
            cpu.append((time.process_time() - t_cpu) / threads)
    params = sum(p.numel() for p in model.parameters())
    return {
        "params": params,
        "wall_ips": batch_size / statistics.median(wall),
        "cpu_ips": batch_size / statistics.median(cpu),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 24, 32, 48, 64])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epoch-size", type=int, default=50_000)
    parser.add_argument(
        "--formats",
        nargs="+",
        default=["contiguous", "channels_last"],
        choices=["contiguous", "channels_last"],
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    sys.stdout.write(
        f"torch {torch.__version__}, {args.threads} threads, batch {args.batch_size}, "
        f"{args.image_size}px, load average before: {load:.2f}\n"
    )
    sys.stdout.write(
        f"{'width':>5} {'format':>13} {'params':>9} {'img/s wall':>10} {'s/epoch':>8} "
        f"{'img/s cpu':>9} {'s/epoch':>8}\n"
    )
    for width in args.widths:
        for fmt in args.formats:
            r = bench(
                width,
                fmt == "channels_last",
                args.batch_size,
                args.image_size,
                args.steps,
                args.warmup,
                args.threads,
            )
            sys.stdout.write(
                f"{width:>5} {fmt:>13} {r['params']:>9,} {r['wall_ips']:>10.0f} "
                f"{args.epoch_size / r['wall_ips']:>8.0f} {r['cpu_ips']:>9.0f} "
                f"{args.epoch_size / r['cpu_ips']:>8.0f}\n"
            )
            sys.stdout.flush()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    sys.stdout.write(f"load average after: {load:.2f}\n")


if __name__ == "__main__":
    main()
