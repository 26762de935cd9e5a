"""The training loop behind ``ask-train``.

One epoch = one pass over the (class-balanced) training split in a seeded random order, with
batched on-device augmentation. After every epoch ``last.pt`` is written atomically; ``best.pt``
follows the selection metric on the validation split (or the last epoch when there is none):
``train.select_metric`` is the clean accuracy (``val_acc``), or the robust accuracy under the run's
attack settings of the network against PGD-CE (``val_robust_dnn``) or of the kNN victim against
ASK-Atk (``val_robust_knn``, SPEC's model selection), on at most ``train.val_points`` val points.
A rerun in the same directory, or ``train.resume=PATH``, continues from the last complete epoch
with the optimiser, schedule and every RNG state restored.
"""

from __future__ import annotations

import bisect
import contextlib
import inspect
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ask.config.schema import RunConfig
from ask.data import (
    DataBundle,
    ImageSplit,
    augment_batch,
    load_dataset,
    select_points,
    to_float,
)
from ask.defenses import DEFENSES, build_defense
from ask.errors import ConfigError, NonFiniteLossError
from ask.knn import KNNClassifier
from ask.models import FeatureModel
from ask.models.checkpoint import (
    check_compatible,
    load_checkpoint,
    load_weights,
    model_spec,
    save_checkpoint,
)
from ask.training import distributed
from ask.training.preemption import StopRequest, TrainingStopped
from ask.utils import precision
from ask.utils.io import atomic_write_text
from ask.utils.rundir import run_lock
from ask.utils.runtime import (
    capture_rng_state,
    configure_backends,
    restore_generator,
    restore_rng_state,
    seed_everything,
    select_device,
    to_device,
)
from ask.wiring import build_attacks, build_exact_store, build_model_for, build_threat_model

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


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
    against PGD-CE and the kNN victim (``knn.layers[0]``, ``knn.k``) against ASK-Atk, both with
    ``run.attack``'s ball and budget and the settings of the run's ``ask`` and ``pgd`` attacks where
    they are among ``attack.methods`` (otherwise the attacks' own defaults, ASK-Atk on ``knn.layers``
    with ``knn.k``). The kNN's reference store is rebuilt from the training pool with the current
    weights (no cache: the weights change every epoch). The attacks draw from their own seeded
    generators, the same every epoch, so epochs are compared on the same random starts and the
    training's random stream is left alone. The attacks run under the training's autocast
    (``amp_dtype``); the victims judge in fp32.

    Returns ``val_robust_dnn``, ``val_robust_knn``, ``val_knn_acc`` (clean kNN accuracy),
    ``val_points`` and ``val_seconds``.
    """
    assert data.val is not None and run.attack is not None
    started = time.perf_counter()
    threat = build_threat_model(run)
    selected = run.attack.methods
    ask_settings = run.attack.settings("ask") if "ask" in selected else {"layers": list(run.knn.layers),
                                                                         "k": run.knn.k}
    pgd_settings = run.attack.settings("pgd") if "pgd" in selected else {}
    knn_layer = run.knn.layers[0]
    ask_layers = ask_settings.layers if "ask" in selected else run.knn.layers
    layers = list(dict.fromkeys([knn_layer, *ask_layers]))

    was_training = model.training
    model.eval()
    try:
        store = build_exact_store(run, model, data, layers, device)
        knn = KNNClassifier(model, store, knn_layer, run.knn.k)
        attacks = build_attacks(run, model, threat, store, device, {"pgd": pgd_settings, "ask": ask_settings})
        points = select_points(data.val, run.train.val_points, run.seed)
        robust_dnn = robust_knn = clean_knn = 0
        batch_size = run.train.eval_batch_size
        for start in range(0, len(points), batch_size):
            images = to_float(points.images[start:start + batch_size].to(device))
            labels = points.labels[start:start + batch_size].to(device)
            with precision.autocast(device, amp_dtype):
                x_pgd = attacks["pgd"](images, labels)
                x_ask = attacks["ask"](images, labels)
            with torch.no_grad():
                robust_dnn += int((model(x_pgd).argmax(1) == labels).sum())
                robust_knn += int((knn.predict(x_ask) == labels).sum())
                clean_knn += int((knn.predict(images) == labels).sum())
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


def _defense_context(name: str, available: dict[str, Any]) -> dict[str, Any]:
    """The trainer-side inputs a defence's constructor names (e.g. ``train_split``); none for the others."""
    cls = DEFENSES.get(name)
    if cls is None:
        return {}
    accepted = inspect.signature(cls.__init__).parameters
    return {key: value for key, value in available.items() if key in accepted}


def _make_scheduler(optimizer: torch.optim.Optimizer, run: RunConfig, steps_per_epoch: int):
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


