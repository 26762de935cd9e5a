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
from tqdm.auto import tqdm

from ask.attacks import ThreatModel, build_attack
from ask.config.schema import RunConfig
from ask.data import DataBundle, ImageSplit, augment_batch, balanced_indices, load_dataset, to_float
from ask.defenses import DEFENSES, build_defense
from ask.errors import ConfigError, NonFiniteLossError
from ask.evaluation.evaluate import attack_seed, select_points
from ask.knn import KNNClassifier, ReferenceStore
from ask.models import FeatureModel, build_model
from ask.training.checkpoint import load_checkpoint, model_spec, save_checkpoint
from ask.utils.runtime import capture_rng_state, restore_rng_state, seed_everything, select_device

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def build_model_for(run: RunConfig, data: DataBundle) -> FeatureModel:
    return build_model(
        run.model.name,
        num_classes=data.num_classes,
        in_channels=data.in_channels,
        image_size=data.image_size,
        mean=data.mean,
        std=data.std,
        width=run.model.width,
    )


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


def robust_validation(run: RunConfig, model: FeatureModel, data: DataBundle, device: torch.device) -> dict[str, Any]:
    """Robust accuracy on the val split with the current weights, for model selection.

    On the first ``train.val_points`` points of a seeded shuffle of the val split: the network
    against PGD-CE and the kNN victim (``knn.layers[0]``, ``knn.k``) against ASK-Atk, both with
    ``run.attack``'s ball and budget and the hyperparameters of ``run.attack.methods`` where they
    are given. The kNN's reference store is rebuilt from the training pool with the current
    weights (no cache: the weights change every epoch). The attacks draw from their own seeded
    generators, the same every epoch, so epochs are compared on the same random starts and the
    training's random stream is left alone.

    Returns ``val_robust_dnn``, ``val_robust_knn``, ``val_knn_acc`` (clean kNN accuracy),
    ``val_points`` and ``val_seconds``.
    """
    assert data.val is not None and run.attack is not None
    started = time.perf_counter()
    settings = run.attack
    threat = ThreatModel(eps=settings.eps, norm=settings.norm, steps=settings.steps,
                         step_size=settings.step_size, random_start=settings.random_start)
    ask_hyper = dict(settings.methods.get("ask") or {})
    ask_hyper.setdefault("layers", list(run.knn.layers))
    ask_hyper.setdefault("k", run.knn.k)
    pgd_hyper = dict(settings.methods.get("pgd") or {})
    knn_layer = run.knn.layers[0]
    ask_layers = [ask_hyper["layers"]] if isinstance(ask_hyper["layers"], str) else list(ask_hyper["layers"])
    layers = list(dict.fromkeys([knn_layer, *ask_layers]))

    if run.knn.pool_per_class is None:
        pool = torch.arange(len(data.train))
    else:
        pool = balanced_indices(data.train.labels, run.knn.pool_per_class, torch.Generator().manual_seed(run.seed),
                                "knn.pool_per_class", data.classes)
    was_training = model.training
    model.eval()
    try:
        store = ReferenceStore.build(
            model, data.train.images[pool], data.train.labels[pool], layers, run.knn.metric, data.num_classes,
            pool_indices=pool, batch_size=run.knn.batch_size, device=device, progress=False,
            use_gpu_index=run.knn.use_gpu,
        )
        knn = KNNClassifier(model, store, knn_layer, run.knn.k)
        attacks = {
            name: build_attack(name, model, threat, store=store if name == "ask" else None,
                               generator=torch.Generator(device=device).manual_seed(attack_seed(run.seed, name)),
                               **hyper)
            for name, hyper in (("pgd", pgd_hyper), ("ask", ask_hyper))
        }
        points = select_points(data.val, run.train.val_points, run.seed)
        robust_dnn = robust_knn = clean_knn = 0
        batch_size = run.train.eval_batch_size
        for start in range(0, len(points), batch_size):
            images = to_float(points.images[start:start + batch_size].to(device))
            labels = points.labels[start:start + batch_size].to(device)
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
    total = run.train.epochs * steps_per_epoch
    if run.train.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=run.train.lr, total_steps=total, pct_start=0.25,
            anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0,
        )
    if run.train.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _plain_config(run: RunConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(run), resolve=True)  # type: ignore[return-value]


