"""``ask-attack``: evaluate attacks x victims on the test split and write ``metrics.json``.

Without ``model.checkpoint`` (and without ``model.weights``), a dataset that allows it
(``dataset.auto_train``) has its default model trained first, once, and cached: training then
evaluation, put together here so that neither package imports the other.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from ask.cli.common import hydra_entry
from ask.config import RunConfig
from ask.constants import ANY_ATTACK
from ask.errors import CheckpointError, ConfigError
from ask.utils.runfiles import (
    AUTO_TRAIN_LOCK_FILE,
    BEST_CHECKPOINT,
    EVAL_STATE_FILE,
    METRICS_FILE,
    PER_POINT_FILE,
    RUN_FILES,
    TRAIN_SUMMARY_FILE,
)

if TYPE_CHECKING:
    from ask.data import DataBundle

log = logging.getLogger(__name__)


def _lowest_robust_accuracy(metrics: dict[str, Any]) -> float:
    """What a sweeper would minimise: the lowest robust accuracy found (that of a per-point
    worst-case `any` row)."""
    return min(row["robust_acc"] for row in metrics["results"])


def auto_checkpoint(run: RunConfig, data: DataBundle) -> Path:
    """Train the dataset's default model once and cache it, keyed by everything that shapes it."""
    from ask.models.checkpoint import load_checkpoint  # torch-heavy imports after argument parsing
    from ask.training.trainer import train
    from ask.utils import precision
    from ask.utils.rundir import run_lock
    from ask.utils.runtime import select_device

    if not run.dataset.auto_train:
        raise ConfigError(
            f"no model.checkpoint given for dataset '{run.dataset.name}'; train one with "
            f"`ask-train dataset={run.dataset.name} ...` and pass model.checkpoint=PATH/{BEST_CHECKPOINT}"
        )
    recipe = {
        "dataset": OmegaConf.to_container(OmegaConf.structured(run.dataset)),
        "model": OmegaConf.to_container(OmegaConf.structured(replace(run.model, checkpoint=None))),
        "train": OmegaConf.to_container(OmegaConf.structured(replace(run.train, resume=None))),
        "defense": OmegaConf.to_container(OmegaConf.structured(run.defense)),
        "seed": run.seed,
        # train.amp=auto trains in bf16 on one machine and in fp32 on another: two different models
        "precision": precision.precision_name(precision.resolve_amp(run.train.amp, select_device(run.device))),
    }
    key = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    directory = Path(run.cache_dir).expanduser() / "models" / f"{run.dataset.name}-{run.model.name}-{key}"
    best = directory / BEST_CHECKPOINT
    # Parallel sweep jobs wanting the same model: the first trains it, the others wait and reuse it.
    with run_lock(directory, wait=True, name=AUTO_TRAIN_LOCK_FILE):
        if best.exists() and (directory / TRAIN_SUMMARY_FILE).exists():
            try:
                load_checkpoint(best)
            except CheckpointError as error:
                # A cache entry is rebuilt, not repaired by the user: model.checkpoint is not theirs to fix.
                log.warning("the cached %s model %s is damaged; training it again", run.dataset.name, best)
                log.debug("why the cached model was refused: %s", error)
                for name in RUN_FILES["train"].names:
                    (directory / name).unlink(missing_ok=True)
            else:
                log.info("using the cached %s model %s", run.dataset.name, best)
                return best
        log.info("no model.checkpoint given: training a %s on %s once (cached in %s)",
                 run.model.name, run.dataset.name, directory)
        train(replace(run, train=replace(run.train, resume=None)), directory, data=data)
    return best


def _with_default_model(run: RunConfig) -> tuple[RunConfig, DataBundle | None]:
    """``run`` itself when it names its network; else ``run`` with ``model.checkpoint`` set to the
    dataset's default model (trained here if not cached) and the data it was loaded with."""
    from ask.data import load_dataset
    from ask.evaluation.job import check_calibration_split

    if run.model.checkpoint or run.model.weights:
        return run, None
    data = load_dataset(run.dataset, run.cache_dir, seed=run.seed, progress=run.progress)
    check_calibration_split(run, data)  # a run that cannot be evaluated stops before training
    checkpoint = auto_checkpoint(run, data)
    return replace(run, model=replace(run.model, checkpoint=str(checkpoint))), data


def print_results(run: RunConfig, metrics: dict[str, Any], output_dir: Path) -> None:
    """The console table of ``metrics.json``, with its worst-case note and warnings."""
    from ask.reporting import format_results_table

    assert run.attack is not None
    rows = metrics["results"]
    print(f"\n{run.dataset.name} / {run.model.name} / layer {run.knn.layers[0]} / "
          f"{run.attack.norm} eps={run.attack.eps:.4g} / {metrics['n_points']} points\n")
    print(format_results_table(rows))
    worst = next(row for row in rows if row["attack"] == ANY_ATTACK)
    print(f"(any: the per-point worst case over {', '.join(worst['attacks'])}; a point is robust only "
          f"if right on x and every attack failed on it; per point: {PER_POINT_FILE})")
    for warning in metrics["warnings"]:
        print(f"warning: {warning}")
    print(f"\nwrote {output_dir / METRICS_FILE}")


def attack_task(run: RunConfig, output_dir: Path) -> float:
    from ask.evaluation.job import run_attack_job  # torch-heavy imports after argument parsing
    from ask.training import distributed
    from ask.training.preemption import stop_on_sigterm
    from ask.utils.rundir import continue_unfinished_run, run_lock

    group = distributed.current()
    if group.enabled:
        # An evaluation is one process's work: world_size copies would write the same files. Rank 0
        # leaves the group and evaluates as a process of its own (a model it trains on the fly
        # included), the others stop here.
        group.barrier()
        distributed.shutdown()
        if not group.is_main:
            return float("nan")
        log.warning("ask-attack under torchrun: rank 0 evaluates alone and the other %d process(es) exit; "
                    "ask-attack needs no torchrun", group.world_size - 1)
    done = output_dir / METRICS_FILE
    if done.is_file():  # the directory was claimed for these settings, so these are its results
        log.info("%s already holds the results of these settings; nothing to do (overwrite=true computes them "
                 "again)", output_dir)
        return _lowest_robust_accuracy(json.loads(done.read_text()))

    def stopped(signal_name: str) -> str:
        return (f"stopped by {signal_name}; the completed batches ({EVAL_STATE_FILE}) in {output_dir} are kept; "
                "run the same command to resume")

    # Two evaluations in one directory would overwrite each other's state.
    with run_lock(output_dir), stop_on_sigterm(stopped):
        # The same command after a crash picks up the crashed evaluation's per-batch state.
        continue_unfinished_run(output_dir, RUN_FILES["attack"])
        run, data = _with_default_model(run)
        metrics = run_attack_job(run, output_dir, data=data)
        print_results(run, metrics, output_dir)
    return _lowest_robust_accuracy(metrics)


def main() -> None:
    hydra_entry(attack_task, "attack", "ask-attack")


if __name__ == "__main__":
    main()
