"""Resuming a training run from ``last.pt`` (a rerun in the same directory) or ``train.resume``."""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from ask.errors import CheckpointError, ConfigError
from ask.models.checkpoint import check_compatible, load_checkpoint, load_weights
from ask.training.checkpoints import copy_checkpoint, truncate_metrics
from ask.training.distributed import Distributed
from ask.training.state import Progress, TrainingState, plain_config
from ask.utils.rundir import config_differences
from ask.utils.runtime import restore_generator, restore_rng_state

log = logging.getLogger(__name__)

# The optimiser's settings come back with its state; the batch size sets the schedule's steps per epoch.
RESTORED_TRAIN_SETTINGS = ("optimizer", "lr", "momentum", "nesterov", "weight_decay", "batch_size")
_SHOWN_DIFFERENCES = 8  # a defence switched with its budget can change a handful of settings at once


def resume(state: TrainingState) -> None:
    """Restore weights, optimiser, schedule, every random stream and ``state.progress`` from the
    checkpoint to continue, if there is one: ``train.resume``, else ``last.pt`` of the run directory.

    A checkpoint resumed into a new directory brings along the ``metrics.jsonl`` lines of its epochs
    and its ``best.pt``, when one beside it holds the best score carried on.

    Refused with a :class:`ConfigError`: another network or dataset shape, another schedule shape,
    other optimiser settings or batch size, another rule for ``best.pt`` once an epoch has been
    scored, and a mid-epoch checkpoint of another number of processes.
    """
    run = state.run
    resume_from = Path(run.train.resume).expanduser() if run.train.resume else state.files.last
    if not (run.train.resume or state.files.last.exists()):
        return
    saved = load_checkpoint(resume_from, setting="train.resume")
    check_compatible(saved["model"], resume_from, model_name=run.model.name, num_classes=state.data.num_classes,
                     in_channels=state.data.in_channels, image_size=state.data.image_size)
    current = plain_config(run)
    saved_train, current_train, given = saved["config"]["train"], current["train"], bool(run.train.resume)
    _check_schedule(saved_train, current_train, given, resume_from)
    _check_restored(saved_train, current_train, given, resume_from)
    if math.isfinite(saved["best_metric"]):
        _check_selection(saved_train, current_train, given, resume_from)
    _warn_of_other_settings(saved["config"], current, resume_from, saved["epoch"])
    load_weights(state.model, saved["state_dict"], resume_from, "train.resume")
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.order_rng.set_state(saved["order_rng"])
    rank_state = _rank_state(saved, state.group)
    restore_generator(state.augment_rng, rank_state["augment_rng"], "augmentation")
    restore_rng_state(rank_state["rng"])
    state.defense.load_state_dict(rank_state.get("defense") or {})
    partial = saved.get("partial")
    saved_world = len(saved.get("rank_states") or [None])
    if partial is not None and saved_world != state.group.world_size:
        raise ConfigError(
            f"{resume_from} was saved mid-epoch by {saved_world} process(es); resume it with "
            f"torchrun --nproc_per_node={saved_world} (each process holds part of the epoch)"
        )
    best_metric = saved["best_metric"]
    if math.isfinite(best_metric) and not state.files.best.exists():
        best_metric = _carry_best(resume_from, saved, state)
    state.progress = Progress(epoch=saved["epoch"], best_metric=best_metric, record=saved["metrics"],
                              partial=partial, partial_sums=rank_state["sums"])
    where = f"epoch {saved['epoch']}" + (f" and step {partial['step']} of epoch {partial['epoch']}" if partial else "")
    log.info("resuming from %s after %s", resume_from, where)
    if state.group.is_main:
        # A new directory starts with the checkpoint's history, so that one metrics.jsonl holds the
        # whole run (its kept epoch among it), as a continued run's does.
        history = resume_from.with_name(state.files.metrics.name)
        if not state.files.metrics.exists() and history.is_file():
            shutil.copyfile(history, state.files.metrics)
        truncate_metrics(state.files.metrics, saved["epoch"])


def _check_schedule(saved: dict[str, Any], current: dict[str, Any], given: bool, path: Path) -> None:
    """The schedule's shape comes from the config, its position from the checkpoint: resuming under
    another shape would silently change the run. ``saved`` and ``current`` are ``train`` configs;
    ``given``: the checkpoint is ``train.resume``'s rather than the run directory's."""
    if current["schedule"] == "constant" or _schedule_key(saved) == _schedule_key(current):
        return
    saved_details, settings = _describe_schedule(saved)
    current_details, _ = _describe_schedule(current)
    raise ConfigError(
        f"{path} follows a {saved['schedule']} schedule{saved_details}, not {current['schedule']}{current_details}; "
        f"set {settings} to resume it, or {_afresh(given)} to start afresh"
    )


def _check_restored(saved: dict[str, Any], current: dict[str, Any], given: bool, path: Path) -> None:
    """torch's ``load_state_dict`` brings the optimiser's lr, momentum, Nesterov flag and weight decay
    back with its state, so a resumed run would ignore new values while its ``config.yaml`` claimed
    them; the batch size fixes how many steps an epoch is, which is where the restored schedule
    stands. Arguments as :func:`_check_schedule`'s."""
    changed = [key for key in RESTORED_TRAIN_SETTINGS if key in saved and saved[key] != current[key]]
    if not changed:
        return
    was = " ".join(f"train.{key}={_override_value(saved[key])}" for key in changed)
    wanted = " ".join(f"train.{key}={_override_value(current[key])}" for key in changed)
    raise ConfigError(f"{path} was trained with {was}, not {wanted}; a resumed run keeps the checkpoint's optimiser "
                      f"settings and steps per epoch, so set {was} to resume it, or {_afresh(given)} to start afresh")


