"""Saving a training run: ``last.pt`` (atomic), ``best.pt`` (a copy of it) and ``metrics.jsonl``."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ask.models.checkpoint import save_checkpoint
from ask.training.state import TrainingState, plain_config
from ask.utils.io import atomic_write_text
from ask.utils.runtime import capture_rng_state

log = logging.getLogger(__name__)


def save_last(state: TrainingState, order_state: torch.Tensor, mid_epoch: dict[str, Any] | None = None,
              sums: tuple[float, int, int] | None = None) -> None:
    """Write ``last.pt`` (rank 0) at ``state.progress``: after its epoch, or stopped within the next
    one at ``mid_epoch`` (``{"epoch", "step", "seconds"}``) with each rank's running ``sums``.

    ``order_state`` regenerates the order of the epoch that follows (or, mid-epoch, of that epoch).
    Every rank's random state goes in, so every rank can resume; all ranks wait for the write.
    """
    group, progress = state.group, state.progress
    ranks = group.gather({"rng": capture_rng_state(), "augment_rng": state.augment_rng.get_state().cpu(),
                          "sums": sums, "defense": state.defense.state_dict()})
    if group.is_main:
        save_checkpoint(state.files.last, {
            "model": state.spec,
            "state_dict": state.model.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "epoch": progress.epoch,
            "best_metric": progress.best_metric,
            "metrics": progress.record,
            "order_rng": order_state,
            "augment_rng": ranks[0]["augment_rng"],
            "rng": ranks[0]["rng"],
            "defense": ranks[0]["defense"],
            "rank_states": ranks if group.enabled else None,
            "partial": None if mid_epoch is None else {**mid_epoch, "sums": ranks[0]["sums"]},
            "classes": list(state.data.classes),
            "dataset": state.run.dataset.name,
            "config": plain_config(state.run),
        })
    group.barrier()


def keep_as_best(state: TrainingState) -> None:
    """Make ``best.pt`` the epoch ``last.pt`` holds."""
    copy_checkpoint(state.files.last, state.files.best)


def copy_checkpoint(source: Path, target: Path) -> None:
    """``target`` becomes ``source`` byte for byte (a copy, not a re-save); written beside and
    renamed, so a kill never leaves half a file."""
    tmp = target.with_suffix(".pt.tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``, one per logged epoch (none if it does not exist)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # written before writes were atomic: a torn last line
            log.warning("ignoring a malformed line of %s", path)
    return records


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Rewrite the (small) log atomically, so a kill mid-write never leaves half a line."""
    _write_metrics(path, [*read_metrics(path), record])


def truncate_metrics(path: Path, completed_epochs: int) -> None:
    """On resume, forget epochs logged after the checkpoint we restart from."""
    records = [record for record in read_metrics(path) if record["epoch"] <= completed_epochs]
    if path.exists():
        _write_metrics(path, records)


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))
