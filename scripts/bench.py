"""Side-by-side cost of ASK-Atk, the reference store and exact kNN search, with pass/miss targets.

Usage::

    python scripts/bench.py                         # full run: smallcnn width 32, batch 128, CPU or CUDA
    python scripts/bench.py --model vgg16 --device cuda --out results/
    python scripts/bench.py --quick --out /tmp/b    # seconds: the smoke test's settings
    python scripts/bench.py --eval-against REF --eval-args OVERRIDE...  # ask-attack, this tree vs REF

``--eval-against`` is a measurement of its own, the whole ``ask-attack`` evaluation timed in this
tree and in an older commit's; see ``scripts/bench_eval.py``.

Four measurements, each in a fresh subprocess of this script (so the peak memory of one never
hides inside another's), each ratio's two sides timed in that one process on the same model,
batch and device, interleaved (the order alternates between repeats, so a slow spell caused by
other programs on the machine falls on both sides), warm-up calls first, median of the repeats,
``torch.cuda.synchronize`` around every timed call on a GPU:

``attack``
    ASK-Atk time per step / PGD-CE time per step, for the default ASK-Atk (the authors' attack:
    class-wise loss, T = 0.01, cosine; target <= 1.0) and, beside it, the instance-wise loss
    (``ask_instance``; target <= 1.3, what it met before the class-wise default took its place).
    A step's cost is ``(T(S2 steps) - T(S1 steps)) / (S2 - S1)`` per repeat, which cancels
    everything an attack pays once per batch; that one-off cost of ASK-Atk (clean features, the
    per-class reference search and the references in the form the steps use,
    ``ASKAttack.step_references``) is timed directly as well and reported on its own. The three
    attacks share the threat model (L-inf 8/255, step 2/255, random start); ASK-Atk takes k
    references per class from a pool of random but fixed images whose features come from the
    model (loaded from the cache the ``store`` measurement wrote). Why a step can cost less than
    PGD-CE's: ASK-Atk's forward pass stops at the tapped layer, and the class-wise loss compares
    with one summed reference per class ([B, C, D]) rather than with all k ([B, C, k, D]).
    Why it may not: where the tapped layer is the network's last block (smallcnn's block3) the
    network work is PGD-CE's, and the fp32 margin comes on top. The margin alone (forward and
    backward on the tapped layer's features, no network around it) is timed too; the ASK step
    less the margin over PGD-CE's step shows what is left once the loss is taken out. Every exact
    margin reads each of the per-class sums once a step, so one plain read of them, added to that
    remainder, is the floor a margin fused into a single pass could reach.
    The steps run in fp32 channels-first unless ``--attack-amp`` / ``--attack-channels-last``
    ask for what ``ask-attack`` does by default (``eval.amp=auto``, ``eval.channels_last=true``).
``store``
    ``ReferenceStore.build`` with a cache path: a fresh build (features of the whole pool, then
    the atomic cache write) against a second call that reuses the cache (target <= 0.05). The
    cache write alone is timed too.
``search``
    exact k-nearest-neighbour search of the batch's features over a 50,000-point pool at the
    tapped layer / the backbone's forward pass for that batch (target <= 1.0), with faiss through
    ``ReferenceStore.search`` beside a plain torch brute force (normalise, matmul, topk), and the
    per-class search ASK-Atk uses. The pool is synthetic: half-normal random vectors (non-negative,
    like post-ReLU activations) of the layer's dimension, since an exact flat search costs the
    same whatever the values; the queries are the batch's real features at the layer.
``train``
    one SGD step (forward, backward, update; batch ``--train-batch``) in fp32, channels-last, bf16
    autocast, and bf16 + channels-last / fp32 (target <= 0.5, i.e. twice the images per second,
    where the device has bf16 units; elsewhere bf16 is emulated, ``train.amp=auto`` leaves it
    off, and the row carries no target). Also reported: the step of what ``train.amp=auto``
    picks on this device over fp32.

Peak memory comes from an untimed pass after the timings, in the same subprocess: before each
operation, freed heap memory goes back to the system (glibc ``malloc_trim``, so memory an earlier
operation freed cannot hide a later one's peak) and the resident-set high-water mark is reset
(``/proc/self/clear_refs``, Linux); after it the mark is read back, so each operation reports its
own peak above the memory held before it. Each subprocess's whole ``ru_maxrss`` is reported as
well. On a GPU, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` gives each
operation's peak. The timed calls carry no memory bookkeeping.

On a CPU shared with other programs, torch's threads wait on each other at every operation's
barrier (on 2 busy cores a batch-128 forward pass took twice as long with 2 threads as with 1);
``--threads 1`` then gives steadier numbers. ``--quick`` shrinks everything (smallcnn width 8,
pool 2,000, batch 8, steps 1 and 2) for the smoke test.

The table goes to stdout; ``bench.json`` (in ``--out``) holds the environment (device, torch and
faiss versions, CPU count, threads, load average), the settings and every raw timing.
``--profile`` also writes a torch.profiler table of one call of each attack (ASK-Atk, its
instance-wise variant, PGD-CE) and a cProfile of the faiss search next to it.

One file of about 800 lines on purpose: each measurement runs in a worker that is this script
again (``--worker NAME``), and a reader finds every method beside its target in one place.
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import io
import json
import logging
import math
import os
import platform
import pstats
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

# The package is imported in the workers only (the driver starts faster), but for the torch-free
# constants its options share with the config schema.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ask.constants import AMP_SETTINGS  # noqa: E402

log = logging.getLogger("bench")

KINDS = ("store", "attack", "search", "train")
TARGETS = {"ask_over_pgd_step": 1.0, "ask_instance_over_pgd_step": 1.3, "cached_over_fresh_build": 0.05,
           "search_over_forward": 1.0, "bf16_channels_last_over_fp32_train_step": 0.5}
ASK_ATTACKS = ("ask", "ask_instance")
# The training step's arithmetic and memory layout, measured side by side.
TRAIN_VARIANTS = {"fp32": (False, False), "channels_last": (False, True), "bf16": (True, False),
                  "bf16_channels_last": (True, True)}
DEFAULT_LAYER = {"smallcnn": "block3", "vgg16": "block4", "resnet18": "layer3"}
DEFAULT_WIDTH = {"smallcnn": 32, "vgg16": 64, "resnet18": 64}
# CIFAR-10 statistics: the values only set the input scale, the timings do not depend on them.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
FULL = {"pool": 10_000, "search_pool": 50_000, "batch": 128, "train_batch": 128, "steps": (1, 4), "repeats": 5,
        "warmup": 1, "store_repeats": 2}
QUICK = {"pool": 2_000, "search_pool": 2_000, "batch": 8, "train_batch": 8, "steps": (1, 2), "repeats": 2,
         "warmup": 1, "store_repeats": 1}
_MB = 1024 * 1024


# ------------------------------------------------------------------------------ measuring
Plan = list[tuple[str, Callable[[], Any]]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kb(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _maxrss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / _MB


def _reset_hwm() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


def _trim_heap() -> None:
    # glibc keeps freed blocks resident for reuse; an operation reusing them would show no peak.
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(device: torch.device, fn: Callable[[], Any]) -> dict[str, float]:
    """Run ``fn`` once; its peak host (resident set) and CUDA memory, total and above the start.

    Without a resettable high-water mark (not Linux) the host peak is the process's ``ru_maxrss``,
    which only shows an operation that sets a new record.
    """
    _sync(device)
    _trim_heap()
    resettable = _reset_hwm()
    rss = _proc_status_kb("VmRSS")
    rss0 = rss / 1024 if rss is not None else _maxrss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        gpu0 = torch.cuda.memory_allocated(device) / _MB
    fn()
    _sync(device)
    hwm = _proc_status_kb("VmHWM") if resettable else None
    peak = hwm / 1024 if hwm is not None else _maxrss_mb()
    out = {"host_peak_mb": peak, "host_delta_mb": max(0.0, peak - rss0), "host_resettable": resettable}
    if device.type == "cuda":
        gpu_peak = torch.cuda.max_memory_allocated(device) / _MB
        out.update(gpu_peak_mb=gpu_peak, gpu_delta_mb=max(0.0, gpu_peak - gpu0))
    return out


class Timer:
    """Wall and process-CPU seconds of calls, by label (CUDA synchronised on both sides)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def __call__(self, label: str, fn: Callable[[], Any], record: bool = True) -> Any:
        _sync(self.device)
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        _sync(self.device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if record:
            self.wall.setdefault(label, []).append(wall)
            self.cpu.setdefault(label, []).append(cpu)
        return out

    def run(self, plan: Plan, repeats: int, warmup: int) -> None:
        """``warmup`` untimed rounds, then ``repeats`` timed rounds in alternating order."""
        for _ in range(warmup):
            for label, fn in plan:
                self(label, fn, record=False)
        for r in range(repeats):
            # Forward on even rounds, backward on odd ones: a drift in the machine's load then
            # falls on every operation alike instead of always on the one that runs last.
            for label, fn in plan if r % 2 == 0 else plan[::-1]:
                self(label, fn)

    def median(self, label: str) -> float:
        return _median(self.wall[label])

    def raw(self) -> dict[str, Any]:
        return {"wall_s": self.wall, "cpu_s": self.cpu}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else math.nan


# ------------------------------------------------------------------------------ fixtures
def _make_model(s: dict[str, Any], device: torch.device) -> torch.nn.Module:
    from ask.models import build_model

    torch.manual_seed(s["seed"])
    model = build_model(s["model"], s["num_classes"], 3, s["image_size"], MEAN, STD, width=s["width"])
    return model.to(device).eval()


def _make_pool(s: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Random but fixed uint8 images with balanced labels (the reference pool)."""
    g = torch.Generator().manual_seed(s["seed"] + 1)
    n, size = s["pool"], s["image_size"]
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % s["num_classes"]
    return images, labels


def _make_batch(s: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(s["seed"] + 2)
    size = s["image_size"]
    x = torch.rand(s["batch"], 3, size, size, generator=g)
    y = torch.randint(0, s["num_classes"], (s["batch"],), generator=g)
    return x.to(device), y.to(device)


def _build_store(s: dict[str, Any], model: torch.nn.Module, cache_path: Path) -> Any:
    """``ReferenceStore.build`` over the fixed pool, cached at ``cache_path``."""
    from ask.knn import ReferenceStore, store_cache_key, tensor_digest

    images, labels = _make_pool(s)
    digest = "-".join(tensor_digest(t) for t in model.state_dict().values())[:64]
    key = store_cache_key(digest, [s["layer"]], s["metric"], torch.arange(s["pool"]),
                          [3, s["image_size"], s["image_size"]], extra={"bench_seed": s["seed"]})
    return ReferenceStore.build(model, images, labels, [s["layer"]], s["metric"], s["num_classes"],
                                cache_path=cache_path, cache_key=key, progress=False)


# ------------------------------------------------------------------------------ workers
def worker_store(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Fresh ``ReferenceStore.build`` (features + cache write) against a reuse of its cache."""
    from ask.knn import ReferenceStore
    from ask.utils.io import atomic_save

    model = _make_model(s, device)
    images, labels = _make_pool(s)
    timer = Timer(device)
    scratch = Path(s["scratch"])
    # Warm-up: a process's first batches pay for kernel selection and allocator growth.
    for _ in range(s["warmup"]):
        timer("warmup", lambda: ReferenceStore.build(
            model, images[:256], labels[:256], [s["layer"]], s["metric"], s["num_classes"], progress=False
        ), record=False)
    for r in range(s["store_repeats"]):
        path = scratch / f"store-{r}"
        shutil.rmtree(path, ignore_errors=True)  # the feature cache is a directory
        fresh = timer("fresh_build", lambda p=path: _build_store(s, model, p))
        cached = timer("cached_build", lambda p=path: _build_store(s, model, p))
        if fresh.from_cache or not cached.from_cache:
            raise RuntimeError("the fresh build read a cache or the second build did not reuse it")
        if not torch.equal(fresh.features[s["layer"]], cached.features[s["layer"]]):
            raise RuntimeError("the cached features differ from the freshly computed ones")
        payload = {"features": fresh.features, "labels": fresh.labels, "pool_indices": fresh.pool_indices}
        timer("cache_write", lambda p=payload: atomic_save(p, scratch / "write-only.pt"))
        # The attack worker reuses this cache instead of computing the pool's features again.
        shutil.rmtree(s["shared_cache"], ignore_errors=True)
        os.replace(path, s["shared_cache"])
    dim = fresh.dim(s["layer"])
    del fresh, cached, payload

    memory_path = scratch / "store-memory"
    memory = {
        "fresh_build": peak_memory(device, lambda: _build_store(s, model, memory_path)),
        "cached_build": peak_memory(device, lambda: _build_store(s, model, memory_path)),
    }
    fresh_s, cached_s = timer.median("fresh_build"), timer.median("cached_build")
    return {
        "pool_points": s["pool"],
        "feature_dim": dim,
        "cache_file_mb": sum(f.stat().st_size for f in Path(s["shared_cache"]).rglob("*") if f.is_file()) / _MB,
        "fresh_build_s": fresh_s,
        "cached_build_s": cached_s,
        "cache_write_s": timer.median("cache_write"),
        "cached_over_fresh_build": cached_s / fresh_s,
        "raw": timer.raw(),
        "peak_memory": memory,
    }


def worker_attack(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """ASK-Atk and PGD-CE per-step cost (difference of two step counts) and the one-off search."""
    from ask.attacks import ThreatModel, ascent, build_attack
    from ask.attacks.ask_loss import multi_layer_ask_objective
    from ask.utils import precision

    model = _make_model(s, device)
    if s["attack_channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    # As ask-attack runs them: the whole call (its one-off reference search included) under autocast.
    amp_dtype = precision.resolve_amp(s["attack_amp"], device)
    timer = Timer(device)
    store = timer("store_load", lambda: _build_store(s, model, Path(s["shared_cache"])))
    x, y = _make_batch(s, device)
    s1, s2 = s["steps"]
    layer = s["layer"]

    def make(name: str, steps: int) -> Any:
        threat = ThreatModel(eps=s["eps"], norm="linf", steps=steps, step_size=s["step_size"])
        hyper = {"layers": [layer], "k": s["k"]} if name in ASK_ATTACKS else {}
        generator = torch.Generator().manual_seed(s["seed"] + 3)
        return build_attack(name, model, threat, store=store, generator=generator, **hyper)

    attacks = {(name, steps): make(name, steps) for name in ("pgd", *ASK_ATTACKS) for steps in (s1, s2)}
    ask = attacks[("ask", s1)]

    def call(attack: Any) -> torch.Tensor:
        with precision.autocast(device, amp_dtype):
            return attack(x, y)

    def references(attack: Any) -> Any:
        with precision.autocast(device, amp_dtype):
            return attack.step_references(x)

    with torch.no_grad():
        query = model.forward_features(x, [layer])[layer].flatten(1)
        with precision.autocast(device, amp_dtype):
            logits_dtype = str(model(x).dtype).removeprefix("torch.")  # what the timed passes compute in
            tapped = model.forward_features(x, [layer])[layer]  # the margin's input as a step sees it
    sums = references(ask)[0]

    def margin() -> torch.Tensor:
        # One step's loss on the tapped layer, forward and backward, with no backbone around it:
        # what a step adds to the network work PGD-CE also does.
        feats = tapped.detach().requires_grad_()
        with precision.autocast(device, amp_dtype):
            _, direction = multi_layer_ask_objective({layer: feats}, sums, y, metric=ask.metric,
                                                     temperature=ask.temperature, kind=ask.kind,
                                                     references_normalized=ask.metric == "cosine")
        return ascent.input_gradient(direction, feats)
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    # The first ASK call builds the per-class faiss indexes: a one-off of the store, kept apart.
    timer("ask_first_call", lambda: call(ask))
    plan: Plan = [(f"{name}_steps{steps}", lambda a=attack: call(a)) for (name, steps), attack in attacks.items()]
    plan += [
        *[(f"{name}_references", lambda a=attacks[(name, s1)]: references(a)) for name in ASK_ATTACKS],
        ("search_per_class", lambda: store.search_per_class(layer, query, s["k"])),
        ("ask_margin", margin),
        # Any exact margin reads every element of the sums once a step; a one-pass (fused) margin
        # could cost no less than this read, timed like the margin (cold, between other calls).
        ("ask_sums_read", lambda: sums[layer].sums.sum()),
    ]
    timer.run(plan, s["repeats"], s["warmup"])

    def per_step(name: str, clock: dict[str, list[float]]) -> list[float]:
        pairs = zip(clock[f"{name}_steps{s1}"], clock[f"{name}_steps{s2}"], strict=True)
        return [(b - a) / (s2 - s1) for a, b in pairs]

    pgd_steps, pgd_cpu = per_step("pgd", timer.wall), per_step("pgd", timer.cpu)
    pgd_step = _median(pgd_steps)
    ratios: dict[str, Any] = {}
    for name in ASK_ATTACKS:
        steps, cpu = per_step(name, timer.wall), per_step(name, timer.cpu)
        step = _median(steps)
        ratios.update({
            f"{name}_step_s": step,
            f"{name}_over_pgd_step": step / pgd_step,
            f"{name}_over_pgd_step_per_repeat": [a / p for a, p in zip(steps, pgd_steps, strict=True)],
            f"{name}_over_pgd_step_cpu_time": _median(cpu) / _median(pgd_cpu),
            f"{name}_per_step_s": steps,
            f"{name}_references_s": timer.median(f"{name}_references"),
        })
    ask_steps = ratios["ask_per_step_s"]
    margin_s = timer.median("ask_margin")
    ratios["ask_margin_s"] = margin_s
    ratios["ask_less_margin_over_pgd_step"] = (ratios["ask_step_s"] - margin_s) / pgd_step
    ratios["ask_sums_read_s"] = timer.median("ask_sums_read")
    ratios["ask_one_pass_floor_over_pgd_step"] = ratios["ask_less_margin_over_pgd_step"] + ratios["ask_sums_read_s"] / pgd_step
    one_off = [t - s1 * step for t, step in zip(timer.wall[f"ask_steps{s1}"], ask_steps, strict=True)]
    if s["profile"]:
        _profile_attacks(s, {name: attacks[(name, s2)] for name in ("pgd", *ASK_ATTACKS)}, call, x.is_cuda)
    memory = {label: peak_memory(device, fn) for label, fn in plan}
    return {
        "attack_precision": precision.precision_name(amp_dtype),
        "attack_channels_last": s["attack_channels_last"],
        "attack_logits_dtype": logits_dtype,
        "attack_conv_weights_channels_last": first_conv.weight.is_contiguous(memory_format=torch.channels_last),
        "store_from_cache": store.from_cache,
        "store_load_s": timer.wall["store_load"][0],
        "pgd_step_s": pgd_step,
        "pgd_per_step_s": pgd_steps,
        **ratios,
        "search_per_class_s": timer.median("search_per_class"),
        "ask_one_off_from_intercept_s": _median(one_off),
        "ask_first_call_s": timer.wall["ask_first_call"][0],
        "raw": timer.raw(),
        "peak_memory": memory,
    }


def _profile_attacks(s: dict[str, Any], attacks: dict[str, Any], call: Callable[[Any], Any], cuda: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for name, attack in attacks.items():
        with profile(activities=activities) as prof:
            call(attack)
        table = prof.key_averages().table(sort_by=sort, row_limit=30)
        Path(s["out"], f"profile_{name}.txt").write_text(table)


def worker_search(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Exact kNN search of one batch over a large pool against the backbone's forward pass."""
    from ask.knn import ReferenceStore
    from ask.knn.similarity import l2_normalize

    model = _make_model(s, device)
    timer = Timer(device)
    x, _ = _make_batch(s, device)
    layer, k, n = s["layer"], s["k"], s["search_pool"]
    with torch.no_grad():
        query = model.forward_features(x, [layer])[layer].flatten(1)
    dim = query.shape[1]
    g = torch.Generator().manual_seed(s["seed"] + 4)
    # Half-normal: non-negative like post-ReLU features; an exact flat search costs the same anyway.
    pool = timer("make_pool", lambda: torch.randn(n, dim, generator=g).abs_())
    labels = torch.arange(n) % s["num_classes"]

    def new_store() -> Any:
        return ReferenceStore([layer], s["metric"], s["num_classes"], labels, {layer: pool})

    store = new_store()
    pool_dev = timer("torch_pool_normalise", lambda: l2_normalize(pool.to(device)))

    def brute() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.topk(l2_normalize(query) @ pool_dev.T, k, dim=1)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    def forward_to_layer() -> torch.Tensor:
        with torch.no_grad():
            return model.forward_features(x, [layer])[layer]

    # First calls build the faiss indexes (a normalised copy of the pool): one-offs, timed apart.
    timer("faiss_first_search", lambda: store.search(layer, query, k))
    timer("faiss_first_search_per_class", lambda: store.search_per_class(layer, query, k))
    plan: Plan = [
        ("forward", forward),
        ("forward_to_layer", forward_to_layer),
        ("faiss_search", lambda: store.search(layer, query, k)),
        ("torch_brute_force", brute),
        ("faiss_search_per_class", lambda: store.search_per_class(layer, query, k)),
    ]
    timer.run(plan, s["repeats"], s["warmup"])

    # Both searches are exact: they must find the same neighbours (ties aside).
    _, faiss_rows = store.search(layer, query, k)
    _, brute_rows = brute()
    pairs = zip(faiss_rows.cpu().tolist(), brute_rows.cpu().tolist(), strict=True)
    agreement = sum(len(set(a) & set(b)) for a, b in pairs) / faiss_rows.numel()
    gpu_index = store.indexes.gpu_device(query.device) is not None
    if s["profile"]:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            store.search(layer, query, k)
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(20)
        Path(s["out"], "profile_search.txt").write_text(text.getvalue())

    memory = {label: peak_memory(device, fn) for label, fn in plan}
    store = None  # frees its indexes, so the index build below is measured on its own
    memory["faiss_index_build"] = peak_memory(device, lambda: new_store().search(layer, query, k))
    fwd = timer.median("forward")
    return {
        "pool_points": n,
        "feature_dim": dim,
        "pool_kind": "half-normal random vectors |N(0,1)|, not features of images",
        "queries": "the batch's features at the layer",
        "faiss_gpu_index": gpu_index,
        "forward_s": fwd,
        "forward_to_layer_s": timer.median("forward_to_layer"),
        "faiss_search_s": timer.median("faiss_search"),
        "torch_brute_force_s": timer.median("torch_brute_force"),
        "faiss_search_per_class_s": timer.median("faiss_search_per_class"),
        "faiss_over_forward": timer.median("faiss_search") / fwd,
        "torch_over_forward": timer.median("torch_brute_force") / fwd,
        "faiss_per_class_over_forward": timer.median("faiss_search_per_class") / fwd,
        "faiss_index_build_s": timer.wall["faiss_first_search"][0] - timer.median("faiss_search"),
        "torch_pool_normalise_s": timer.wall["torch_pool_normalise"][0],
        "faiss_torch_neighbour_agreement": agreement,
        "raw": timer.raw(),
        "peak_memory": memory,
    }


def worker_train(s: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """One SGD step (forward, backward, update) in fp32, channels-last, bf16 autocast and both.

    Each variant has its own copy of the same initial network, so every variant runs the same
    shapes; the copies drift apart over the steps, which does not change a step's cost.
    """
    from ask.utils import precision

    x, y = _make_batch({**s, "batch": s["train_batch"]}, device)
    timer = Timer(device)
    plan: Plan = []
    for name, (bf16, channels_last) in TRAIN_VARIANTS.items():
        model = _make_model(s, device).train()
        inputs = x
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            inputs = x.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        dtype = torch.bfloat16 if bf16 else None

        def step(model: torch.nn.Module = model, inputs: torch.Tensor = inputs,
                 optimizer: torch.optim.Optimizer = optimizer, dtype: torch.dtype | None = dtype) -> None:
            with precision.autocast(device, dtype):
                loss = torch.nn.functional.cross_entropy(model(inputs), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        plan.append((name, step))
    timer.run(plan, s["repeats"], s["warmup"])
    steps = {name: timer.median(name) for name in TRAIN_VARIANTS}
    default = ("bf16" if precision.resolve_amp("auto", device) is not None else "fp32")
    default_variant = "bf16_channels_last" if default == "bf16" else "channels_last"
    return {
        "native_bf16": precision.native_bf16(device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "default_variant": default_variant,
        "step_s": steps,
        "images_per_second": {name: s["train_batch"] / t for name, t in steps.items()},
        "over_fp32": {name: t / steps["fp32"] for name, t in steps.items()},
        "raw": timer.raw(),
        "peak_memory": {name: peak_memory(device, fn) for name, fn in plan},
    }


WORKERS: dict[str, Callable[[dict[str, Any], torch.device], dict[str, Any]]] = {
    "store": worker_store, "attack": worker_attack, "search": worker_search, "train": worker_train,
}


def run_worker(kind: str, settings_path: Path, result_path: Path) -> None:
    """Body of a subprocess: one measurement kind, its result written as JSON."""
    s = json.loads(settings_path.read_text())
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    device = torch.device(s["device"])
    t0 = time.perf_counter()
    result = WORKERS[kind](s, device)
    import faiss  # loaded by the store already; read after the store capped its threads

    result["worker_wall_s"] = time.perf_counter() - t0
    result["torch_threads"] = torch.get_num_threads()
    result["faiss_omp_threads"] = faiss.omp_get_max_threads()
    result["process_max_rss_mb"] = _maxrss_mb()
    if device.type == "cuda":
        result["process_max_gpu_allocated_mb"] = torch.cuda.max_memory_allocated(device) / _MB
    result_path.write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------ driver
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _environment(device: str) -> dict[str, Any]:
    import faiss

    env: dict[str, Any] = {
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else _cpu_name(),
        "torch": torch.__version__,
        "faiss": getattr(faiss, "__version__", "unknown"),
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_default_threads": torch.get_num_threads(),
        "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "KMP_"))},
    }
    if hasattr(os, "getloadavg"):
        env["load_average_start"] = list(os.getloadavg())
    return env


def _row(name: str, value: float, unit: str, target: float | None = None) -> dict[str, Any]:
    passed = None if target is None or not math.isfinite(value) else bool(value <= target)
    return {"measurement": name, "value": value, "unit": unit, "target": target, "passed": passed}


# (table title, label) of the operations whose peak memory the table shows.
MEMORY_ROWS = {
    "attack": [("ASK-Atk call, S2 steps", "ask_steps{s2}"), ("PGD-CE call, S2 steps", "pgd_steps{s2}"),
               ("ASK-Atk step_references()", "ask_references"),
               ("ASK-Atk instance-wise call, S2 steps", "ask_instance_steps{s2}"),
               ("ASK-Atk instance-wise step_references()", "ask_instance_references")],
    "store": [("store fresh build", "fresh_build"), ("store cached build", "cached_build")],
    "train": [(f"training step, {name}", name) for name in TRAIN_VARIANTS],
    "search": [("forward", "forward"), ("faiss search", "faiss_search"),
               ("torch brute force", "torch_brute_force"), ("faiss index build + search", "faiss_index_build")],
}


def summarise(results: dict[str, Any], s2: int) -> list[dict[str, Any]]:
    """The table's rows from the workers' results (a missing kind gives no rows)."""
    rows: list[dict[str, Any]] = []
    if "attack" in results:
        a = results["attack"]
        rows += [
            _row("ASK-Atk time per step", a["ask_step_s"], "s"),
            _row("PGD-CE time per step", a["pgd_step_s"], "s"),
            _row("ASK-Atk / PGD-CE per step", a["ask_over_pgd_step"], "x", TARGETS["ask_over_pgd_step"]),
            _row("  same, from process CPU time", a["ask_over_pgd_step_cpu_time"], "x"),
            _row("ASK-Atk margin alone, forward + backward", a["ask_margin_s"], "s"),
            _row("ASK-Atk step less its margin / PGD-CE step", a["ask_less_margin_over_pgd_step"], "x"),
            _row("  one read of the per-class sums", a["ask_sums_read_s"], "s"),
            _row("  floor with a one-pass margin (step less margin, plus that read) / PGD-CE step",
                 a["ask_one_pass_floor_over_pgd_step"], "x"),
            _row("ASK-Atk instance-wise time per step", a["ask_instance_step_s"], "s"),
            _row("ASK-Atk instance-wise / PGD-CE per step", a["ask_instance_over_pgd_step"], "x",
                 TARGETS["ask_instance_over_pgd_step"]),
            _row("  same, from process CPU time", a["ask_instance_over_pgd_step_cpu_time"], "x"),
            _row("ASK-Atk one-off per batch (step_references())", a["ask_references_s"], "s"),
            _row("  instance-wise", a["ask_instance_references_s"], "s"),
            _row("  of which search_per_class", a["search_per_class_s"], "s"),
            _row("  one-off from the T(S1) intercept", a["ask_one_off_from_intercept_s"], "s"),
        ]
    if "store" in results:
        b = results["store"]
        rows += [
            _row("store build, fresh (features + cache write)", b["fresh_build_s"], "s"),
            _row("  of which cache write", b["cache_write_s"], "s"),
            _row("store build, cached", b["cached_build_s"], "s"),
            _row("store cached / fresh", b["cached_over_fresh_build"], "x", TARGETS["cached_over_fresh_build"]),
        ]
    if "train" in results:
        t = results["train"]
        native = t["native_bf16"]
        for name in TRAIN_VARIANTS:
            rows.append(_row(f"training images/s, {name.replace('bf16_', 'bf16 + ')}", t["images_per_second"][name],
                             "im/s"))
        # The 2x target is for hardware with bf16 units; elsewhere bf16 is emulated and train.amp=auto skips it.
        rows.append(_row("bf16 + channels_last / fp32 per training step"
                         + ("" if native else f" (no native bf16 on {t['cpu_capability']})"),
                         t["over_fp32"]["bf16_channels_last"], "x",
                         TARGETS["bf16_channels_last_over_fp32_train_step"] if native else None))
        rows.append(_row(f"train.amp=auto default ({t['default_variant']}) / fp32 per step",
                         t["over_fp32"][t["default_variant"]], "x"))
    if "search" in results:
        c = results["search"]
        rows += [
            _row("backbone forward (logits)", c["forward_s"], "s"),
            _row("faiss search (store.search)", c["faiss_search_s"], "s"),
            _row("torch brute-force search", c["torch_brute_force_s"], "s"),
            _row("faiss search / forward", c["faiss_over_forward"], "x", TARGETS["search_over_forward"]),
            _row("torch brute force / forward", c["torch_over_forward"], "x", TARGETS["search_over_forward"]),
            _row("faiss per-class search / forward (ASK's)", c["faiss_per_class_over_forward"], "x"),
        ]
    for kind, ops in MEMORY_ROWS.items():
        if kind not in results:
            continue
        peaks = results[kind]["peak_memory"]
        gpu = "process_max_gpu_allocated_mb" in results[kind]
        field, where = ("gpu_delta_mb", "GPU") if gpu else ("host_delta_mb", "RSS")
        for title, label in ops:
            label = label.format(s2=s2)
            if label in peaks:
                rows.append(_row(f"peak memory, {title} ({where} above start)", peaks[label][field], "MiB"))
        rows.append(_row(f"peak memory, whole {kind} process (max RSS)", results[kind]["process_max_rss_mb"], "MiB"))
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max([len(r["measurement"]) for r in rows] + [11])
    lines = [f"{'measurement':<{width}}  {'value':>10}  {'unit':<4}  {'target':>8}  result"]
    for r in rows:
        target = f"<= {r['target']:g}" if r["target"] is not None else ""
        verdict = {True: "pass", False: "MISS", None: ""}[r["passed"]]
        lines.append(f"{r['measurement']:<{width}}  {r['value']:>10.4g}  {r['unit']:<4}  {target:>8}  {verdict}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    parser.add_argument("--model", default="smallcnn", choices=sorted(DEFAULT_LAYER))
    parser.add_argument("--width", type=int, default=None,
                        help="default: 32 for smallcnn (8 with --quick), 64 otherwise")
    parser.add_argument("--layer", default=None, help="tapped layer (default: block3 for smallcnn, "
                                                      "block4 for vgg16, layer3 for resnet18)")
    parser.add_argument("--batch", type=int, default=None, help=f"attack/search batch (default {FULL['batch']})")
    parser.add_argument("--train-batch", type=int, default=None,
                        help=f"training step batch (default {FULL['train_batch']})")
    parser.add_argument("--pool", type=int, default=None,
                        help=f"reference pool of images for the store and ASK-Atk (default {FULL['pool']})")
    parser.add_argument("--search-pool", type=int, default=None,
                        help=f"points of the synthetic search pool (default {FULL['search_pool']})")
    parser.add_argument("--steps", type=int, nargs=2, default=None, metavar=("S1", "S2"),
                        help="the two step counts whose time difference gives the per-step cost (default 1 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 1)")
    parser.add_argument("--store-repeats", type=int, default=None, help="fresh/cached build pairs (default 2)")
    parser.add_argument("--k", type=int, default=5, help="neighbours (per class for ASK-Atk)")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "l2"])
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--step-size", type=float, default=2 / 255)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch (and faiss) threads in the workers (0: torch's default, one per core)")
    parser.add_argument("--attack-amp", default="off", choices=AMP_SETTINGS,
                        help="autocast of the attack measurement, as eval.amp (default off: fp32 steps; "
                             "ask-attack's own default is auto)")
    parser.add_argument("--attack-channels-last", action="store_true",
                        help="the attack measurement's model in channels-last memory, as eval.channels_last "
                             "(ask-attack's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds)")
    parser.add_argument("--profile", action="store_true",
                        help="also write profile_ask.txt, profile_ask_instance.txt, profile_pgd.txt, "
                             "profile_search.txt to --out")
    parser.add_argument("--out", default=".", help="folder for bench.json (default: the current one)")
    parser.add_argument("--eval-against", metavar="REF",
                        help="instead: full-evaluation wall time of this tree against commit REF "
                             "(scripts/bench_eval.py; --threads and --out apply)")
    parser.add_argument("--eval-args", nargs="*", default=[], metavar="OVERRIDE",
                        help="with --eval-against: the ask-attack overrides both trees run (default: the digits demo)")
    parser.add_argument("--eval-repeats", type=int, default=1, help="with --eval-against: timed rounds")
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--worker-settings", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worker-result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve_settings(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    sizes = QUICK if args.quick else FULL
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    s: dict[str, Any] = {name: getattr(args, name) if getattr(args, name) is not None else default
                         for name, default in sizes.items()}
    s["steps"] = list(s["steps"])
    width = args.width or (8 if args.quick and args.model == "smallcnn" else DEFAULT_WIDTH[args.model])
    s.update(
        device=device, model=args.model, width=width,
        layer=args.layer or DEFAULT_LAYER[args.model], k=args.k, metric=args.metric,
        num_classes=args.num_classes, image_size=args.image_size, eps=args.eps, step_size=args.step_size,
        threads=args.threads, seed=args.seed, quick=args.quick, profile=args.profile,
        attack_amp=args.attack_amp, attack_channels_last=args.attack_channels_last,
        out=str(Path(args.out).resolve()), scratch=str(scratch), shared_cache=str(scratch / "pool-cache"),
    )
    if s["steps"][1] <= s["steps"][0] or s["steps"][0] < 1:
        raise SystemExit("--steps S1 S2 needs 1 <= S1 < S2 (S1 = 0 would skip the reference search)")
    if s["pool"] < s["k"] * s["num_classes"]:
        raise SystemExit(f"--pool {s['pool']} is too small for k={s['k']} per class and {s['num_classes']} classes")
    return s


def _run_kind(kind: str, settings_path: Path, scratch: Path) -> dict[str, Any]:
    """Run one measurement kind in a fresh subprocess; its result, or an ``error`` entry."""
    result_path = scratch / f"{kind}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--worker-settings", str(settings_path), "--worker-result", str(result_path)]
    proc = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0 or not result_path.exists():
        log.error("%s worker failed:\n%s", kind, proc.stderr[-3000:])
        last = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"error": f"worker exited with {proc.returncode}: {last[0]}"}
    return json.loads(result_path.read_text())


def _eval_against(args: argparse.Namespace) -> int:
    """The full-evaluation comparison with an older commit (scripts/bench_eval.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_eval import run_eval_benchmark

    return run_eval_benchmark(args.eval_against, args.eval_args, out=Path(args.out), repeats=args.eval_repeats,
                              threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    # The attacks warn about zero gradients on an untrained network; that is not news here.
    logging.getLogger("ask").setLevel(logging.ERROR)
    if args.worker:
        run_worker(args.worker, args.worker_settings, args.worker_result)
        return 0
    if args.eval_against:
        return _eval_against(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ask-bench-") as tmp:
        scratch = Path(tmp)
        s = resolve_settings(args, scratch)
        env = _environment(s["device"])
        load = env.get("load_average_start", [0.0])[0]
        if s["device"] == "cpu" and load > 0.5 * (env["cpu_affinity"] or env["cpu_count"] or 1):
            log.warning("load average %.1f on %s CPUs: other programs share the cores, so multi-threaded "
                        "timings wait on each other (try --threads 1); ratios stay side by side",
                        load, env["cpu_count"])
        settings_path = scratch / "settings.json"
        settings_path.write_text(json.dumps(s))
        # KINDS order: the store goes first because it writes the pool cache the attack loads.
        for kind in [k for k in KINDS if k in args.kinds]:
            log.info("measuring %s in a fresh process", kind)
            result = _run_kind(kind, settings_path, scratch)
            if "error" in result:
                errors[kind] = result["error"]
                continue
            log.info("%s done in %.1f s", kind, result["worker_wall_s"])
            results[kind] = result
    if hasattr(os, "getloadavg"):
        env["load_average_end"] = list(os.getloadavg())
    rows = summarise(results, s["steps"][1])
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "settings": {k: v for k, v in s.items() if k not in ("scratch", "shared_cache")},
        "targets": TARGETS,
        "summary": rows,
        "results": results,
        "errors": errors,
        "total_wall_s": time.perf_counter() - started,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    threads = sorted({r["torch_threads"] for r in results.values()})
    sys.stdout.write(
        f"{env['device']} ({env['device_name']}), torch {env['torch']}, faiss {env['faiss']}, "
        f"{env['cpu_count']} CPUs, torch threads {threads}, load average {load:.1f}; "
        f"{s['model']} width {s['width']}, layer {s['layer']}, batch {s['batch']}, pool {s['pool']}, "
        f"search pool {s['search_pool']}, steps {s['steps'][0]}->{s['steps'][1]}, {s['repeats']} repeats"
        + (f"; attacks in {results['attack']['attack_precision']}"
           + (", channels-last" if s["attack_channels_last"] else "") if "attack" in results else "") + "\n"
    )
    sys.stdout.write(format_table(rows) + "\n")
    sys.stdout.write(f"total {report['total_wall_s']:.0f} s; bench.json in {out.resolve()}\n")
    for kind, message in errors.items():
        sys.stdout.write(f"{kind}: {message}\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
