"""What the training functions share: the run's parts, built once, and where the run stands."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ask.config.schema import RunConfig
from ask.data import DataBundle
from ask.defenses import Defense
from ask.models import FeatureModel
from ask.training.distributed import Distributed
from ask.utils.runfiles import BEST_CHECKPOINT, EPOCH_METRICS_FILE, LAST_CHECKPOINT, TRAIN_SUMMARY_FILE


@dataclass(frozen=True)
class TrainingPaths:
    """The files a training run writes in its directory (named in :mod:`ask.utils.runfiles`)."""

    directory: Path

    @property
    def last(self) -> Path:
        """The latest checkpoint, rewritten atomically after every epoch (and on a stop mid-epoch)."""
        return self.directory / LAST_CHECKPOINT

    @property
    def best(self) -> Path:
        """A byte-for-byte copy of ``last.pt`` of the epoch that is best by ``train.select_metric``."""
        return self.directory / BEST_CHECKPOINT

    @property
    def metrics(self) -> Path:
        """One JSON line of metrics per completed epoch."""
        return self.directory / EPOCH_METRICS_FILE

    @property
    def summary(self) -> Path:
        return self.directory / TRAIN_SUMMARY_FILE


@dataclass
class Progress:
    """Where the run stands; ``last.pt`` records it beside the weights, optimiser and random streams."""

    epoch: int = 0  # completed epochs
    best_metric: float = -math.inf
    record: dict[str, Any] = field(default_factory=dict)  # the metrics of the last completed epoch
    # Resumed from a stop mid-epoch: {"epoch", "step", "seconds"} to continue from, and the running
    # (loss sum, correct, seen) of this rank up to that step.
    partial: dict[str, Any] | None = None
    partial_sums: tuple[float, int, int] | None = None


@dataclass
class TrainingState:
    """One training run: its config and data, the parts built from them, and its :class:`Progress`."""

    run: RunConfig
    data: DataBundle
    group: Distributed
    device: torch.device
    amp_dtype: torch.dtype | None  # the autocast dtype of the steps and the attacks; None = fp32
    model: FeatureModel
    defense: Defense
    step: Any  # images, labels -> (loss, logits): the defence's loss, wrapped in DDP under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    order_rng: torch.Generator  # the order of the training split, the same on every rank
    augment_rng: torch.Generator  # this rank's augmentation draws
    batch_size: int  # images per step over all ranks
    steps_per_epoch: int
    spec: dict[str, Any]  # how the network was built, as the checkpoint records it
    files: TrainingPaths
    progress: Progress = field(default_factory=Progress)


def plain_config(run: RunConfig) -> dict[str, Any]:
    """The resolved config as plain data, as checkpoints and the summary store it."""
    return OmegaConf.to_container(OmegaConf.structured(run), resolve=True)  # type: ignore[return-value]