def _truncate_metrics(path: Path, completed_epochs: int) -> None:
    """On resume, forget epochs logged after the checkpoint we restart from."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line)["epoch"] <= completed_epochs]
    path.write_text("".join(line + "\n" for line in kept))


def train(run: RunConfig, output_dir: str | Path, data: DataBundle | None = None) -> dict[str, Any]:
    """Train ``run.model`` with ``run.defense`` and return the summary (also written to ``train_summary.json``)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(run.device)
    seed_everything(run.seed, run.deterministic)
    if data is None:
        data = load_dataset(run.dataset, run.cache_dir, seed=run.seed, progress=run.progress)
    model = build_model_for(run, data).to(device)
    use_cuda_tricks = device.type == "cuda"
    if use_cuda_tricks and run.train.channels_last:
        model = model.to(memory_format=torch.channels_last)

    context = _defense_context(run.defense.name, {"train_split": data.train, "knn_layers": list(run.knn.layers)})
    defense = build_defense(run.defense.name, model, dict(run.defense.params),
                            label_smoothing=run.train.label_smoothing, **context)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=run.train.lr, momentum=run.train.momentum,
        nesterov=run.train.nesterov and run.train.momentum > 0, weight_decay=run.train.weight_decay,
    )
    n_train = len(data.train)
    batch_size = min(run.train.batch_size, n_train)
    # A final batch of one image would break batch norm; it is dropped.
    steps_per_epoch = n_train // batch_size + (1 if n_train % batch_size >= 2 else 0)
    scheduler = _make_scheduler(optimizer, run, steps_per_epoch)
    order_rng = torch.Generator().manual_seed(run.seed)
    augment_rng = torch.Generator(device=device).manual_seed(run.seed + 1)

    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    metrics_path = output_dir / METRICS_FILE
    spec = model_spec(run.model.name, run.model.width, data.num_classes, data.in_channels,
                      data.image_size, data.mean, data.std)
    start_epoch, best_metric = 0, -math.inf
    resume_from = Path(run.train.resume).expanduser() if run.train.resume else last_path
    if run.train.resume or last_path.exists():
        state = load_checkpoint(resume_from)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        order_rng.set_state(state["order_rng"])
        augment_rng.set_state(state["augment_rng"].to(augment_rng.get_state().device))
        restore_rng_state(state["rng"])
        start_epoch, best_metric = state["epoch"], state["best_metric"]
        log.info("resuming from %s after epoch %d", resume_from, start_epoch)
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
    amp = use_cuda_tricks and run.train.amp
    for epoch in range(start_epoch + 1, run.train.epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(n_train, generator=order_rng)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{run.train.epochs}",
                   disable=not run.progress, leave=False)
        for step in bar:
            index = order[step * batch_size:(step + 1) * batch_size]
            images = to_float(data.train.images[index].to(device, non_blocking=True))
            labels = data.train.labels[index].to(device, non_blocking=True)
            images = augment_batch(images, run.dataset.augment, augment_rng)
            if use_cuda_tricks and run.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss, logits = defense.loss(images, labels)
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
        seconds = time.perf_counter() - started
        record: dict[str, Any] = {
            "epoch": epoch,
            "lr": used_lr,  # the rate of the epoch's last step, not the scheduler's next one
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "seconds": seconds,
            "images_per_second": seen / seconds,
        }
        is_best = not has_val
        if has_val and (epoch % run.train.eval_every == 0 or epoch == run.train.epochs):
            record["val_acc"] = accuracy(model, data.val, device, run.train.eval_batch_size)
            if robust_val:
                record.update(robust_validation(run, model, data, device))
            is_best = record[select_metric] > best_metric
            best_metric = max(best_metric, record[select_metric])
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "epoch"))
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        save_checkpoint(last_path, {
            "model": spec,
            "state_dict": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best_metric": best_metric,
            "metrics": record,
            "order_rng": order_rng.get_state(),
            "augment_rng": augment_rng.get_state().cpu(),
            "rng": capture_rng_state(),
            "classes": list(data.classes),
            "dataset": run.dataset.name,
            "config": _plain_config(run),
        })
        if is_best:
            # Copy, not re-save: best.pt is byte-for-byte the epoch it names.
            tmp = best_path.with_suffix(".pt.tmp")
            shutil.copyfile(last_path, tmp)
            tmp.replace(best_path)

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
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("test accuracy of %s: %.4f", best_path, summary["test_acc"])
    return summary
