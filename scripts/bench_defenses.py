"""Cost of one training step of each defence, side by side, with the ASK-Def / AT target.

Usage::

    python scripts/bench_defenses.py                       # smallcnn width 32, CIFAR-shaped batch of 128, CPU
    python scripts/bench_defenses.py --device cuda --model vgg16 --width 64 --out results/
    python scripts/bench_defenses.py --amp auto --channels-last   # as ask-train runs the steps

One process, one random CIFAR-shaped batch (uint8 pixels scaled to [0, 1], 10 classes), one
initial model copied for every defence; each defence gets the same number of inner steps
(``--steps``, 10 by default, as in conf/defense/*.yaml). A step is what the trainer does:
``defense.loss`` (under ``--amp``'s autocast, on a ``--channels-last`` model and batch if asked: the
trainer's defaults are ``train.amp=auto`` and ``train.channels_last=true``, while this bench's are
fp32 and channels-first), ``backward``, ``optimizer.step``. After one warm-up step each, the defences are
timed in turn, ``--repeats`` rounds with the order reversed every other round (so a slow spell
caused by other programs falls on all of them), and the median per defence is reported (the
ASK-Def / AT ratio also as the median of per-round ratios, whose two steps ran back to back), with
``torch.cuda.synchronize`` around every timed step on a GPU. On a CPU the clock is the process's
CPU time with one intra-op thread (``--threads 1``), which other jobs on the machine barely move;
on a GPU it is the wall clock. ASK-Def's step is also split into its inner part (both
maximisations and the reference features) and the rest.

Target: ASK-Def / AT <= 2.5. Counting forward+backward passes over the batch, AT costs about
steps + 1 and ASK-Def about (steps + 1) * (1 + C * n_ref / B) + steps + 2 (the references' PGD
copies ride in the same PGD call as the batch), about 2.4x at the defaults.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ask.constants import AMP_SETTINGS
from ask.data import ImageSplit
from ask.defenses import build_defense
from ask.models import build_model
from ask.utils import precision

DEFENSES = ("none", "at", "ask_def", "trades")
TARGET = 2.5


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device) -> float:
    # On a CPU shared with other jobs, wall time mostly measures the neighbours; the process's
    # CPU time (one intra-op thread) measures the step's own work. A GPU step is timed on the wall.
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smallcnn")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--layer", default="block3", help="ASK-Def's layer")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="inner steps of every defence")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads on a CPU (1: CPU time equals the step's work)")
    parser.add_argument("--amp", default="off", choices=AMP_SETTINGS,
                        help="autocast of the steps, as train.amp (default off: fp32; ask-train's default is auto)")
    parser.add_argument("--channels-last", action="store_true",
                        help="models and batch in channels-last memory, as train.channels_last (ask-train's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="directory for bench_defenses.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    size, classes, batch = args.image_size, args.classes, args.batch_size
    base = build_model(args.model, num_classes=classes, in_channels=3, image_size=size,
                       mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), width=args.width).to(device)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8).float().div(255).to(device)
    amp_dtype = precision.resolve_amp(args.amp, device)
    if args.channels_last:  # as the trainer does: the models once, every batch on its way in
        base = base.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(batch, device=device) % classes
    # ASK-Def's reference source: a random "training split" with 50 images per class.
    pool_labels = torch.arange(50 * classes) % classes
    pool = ImageSplit(torch.randint(0, 256, (len(pool_labels), 3, size, size), dtype=torch.uint8), pool_labels)

    inner = {"steps": args.steps}
    params: dict[str, dict[str, Any]] = {
        "none": {},
        "at": dict(inner),
        "ask_def": {**inner, "layer": args.layer},
        "trades": dict(inner),
    }
    runners = {}
    for name in DEFENSES:
        model = copy.deepcopy(base).train()
        extra = {"train_split": pool} if name == "ask_def" else {}
        defense = build_defense(name, model, params[name], **extra)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        runners[name] = (defense, optimizer)

    logits_dtype: dict[str, str] = {}

    def step(name: str) -> float:
        defense, optimizer = runners[name]
        _sync(device)
        started = _clock(device)
        with precision.autocast(device, amp_dtype):
            loss, logits = defense.loss(images, labels)
        logits_dtype[name] = str(logits.dtype).removeprefix("torch.")  # what the timed step computed in
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _sync(device)
        return _clock(device) - started

    def ask_inner() -> float:
        defense = runners["ask_def"][0]
        _sync(device)
        started = _clock(device)
        with precision.autocast(device, amp_dtype):
            defense.inner(images, labels)
        _sync(device)
        return _clock(device) - started

    for name in DEFENSES:  # warm-up: allocator, kernels, first-call overheads
        step(name)
    times: dict[str, list[float]] = {name: [] for name in DEFENSES}
    inner_times: list[float] = []
    for repeat in range(args.repeats):
        order = DEFENSES if repeat % 2 == 0 else tuple(reversed(DEFENSES))
        for name in order:
            times[name].append(step(name))
        inner_times.append(ask_inner())

    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["ask_def"] / median["at"]
    # Per round, the two steps ran next to each other: their ratio shrugs off slow spells.
    round_ratio = statistics.median(a / b for a, b in zip(times["ask_def"], times["at"], strict=True))
    clock = "wall" if device.type == "cuda" else "CPU"
    print(f"{args.model} width {args.width}, batch {batch} x 3x{size}x{size}, {classes} classes, "
          f"{args.steps} inner steps, device {device}, {torch.get_num_threads()} threads, "
          f"{precision.precision_name(amp_dtype)}{', channels-last' if args.channels_last else ''}, "
          f"median of {args.repeats}, {clock} seconds")
    print(f"{'defence':<10}{'s/step':>10}{'x none':>10}{'images/s':>12}")
    for name in DEFENSES:
        print(f"{name:<10}{median[name]:>10.3f}{median[name] / median['none']:>10.2f}{batch / median[name]:>12.1f}")
    inner_median = statistics.median(inner_times)
    print(f"ask_def inner part (both maximisations + reference features): {inner_median:.3f} s "
          f"({inner_median / median['ask_def']:.0%} of its step)")
    print(f"ask_def / at = {ratio:.2f} (ratio of medians), {round_ratio:.2f} (median of per-round ratios); "
          f"target <= {TARGET}: {'PASS' if max(ratio, round_ratio) <= TARGET else 'MISS'}")

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "settings": vars(args) | {"out": str(args.out)},
            "environment": {
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            },
            "clock": clock,
            "precision": precision.precision_name(amp_dtype),
            "channels_last": args.channels_last,
            "logits_dtype": logits_dtype,
            "seconds": times,
            "ask_def_inner_seconds": inner_times,
            "median_seconds": median,
            "ask_def_over_at": ratio,
            "ask_def_over_at_per_round_median": round_ratio,
            "target": TARGET,
        }
        (args.out / "bench_defenses.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
