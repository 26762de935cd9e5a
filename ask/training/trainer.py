"""``ask-train``'s training run: set up, resume, train the epochs, summarise.

The run's parts are built once into a :class:`~ask.training.state.TrainingState`; the jobs on it
are small functions of their own modules: :func:`~ask.training.resume.resume` (``last.pt`` or
``train.resume``), :func:`~ask.training.loop.run_epochs` (the epochs, stop signals),
:mod:`~ask.training.validation` (clean and robust validation, model selection),
:mod:`~ask.training.checkpoints` (``last.pt``, ``best.pt``, ``metrics.jsonl``) and :func:`summarise`
(``train_summary.json``). After every epoch ``last.pt`` is written atomically; ``best.pt`` follows
``train.select_metric`` on the validation split (or the last epoch when there is none). A rerun in
the same directory, or ``train.resume=PATH``, continues from the last complete epoch (or the step
a stop signal ended) with the optimiser, schedule and every RNG state restored.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ask.config.schema import RunConfig
from ask.data import DataBundle, load_dataset
from ask.defenses import DEFENSES, Defense, build_defense
from ask.errors import ConfigError
from ask.models import FeatureModel
from ask.models.checkpoint import load_checkpoint, model_spec
from ask.training import distributed
from ask.training.checkpoints import read_metrics
from ask.training.loop import check_ranks_agree, run_epochs
from ask.training.resume import resume
from ask.training.state import TrainingPaths, TrainingState, plain_config
from ask.training.validation import accuracy, check_selection, has_val
from ask.utils import precision
from ask.utils.io import atomic_write_text
from ask.utils.rundir import run_lock
from ask.utils.runtime import configure_backends, seed_everything, select_device
from ask.wiring import build_model_for

log = logging.getLogger(__name__)


def train(run: RunConfig, output_dir: str | Path, data: DataBundle | None = None) -> dict[str, Any]:
    """Train ``run.model`` with ``run.defense`` and return the summary (also written to ``train_summary.json``).

    Under ``torchrun`` every rank calls this with the same ``output_dir``; rank 0 alone writes.
    """
    output_dir = Path(output_dir)
    group = distributed.current()
    if group.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(output_dir) if group.is_main else contextlib.nullcontext():
        state = build_state(run, TrainingPaths(output_dir), data, group)
        resume(state)
        check_selection(run, state.data)
        run_epochs(state)
        check_ranks_agree(state)
        if not group.is_main:
            return {"rank": group.rank}
        return summarise(state)


def build_state(run: RunConfig, files: TrainingPaths, data: DataBundle | None,
                group: distributed.Distributed) -> TrainingState:
    """Seed, load the data (``data`` if given) and build the network, defence, optimiser, schedule
    and random streams of a fresh run, in this order (the network's initial weights draw from the
    seeded global stream)."""
    device = group.device(select_device(run.device))
    # Each rank draws its own random starts and augmentations; the model is broadcast from rank 0.
    seed_everything(run.seed + group.rank, run.deterministic)
    configure_backends(device, run.deterministic, run.tf32)
    data = data if data is not None else _load_data(run, group)
    model = build_model_for(run, data).to(device)
    amp_dtype = precision.resolve_amp(run.train.amp, device)
    if group.is_main:
        log.info(precision.describe(run.train.amp, amp_dtype, device, "training"))
    if run.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    context = defense_context(run.defense.name, {"train_split": data.train, "knn_layers": list(run.knn.layers),
                                                  "augment": run.dataset.augment})
    defense = build_defense(run.defense.name, model, run.defense.settings(),
                            label_smoothing=run.train.label_smoothing, **context)
    step: Any = defense.loss
    if group.enabled:
        step = DistributedDataParallel(_DefenseStep(defense), device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=run.train.lr, momentum=run.train.momentum,
        nesterov=run.train.nesterov and run.train.momentum > 0, weight_decay=run.train.weight_decay,
    )
    batch_size = min(run.train.batch_size, len(data.train))
    if batch_size < 2 * group.world_size:
        raise ConfigError(f"train.batch_size={batch_size} gives fewer than 2 images to each of "
                          f"{group.world_size} processes; raise train.batch_size")
    steps_per_epoch = _steps_per_epoch(len(data.train), batch_size, group.world_size)
    return TrainingState(
        run=run, data=data, group=group, device=device, amp_dtype=amp_dtype, model=model, defense=defense,
        step=step, optimizer=optimizer, scheduler=make_scheduler(optimizer, run, steps_per_epoch),
        order_rng=torch.Generator().manual_seed(run.seed),
        augment_rng=torch.Generator(device=device).manual_seed(run.seed + 1 + 1000 * group.rank),
        batch_size=batch_size, steps_per_epoch=steps_per_epoch, spec=_checkpoint_spec(run, model, data), files=files,
    )


def summarise(state: TrainingState) -> dict[str, Any]:
    """Load ``best.pt`` (``last.pt`` if no epoch was best), measure its test accuracy and write
    ``train_summary.json``; the summary it holds."""
    run, data, files = state.run, state.data, state.files
    if not files.best.exists() and files.last.exists():
        shutil.copyfile(files.last, files.best)
    best = load_checkpoint(files.best)
    state.model.load_state_dict(best["state_dict"])
    records = read_metrics(files.metrics)
    summary = {
        "dataset": run.dataset.name,
        "model": run.model.name,
        "defense": run.defense.name,
        "epochs": run.train.epochs,
        "best_epoch": best["epoch"],
        "n_train": len(data.train),
        "n_test": len(data.test),
        "world_size": state.group.world_size,
        "precision": precision.precision_name(state.amp_dtype),
        # Every thread count an epoch ran with (a resumed run may have changed it).
        "torch_threads": sorted({r["torch_threads"] for r in records if "torch_threads" in r}),
        # Reported, never used for selection: the test split only measures the kept checkpoint.
        "test_acc": accuracy(state.model, data.test, state.device, run.train.eval_batch_size),
        "checkpoint": str(files.best),
        "config": plain_config(run),
    }
    if has_val(data):
        select_metric = run.train.select_metric
        summary["select_metric"] = select_metric
        summary[f"best_{select_metric}"] = best["metrics"][select_metric]
        summary["best_val_metrics"] = {key: value for key, value in best["metrics"].items()
                                       if key.startswith("val_")}
        floor = run.train.select_min_val_acc
        if floor > 0:
            summary["select_min_val_acc"] = floor
            summary["select_floor_met"] = best["metrics"]["val_acc"] >= floor
            if not summary["select_floor_met"]:
                log.warning("no epoch reached train.select_min_val_acc=%s (the best val_acc was %.4f): best.pt is "
                            "epoch %d, the best by %s alone; lower the floor or train longer", floor,
                            max(r["val_acc"] for r in records if "val_acc" in r),
                            best["epoch"], select_metric)
    atomic_write_text(files.summary, json.dumps(summary, indent=2) + "\n")
    log.info("test accuracy of %s: %.4f", files.best, summary["test_acc"])
    return summary


def _load_data(run: RunConfig, group: distributed.Distributed) -> DataBundle:
    # Rank 0 decodes and caches the dataset first; the others then read its cache.
    if not group.is_main:
        group.barrier()
    data = load_dataset(run.dataset, run.cache_dir, seed=run.seed, progress=run.progress and group.is_main)
    if group.is_main:
        group.barrier()
    return data


def _checkpoint_spec(run: RunConfig, model: FeatureModel, data: DataBundle) -> dict[str, Any]:
    """How the network was built, as ``last.pt`` records it for :func:`ask.wiring.load_model`."""
    spec = model_spec(run.model.name, run.model.width, data.num_classes, data.in_channels,
                      data.image_size, model.config.get("mean", data.mean), model.config.get("std", data.std),
                      normalize=model.input_normalized)
    spec.update({key: model.config[key] for key in ("arch", "target", "kwargs") if key in model.config})
    return spec


def defense_context(name: str, available: dict[str, Any]) -> dict[str, Any]:
    """The trainer-side inputs a defence's constructor names (e.g. ``train_split``); none for the others."""
    cls = DEFENSES.get(name)
    if cls is None:
        return {}
    accepted = inspect.signature(cls.__init__).parameters
    return {key: value for key, value in available.items() if key in accepted}