def _plain_config(run: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(run), resolve=True)  # type: ignore[return-value]


def _truncate_metrics(path: Path, completed_epochs: int) -> None:
    """On resume, forget epochs logged after the checkpoint we restart from."""
    records = [record for record in _read_metrics(path) if record["epoch"] <= completed_epochs]
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # written before writes were atomic: a torn last line
            log.warning("ignoring a malformed line of %s", path)
    return records


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Rewrite the (small) log atomically, so a kill mid-write never leaves half a line."""
    records = [*_read_metrics(path), record]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class _DefenseStep(nn.Module):
    """A defence's whole training loss as one module, so DistributedDataParallel wraps the step.

    Its inner maximisation runs inside this forward with the parameters frozen, so only the outer
    loss reaches the parameters and DDP averages exactly the gradients of the training loss.
    """

    def __init__(self, defense: Any) -> None:
        super().__init__()
        self.model = defense.model
        self.defense = defense

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.defense.loss(images, labels)


def _steps_per_epoch(n_train: int, batch_size: int, world_size: int) -> int:
    # A final batch with fewer than two images per rank would break batch norm; it is dropped.
    return n_train // batch_size + (1 if n_train % batch_size >= 2 * world_size else 0)


def train(run: RunConfig, output_dir: str | Path, data: DataBundle | None = None) -> dict[str, Any]:
    """Train ``run.model`` with ``run.defense`` and return the summary (also written to ``train_summary.json``).

    Under ``torchrun`` every rank calls this with the same ``output_dir``; rank 0 alone writes.
    """
    output_dir = Path(output_dir)
    group = distributed.current()
    if group.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(output_dir) if group.is_main else contextlib.nullcontext():
        return _train(run, output_dir, data, group)


def _train(run: RunConfig, output_dir: Path, data: DataBundle | None, group: distributed.Distributed) -> dict[str, Any]:
    device = group.device(select_device(run.device))
    # Each rank draws its own random starts and augmentations; the model is broadcast from rank 0.
    seed_everything(run.seed + group.rank, run.deterministic)
    configure_backends(device, run.deterministic, run.tf32)
    if data is None:
        # Rank 0 decodes and caches the dataset first; the others then read its cache.
        if not group.is_main:
            group.barrier()
        data = load_dataset(run.dataset, run.cache_dir, seed=run.seed, progress=run.progress and group.is_main)
        if group.is_main:
            group.barrier()
    model = build_model_for(run, data).to(device)
    amp_dtype = precision.resolve_amp(run.train.amp, device)
    if group.is_main:
        log.info(precision.describe(run.train.amp, amp_dtype, device, "training"))
    if run.train.channels_last:
        model = model.to(memory_format=torch.channels_last)

    context = _defense_context(run.defense.name, {"train_split": data.train, "knn_layers": list(run.knn.layers),
                                                  "augment": run.dataset.augment})
    defense = build_defense(run.defense.name, model, run.defense.settings(),
                            label_smoothing=run.train.label_smoothing, **context)
    step_module: Any = defense.loss
    if group.enabled:
        step_module = DistributedDataParallel(_DefenseStep(defense),
                                              device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=run.train.lr, momentum=run.train.momentum,
        nesterov=run.train.nesterov and run.train.momentum > 0, weight_decay=run.train.weight_decay,
    )
    n_train = len(data.train)
    batch_size = min(run.train.batch_size, n_train)
    if batch_size < 2 * group.world_size:
        raise ConfigError(f"train.batch_size={batch_size} gives fewer than 2 images to each of "
                          f"{group.world_size} processes; raise train.batch_size")
    steps_per_epoch = _steps_per_epoch(n_train, batch_size, group.world_size)
    scheduler = _make_scheduler(optimizer, run, steps_per_epoch)
    order_rng = torch.Generator().manual_seed(run.seed)
    augment_rng = torch.Generator(device=device).manual_seed(run.seed + 1 + 1000 * group.rank)

    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    metrics_path = output_dir / METRICS_FILE
    spec = model_spec(run.model.name, run.model.width, data.num_classes, data.in_channels,
                      data.image_size, model.config.get("mean", data.mean), model.config.get("std", data.std),
                      normalize=model.input_normalized)
    spec.update({key: model.config[key] for key in ("arch", "target", "kwargs") if key in model.config})
    start_epoch, best_metric = 0, -math.inf
    partial: dict[str, Any] | None = None
    previous_record: dict[str, Any] = {}
    resume_from = Path(run.train.resume).expanduser() if run.train.resume else last_path
    if run.train.resume or last_path.exists():
        state = load_checkpoint(resume_from, setting="train.resume")
        check_compatible(state["model"], resume_from, model_name=run.model.name, num_classes=data.num_classes,
                         in_channels=data.in_channels, image_size=data.image_size)
        saved_train = state["config"]["train"]
        current_train = _plain_config(run)["train"]
        if run.train.schedule != "constant" and _schedule_key(saved_train) != _schedule_key(current_train):
            # The schedule's shape comes from the config, its position from the checkpoint: resuming
            # under another shape would silently change the run.
            saved, settings = _describe_schedule(saved_train)
            current, _ = _describe_schedule(current_train)
            fresh = "drop train.resume" if run.train.resume else "choose a new hydra.run.dir"
            raise ConfigError(
                f"{resume_from} follows a {saved_train['schedule']} schedule{saved}, not {run.train.schedule}{current}; "
                f"set {settings} to resume it, or {fresh} to start afresh"
            )
        load_weights(model, state["state_dict"], resume_from, "train.resume")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        order_rng.set_state(state["order_rng"])
        rank_state = _rank_state(state, group)
        restore_generator(augment_rng, rank_state["augment_rng"], "augmentation")
        restore_rng_state(rank_state["rng"])
        defense.load_state_dict(rank_state.get("defense") or {})
        start_epoch, best_metric = state["epoch"], state["best_metric"]
        partial = state.get("partial")
        saved_world = len(state.get("rank_states") or [None])
        if partial is not None and saved_world != group.world_size:
            raise ConfigError(
                f"{resume_from} was saved mid-epoch by {saved_world} process(es); resume it with "
                f"torchrun --nproc_per_node={saved_world} (each process holds part of the epoch)"
            )
        partial_sums = rank_state["sums"]
        previous_record = state["metrics"]
        where = f"epoch {start_epoch}" + (f" and step {partial['step']} of epoch {partial['epoch']}" if partial else "")
        log.info("resuming from %s after %s", resume_from, where)
        if group.is_main:
            _truncate_metrics(metrics_path, start_epoch)

    has_val = data.val is not None and len(data.val) > 0
    select_metric = run.train.select_metric
    robust_val = has_val and run.train.val_points != 0 and run.attack is not None
    if select_metric != "val_acc":
        if not has_val:
            log.warning("train.select_metric=%s but there is no val split: best.pt is the last epoch; "
                        "set dataset.val_per_class", select_metric)
        elif run.attack is None:
            raise ConfigError(f"train.select_metric={select_metric} needs the attack settings; add attack=[ask,pgd]")

    def checkpoint(epoch: int, record: dict[str, Any], order_state: torch.Tensor,
                   partial_state: dict[str, Any] | None = None, sums: tuple[float, int, int] | None = None) -> None:
        """Write ``last.pt`` (rank 0); every rank's random state (and, mid-epoch, its running sums)
        goes in, so every rank can resume."""
        ranks = group.gather({"rng": capture_rng_state(), "augment_rng": augment_rng.get_state().cpu(),
                              "sums": sums, "defense": defense.state_dict()})
        if group.is_main:
            save_checkpoint(last_path, {
                "model": spec,
                "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best_metric": best_metric,
                "metrics": record,
                "order_rng": order_state,
                "augment_rng": ranks[0]["augment_rng"],
                "rng": ranks[0]["rng"],
                "defense": ranks[0]["defense"],
                "rank_states": ranks if group.enabled else None,
                "partial": None if partial_state is None else {**partial_state, "sums": ranks[0]["sums"]},
                "classes": list(data.classes),
                "dataset": run.dataset.name,
                "config": _plain_config(run),
            })
        group.barrier()

    def stop_here(stop: StopRequest, where: str, kept: str) -> TrainingStopped:
        """Hand the signal on (e.g. to submitit's requeue) once the checkpoint is safe; the error to raise."""
        stop.forward()
        return TrainingStopped(f"stopped by {stop.signal_name or 'a signal to another rank'} {where}; "
                               f"{last_path} holds {kept}; run the same command to resume")

    with StopRequest() as stop:
        for epoch in range(start_epoch + 1, run.train.epochs + 1):
            model.train()
            epoch_order_state = order_rng.get_state()
            order = torch.randperm(n_train, generator=order_rng)
            loss_sum, correct, seen, seconds_before, first_step = 0.0, 0, 0, 0.0, 0
            if partial is not None and partial["epoch"] == epoch:
                first_step, seconds_before = partial["step"], partial["seconds"]
                loss_sum, correct, seen = partial_sums
            partial = None
            started = time.perf_counter()
            bar = tqdm(range(first_step, steps_per_epoch), desc=f"epoch {epoch}/{run.train.epochs}",
                       disable=not (run.progress and group.is_main), leave=False)
            for step in bar:
                index = order[step * batch_size:(step + 1) * batch_size][group.rank::group.world_size]
                images = to_float(to_device(data.train.images[index], device))
                labels = to_device(data.train.labels[index], device)
                images = augment_batch(images, run.dataset.augment, augment_rng)
                if run.train.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with precision.autocast(device, amp_dtype):
                    loss, logits = step_module(images, labels)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"training loss became {loss.item()} at epoch {epoch}, step {step + 1}; "
                        f"the last good checkpoint is {last_path if last_path.exists() else 'not written yet'}; "
                        "lower train.lr or check the data"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                used_lr = optimizer.param_groups[0]["lr"]
                scheduler.step()
                loss_sum += loss.item() * len(index)
                correct += (logits.argmax(1) == labels).sum().item()
                seen += len(index)
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
                if group.any(stop.requested) and step + 1 < steps_per_epoch:
                    # Mid-epoch: the epoch's starting order state regenerates the same order on resume.
                    checkpoint(epoch - 1, previous_record, epoch_order_state, {
                        "epoch": epoch, "step": step + 1, "seconds": seconds_before + time.perf_counter() - started,
                    }, sums=(loss_sum, correct, seen))
                    raise stop_here(stop, f"at epoch {epoch}, step {step + 1}/{steps_per_epoch}", "that step")
            seconds = seconds_before + time.perf_counter() - started
            if group.enabled:
                loss_sum, correct_sum, seen_sum = group.sum([loss_sum, correct, seen])
                correct, seen = int(correct_sum), int(seen_sum)
            record: dict[str, Any] = {
                "epoch": epoch,
                "lr": used_lr,  # the rate of the epoch's last step, not the scheduler's next one
                "train_loss": loss_sum / seen,
                "train_acc": correct / seen,
                "seconds": seconds,
                "images_per_second": seen / seconds,
            }
            is_best = not has_val
            if group.is_main and has_val and (epoch % run.train.eval_every == 0 or epoch == run.train.epochs):
                record["val_acc"] = accuracy(model, data.val, device, run.train.eval_batch_size)
                if robust_val:
                    record.update(robust_validation(run, model, data, device, amp_dtype))
                is_best = record[select_metric] > best_metric
                best_metric = max(best_metric, record[select_metric])
            if group.is_main:
                log.info("epoch %d: %s", epoch,
                         ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
                _append_metrics(metrics_path, record)
            checkpoint(epoch, record, order_rng.get_state())
            previous_record = record
            if is_best and group.is_main:
                # Copy, not re-save: best.pt is byte-for-byte the epoch it names.
                tmp = best_path.with_suffix(".pt.tmp")
                shutil.copyfile(last_path, tmp)
                tmp.replace(best_path)
            if group.any(stop.requested) and epoch < run.train.epochs:
                raise stop_here(stop, f"after epoch {epoch}", "it")

    if group.enabled:
        fingerprints = group.gather(distributed.parameter_fingerprint(model))
        if any(f != fingerprints[0] for f in fingerprints[1:]):
            raise RuntimeError("the ranks' weights diverged; DistributedDataParallel did not keep them in step")
        log.info("all %d ranks hold identical weights", group.world_size)
    if not group.is_main:
        return {"rank": group.rank}

    if not best_path.exists() and last_path.exists():
        shutil.copyfile(last_path, best_path)
    best = load_checkpoint(best_path)
    model.load_state_dict(best["state_dict"])
    summary = {
        "dataset": run.dataset.name,
        "model": run.model.name,
        "defense": run.defense.name,
        "epochs": run.train.epochs,
        "best_epoch": best["epoch"],
        "n_train": n_train,
        "n_test": len(data.test),
        "world_size": group.world_size,
        "precision": precision.precision_name(amp_dtype),
        # Reported, never used for selection: the test split only measures the kept checkpoint.
        "test_acc": accuracy(model, data.test, device, run.train.eval_batch_size),
        "checkpoint": str(best_path),
        "config": _plain_config(run),
    }
    if has_val:
        summary["select_metric"] = select_metric
        summary[f"best_{select_metric}"] = best_metric
        summary["best_val_metrics"] = {key: value for key, value in best["metrics"].items()
                                       if key.startswith("val_")}
    atomic_write_text(output_dir / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    log.info("test accuracy of %s: %.4f", best_path, summary["test_acc"])
    return summary


def _rank_state(state: dict[str, Any], group: distributed.Distributed) -> dict[str, Any]:
    """This rank's saved random state; a checkpoint from another world size only has rank 0's."""
    ranks = state.get("rank_states")
    if ranks and len(ranks) == group.world_size:
        return ranks[group.rank]
    if group.enabled:
        log.warning("the checkpoint was written by %d process(es), this run has %d: the random streams restart",
                    len(ranks) if ranks else 1, group.world_size)
    partial = state.get("partial") or {}
    return {"rng": state["rng"], "augment_rng": state["augment_rng"], "sums": partial.get("sums"),
            "defense": state.get("defense")}
