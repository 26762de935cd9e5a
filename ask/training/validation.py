"""Validation for model selection: clean accuracy and, with ``train.val_points``, robust accuracy.

``train.select_metric`` picks ``best.pt`` by the clean accuracy on the val split (``val_acc``), or
by the robust accuracy under the run's attack settings of the network against PGD-CE
(``val_robust_dnn``) or of the kNN victim against ASK-Atk (``val_robust_knn``, SPEC's model
selection). ``train.select_min_val_acc`` restricts the choice to epochs whose clean accuracy
reaches a floor, as the authors' selection does (:func:`selection_score`). The attacks and victims
come from the composition root (:mod:`ask.wiring`), as the evaluation's do.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ask.config.schema import RunConfig, TrainConfig
from ask.data import DataBundle, ImageSplit, select_points, to_float
from ask.errors import ConfigError
from ask.models import FeatureModel
from ask.training.state import TrainingState
from ask.utils import precision
from ask.wiring import build_selection_parts

log = logging.getLogger(__name__)


@torch.no_grad()
def accuracy(model: FeatureModel, split: ImageSplit, device: torch.device, batch_size: int = 512) -> float:
    """Clean top-1 accuracy of the network on a split, in eval mode (training flag restored)."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(split), batch_size):
        images = to_float(split.images[start:start + batch_size].to(device))
        labels = split.labels[start:start + batch_size].to(device)
        correct += (model(images).argmax(1) == labels).sum().item()
    model.train(was_training)
    return correct / max(len(split), 1)


def robust_validation(run: RunConfig, model: FeatureModel, data: DataBundle, device: torch.device,
                      amp_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Robust accuracy on the val split with the current weights, for model selection.

    On the first ``train.val_points`` points of a seeded shuffle of the val split: the network
    against PGD-CE and the kNN victim (``knn.layers[0]``, ``knn.k``) against ASK-Atk, as
    :func:`ask.wiring.build_selection_parts` builds them. The kNN's reference store is rebuilt from
    the training pool with the current weights (no cache: the weights change every epoch). The
    attacks draw from their own seeded generators, the same every epoch, so epochs are compared on
    the same random starts and the training's random stream is left alone. The attacks run under
    the training's autocast (``amp_dtype``); the victims judge in fp32.

    Returns ``val_robust_dnn``, ``val_robust_knn``, ``val_knn_acc`` (clean kNN accuracy),
    ``val_points`` and ``val_seconds``.
    """
    assert data.val is not None and run.attack is not None
    started = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        parts = build_selection_parts(run, model, data, device)
        dnn, knn = parts.victims["dnn"].judge, parts.victims["knn"].judge
        points = select_points(data.val, run.train.val_points, run.seed)
        robust_dnn = robust_knn = clean_knn = 0
        batch_size = run.train.eval_batch_size
        for start in range(0, len(points), batch_size):
            images = to_float(points.images[start:start + batch_size].to(device))
            labels = points.labels[start:start + batch_size].to(device)
            with precision.autocast(device, amp_dtype):
                x_pgd = parts.attacks["pgd"](images, labels)
                x_ask = parts.attacks["ask"](images, labels)
            with torch.no_grad():
                robust_dnn += int((dnn(x_pgd)[0] == labels).sum())
                robust_knn += int((knn(x_ask)[0] == labels).sum())
                clean_knn += int((knn(images)[0] == labels).sum())
    finally:
        model.train(was_training)
    n = max(len(points), 1)
    return {
        "val_robust_dnn": robust_dnn / n,
        "val_robust_knn": robust_knn / n,
        "val_knn_acc": clean_knn / n,
        "val_points": len(points),
        "val_seconds": time.perf_counter() - started,
    }


def selection_score(record: dict[str, Any], train: TrainConfig) -> float:
    """What ``best.pt`` maximises over the validated epochs: ``record[train.select_metric]``, moved
    below every eligible epoch's score when ``record["val_acc"]`` misses ``train.select_min_val_acc``.

    So an epoch under the clean-accuracy floor is kept only while no epoch has reached the floor
    (a run that never does still has a ``best.pt``, the best by the metric alone), and the first one
    to reach it replaces it whatever its metric. The metrics are fractions in [0, 1], so lowering
    by 2 orders every epoch under the floor below every epoch above it.
    """
    score = float(record[train.select_metric])
    if record["val_acc"] < train.select_min_val_acc:
        score -= 2.0
    return score


def check_selection(run: RunConfig, data: DataBundle) -> None:
    """Refuse a robust ``train.select_metric`` without attack settings, and a clean-accuracy floor
    without a val split; warn when a robust metric has no val split."""
    if run.train.select_min_val_acc > 0 and not has_val(data):
        raise ConfigError(f"train.select_min_val_acc={run.train.select_min_val_acc} needs a val split to "
                          "measure clean accuracy on; set dataset.val_per_class or drop the floor")
    select_metric = run.train.select_metric
    if select_metric == "val_acc":
        return
    if not has_val(data):
        log.warning("train.select_metric=%s but there is no val split: best.pt is the last epoch; "
                    "set dataset.val_per_class", select_metric)
    elif run.attack is None:
        raise ConfigError(f"train.select_metric={select_metric} needs the attack settings; add attack=[ask,pgd]")


def has_val(data: DataBundle) -> bool:
    return data.val is not None and len(data.val) > 0


def validate(state: TrainingState, record: dict[str, Any]) -> bool:
    """Whether the epoch ``record`` logs is the best so far, which makes it ``best.pt``.

    Without a val split every epoch is (``best.pt`` follows ``last.pt``). With one, rank 0 adds the
    val metrics to ``record`` every ``train.eval_every`` epochs and after the last; the other ranks
    and the epochs in between are never best.
    """
    run, data, progress = state.run, state.data, state.progress
    epoch = record["epoch"]
    if not has_val(data):
        return True
    if not state.group.is_main or not (epoch % run.train.eval_every == 0 or epoch == run.train.epochs):
        return False
    record["val_acc"] = accuracy(state.model, data.val, state.device, run.train.eval_batch_size)
    if run.train.val_points != 0 and run.attack is not None:
        record.update(robust_validation(run, state.model, data, state.device, state.amp_dtype))
    # best_metric holds the best selection score (the metric itself when there is no floor).
    score = selection_score(record, run.train)
    is_best = score > progress.best_metric
    progress.best_metric = max(progress.best_metric, score)
    return is_best
