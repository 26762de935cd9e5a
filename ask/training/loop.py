"""The epochs of a training run, from ``state.progress`` to ``train.epochs``.

One epoch = one pass over the (class-balanced) training split in a seeded random order, with
batched on-device augmentation. After every epoch ``last.pt`` is written and validated; a stop
signal ends the run at the next step with a checkpoint that resumes at that step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from ask.data import augment_batch, to_float
from ask.errors import NonFiniteLossError
from ask.training import distributed
from ask.training.checkpoints import append_metrics, keep_as_best, save_last
from ask.training.preemption import StopRequest, TrainingStopped
from ask.training.state import TrainingState
from ask.training.validation import validate
from ask.utils import precision
from ask.utils.runtime import to_device

log = logging.getLogger(__name__)


def run_epochs(state: TrainingState) -> None:
    """Train the remaining epochs; each one logged, saved, validated and, if best, kept as ``best.pt``.

    Raises :class:`TrainingStopped` on a stop signal (any rank's), once ``last.pt`` holds the progress.
    """
    run, group = state.run, state.group
    with StopRequest() as stop:
        for epoch in range(state.progress.epoch + 1, run.train.epochs + 1):
            record = train_epoch(state, epoch, stop)
            is_best = validate(state, record)
            if group.is_main:
                log.info("epoch %d: %s", epoch,
                         ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
                append_metrics(state.files.metrics, record)
            state.progress.epoch, state.progress.record = epoch, record
            save_last(state, state.order_rng.get_state())
            if is_best and group.is_main:
                keep_as_best(state)
            if group.any(stop.requested) and epoch < run.train.epochs:
                raise _stopped(state, stop, f"after epoch {epoch}", "it")


def train_epoch(state: TrainingState, epoch: int, stop: StopRequest) -> dict[str, Any]:
    """One pass over the training split (the rest of it, resumed mid-epoch); its metrics record."""
    state.model.train()
    epoch_order_state = state.order_rng.get_state()
    order = torch.randperm(len(state.data.train), generator=state.order_rng)
    sums, seconds_before, first_step = (0.0, 0, 0), 0.0, 0
    partial = state.progress.partial
    if partial is not None and partial["epoch"] == epoch:
        first_step, seconds_before = partial["step"], partial["seconds"]
        sums = state.progress.partial_sums
    state.progress.partial = None
    loss_sum, correct, seen = sums
    started = time.perf_counter()
    bar = tqdm(range(first_step, state.steps_per_epoch), desc=f"epoch {epoch}/{state.run.train.epochs}",
               disable=not (state.run.progress and state.group.is_main), leave=False)
    for step in bar:
        index = order[step * state.batch_size:(step + 1) * state.batch_size][state.group.rank::state.group.world_size]
        loss, batch_correct, used_lr = _train_step(state, index, epoch, step)
        loss_sum += loss * len(index)
        correct += batch_correct
        seen += len(index)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        if state.group.any(stop.requested) and step + 1 < state.steps_per_epoch:
            # Mid-epoch: the epoch's starting order state regenerates the same order on resume.
            save_last(state, epoch_order_state, {
                "epoch": epoch, "step": step + 1, "seconds": seconds_before + time.perf_counter() - started,
            }, sums=(loss_sum, correct, seen))
            raise _stopped(state, stop, f"at epoch {epoch}, step {step + 1}/{state.steps_per_epoch}", "that step")
    seconds = seconds_before + time.perf_counter() - started
    if state.group.enabled:
        loss_sum, correct_sum, seen_sum = state.group.sum([loss_sum, correct, seen])
        correct, seen = int(correct_sum), int(seen_sum)
    return {
        "epoch": epoch,
        "lr": used_lr,  # the rate of the epoch's last step, not the scheduler's next one
        "train_loss": loss_sum / seen,
        "train_acc": correct / seen,
        "seconds": seconds,
        "images_per_second": seen / seconds,
        # Summation order follows the thread count: a defence run moves by about a point with it.
        "torch_threads": torch.get_num_threads(),
    }


def _train_step(state: TrainingState, index: torch.Tensor, epoch: int, step: int) -> tuple[float, int, float]:
    """One optimisation step on the training images at ``index``: (loss, correct predictions, lr used)."""
    run, device = state.run, state.device
    images = to_float(to_device(state.data.train.images[index], device))
    labels = to_device(state.data.train.labels[index], device)
    images = augment_batch(images, run.dataset.augment, state.augment_rng)
    if run.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with precision.autocast(device, state.amp_dtype):
        loss, logits = state.step(images, labels)
    if not torch.isfinite(loss):
        last = state.files.last
        raise NonFiniteLossError(
            f"training loss became {loss.item()} at epoch {epoch}, step {step + 1}; "
            f"the last good checkpoint is {last if last.exists() else 'not written yet'}; "
            "lower train.lr or check the data"
        )
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    used_lr = state.optimizer.param_groups[0]["lr"]
    state.scheduler.step()
    return loss.item(), (logits.argmax(1) == labels).sum().item(), used_lr


def _stopped(state: TrainingState, stop: StopRequest, where: str, kept: str) -> TrainingStopped:
    """Hand the signal on (e.g. to submitit's requeue) once the checkpoint is safe; the error to raise."""
    stop.forward()
    return TrainingStopped(f"stopped by {stop.signal_name or 'a signal to another rank'} {where}; "
                           f"{state.files.last} holds {kept}; run the same command to resume")


def check_ranks_agree(state: TrainingState) -> None:
    """Under torchrun, refuse to finish unless every rank holds the same weights."""
    group = state.group
    if not group.enabled:
        return
    fingerprints = group.gather(distributed.parameter_fingerprint(state.model))
    if any(f != fingerprints[0] for f in fingerprints[1:]):
        raise RuntimeError("the ranks' weights diverged; DistributedDataParallel did not keep them in step")
    log.info("all %d ranks hold identical weights", group.world_size)