def _override_value(value: Any) -> str:
    """``value`` as a command-line override spells it."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _check_selection(saved: dict[str, Any], current: dict[str, Any], given: bool, path: Path) -> None:
    """``best.pt`` is the best epoch so far under the saved selection rule, and its score is carried
    on: resuming under another rule would compare the new epochs with a score of the old one, and
    keep a ``best.pt`` that neither rule picked. Arguments as :func:`_check_schedule`'s."""
    if _selection_key(saved) == _selection_key(current):
        return
    metric, floor = _selection_key(saved)
    raise ConfigError(
        f"{path} kept best.pt by {_describe_selection(saved)}, not by {_describe_selection(current)}; "
        f"set train.select_metric={metric} train.select_min_val_acc={floor} to resume it, or {_afresh(given)} to start afresh"
    )


def _carry_best(resume_from: Path, saved: dict[str, Any], state: TrainingState) -> float:
    """The best score carried on from ``train.resume`` needs its epoch's weights in this directory:
    without them a new epoch that does not beat it is never kept, and the run would end by calling
    its last epoch best. Copy ``best.pt`` from beside the checkpoint when it holds that score; else
    restart the selection among this run's epochs (the returned score, -inf) and say so."""
    source = resume_from.with_name(state.files.best.name)
    try:
        best = load_checkpoint(source, setting="train.resume") if source.exists() else None
    except CheckpointError as error:
        log.warning("%s", error)
        best = None
    if best is not None and best.get("best_metric") == saved["best_metric"] and best["epoch"] <= saved["epoch"]:
        if state.group.is_main:
            copy_checkpoint(source, state.files.best)
        log.info("best.pt so far is epoch %d of %s, copied in", best["epoch"], source)
        return saved["best_metric"]
    log.warning("%s has no best.pt beside it holding its best epoch so far (score %.4f), so best.pt will be the best "
                "of the epochs this run trains", resume_from, saved["best_metric"])
    return -math.inf


def _warn_of_other_settings(saved: dict[str, Any], current: dict[str, Any], path: Path, epoch: int) -> None:
    """``train.resume`` (or the trainer called in a used directory) may continue a checkpoint under
    other settings: a longer schedule, another defence or label smoothing for the next epochs. ask-train
    refuses a changed config in the run directory itself (:func:`ask.utils.rundir.claim_run_directory`)
    but not in a checkpoint it is pointed at; say what changes, since this run's ``config.yaml``
    describes only the epochs after ``epoch``."""
    differences = config_differences(saved, current, shown=_SHOWN_DIFFERENCES)
    if differences:
        log.warning("%s was trained with other settings; epochs after %d follow this run's (%s)",
                    path, epoch, differences)


def _selection_key(train: dict[str, Any]) -> tuple[str, float]:
    """The rule that picks ``best.pt``; checkpoints from before the floor existed had none."""
    return train["select_metric"], float(train.get("select_min_val_acc", 0.0))


def _describe_selection(train: dict[str, Any]) -> str:
    metric, floor = _selection_key(train)
    return f"{metric} with a clean floor of {floor}" if floor > 0 else f"{metric} with no clean floor"


def _afresh(given: bool) -> str:
    """How to start afresh instead of resuming: ``given``, the checkpoint is ``train.resume``'s."""
    return "drop train.resume" if given else "choose a new hydra.run.dir"


def _schedule_key(train: dict[str, Any]) -> tuple[Any, ...]:
    """What a resumed run must share with the checkpoint's (a ``train`` config as plain data).

    One-cycle and cosine schedules are laid out over the whole run, so their length counts; a step
    schedule depends only on its milestones and factor, so such a run may be given more epochs.
    """
    schedule = train["schedule"]
    if schedule == "step":
        return schedule, tuple(train.get("step_milestones") or ()), float(train.get("step_gamma", 0.1))
    if schedule == "constant":
        return (schedule,)
    return schedule, train["epochs"]


def _describe_schedule(train: dict[str, Any]) -> tuple[str, str]:
    """(its details in words, e.g. ``" of 30 epochs"``; the overrides that select it) for a ``train`` config."""
    schedule = train["schedule"]
    if schedule == "step":
        milestones = "[" + ",".join(str(m) for m in train.get("step_milestones") or ()) + "]"
        gamma = train.get("step_gamma", 0.1)
        return (f" (lr x{gamma} after epochs {milestones})",
                f"train.schedule=step train.step_milestones={milestones} train.step_gamma={gamma}")
    if schedule == "constant":
        return "", "train.schedule=constant"
    n = train["epochs"]
    return f" of {n} epoch{'' if n == 1 else 's'}", f"train.epochs={n} train.schedule={schedule}"


def _rank_state(saved: dict[str, Any], group: Distributed) -> dict[str, Any]:
    """This rank's saved random state; a checkpoint from another world size only has rank 0's."""
    ranks = saved.get("rank_states")
    if ranks and len(ranks) == group.world_size:
        return ranks[group.rank]
    if group.enabled:
        log.warning("the checkpoint was written by %d process(es), this run has %d: the random streams restart",
                    len(ranks) if ranks else 1, group.world_size)
    partial = saved.get("partial") or {}
    return {"rng": saved["rng"], "augment_rng": saved["augment_rng"], "sums": partial.get("sums"),
            "defense": saved.get("defense")}