def make_scheduler(optimizer: torch.optim.Optimizer, run: RunConfig,
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule, stepped once per optimisation step (``steps_per_epoch`` of them an epoch)."""
    total = run.train.epochs * steps_per_epoch
    if run.train.schedule == "onecycle":
        # torch divides by (pct_start * total - 1): a warm-up of exactly one step would divide by zero.
        pct_start = 0.25 if abs(0.25 * total - 1) > 1e-9 else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=run.train.lr, total_steps=total, pct_start=pct_start,
            anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0,
        )
    if run.train.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if run.train.schedule == "step":
        # MultiStepLR(milestones, gamma) stepped once per epoch, read off the step count: every step
        # of epoch e (0-based) runs at lr * gamma ** (number of milestones <= e).
        milestones, gamma = sorted(run.train.step_milestones), run.train.step_gamma
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: gamma ** bisect.bisect_right(milestones, step // steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _steps_per_epoch(n_train: int, batch_size: int, world_size: int) -> int:
    # A final batch with fewer than two images per rank would break batch norm; it is dropped.
    return n_train // batch_size + (1 if n_train % batch_size >= 2 * world_size else 0)


class _DefenseStep(nn.Module):
    """A defence's whole training loss as one module, so DistributedDataParallel wraps the step.

    Its inner maximisation runs inside this forward with the parameters frozen, so only the outer
    loss reaches the parameters and DDP averages exactly the gradients of the training loss.
    """

    def __init__(self, defense: Defense) -> None:
        super().__init__()
        self.model = defense.model
        self.defense = defense

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.defense.loss(images, labels)
