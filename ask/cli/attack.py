"""``ask-attack``: evaluate attacks x victims on the test split and write ``metrics.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ask.cli.common import hydra_entry
from ask.config import RunConfig

log = logging.getLogger(__name__)


def _lowest_robust_accuracy(metrics: dict[str, Any]) -> float:
    """What a sweeper would minimise: the lowest robust accuracy found (that of a per-point
    worst-case `any` row)."""
    return min(row["robust_acc"] for row in metrics["results"])


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
    done = output_dir / "metrics.json"
    if done.is_file():  # the directory was claimed for these settings, so these are its results
        log.info("%s already holds the results of these settings; nothing to do (overwrite=true computes them "
                 "again)", output_dir)
        return _lowest_robust_accuracy(json.loads(done.read_text()))

    def stopped(signal_name: str) -> str:
        return (f"stopped by {signal_name}; the completed batches (eval_state.pt) in {output_dir} are kept; "
                "run the same command to resume")

    # Two evaluations in one directory would overwrite each other's state.
    with run_lock(output_dir), stop_on_sigterm(stopped):
        # The same command after a crash picks up the crashed evaluation's per-batch state.
        continue_unfinished_run(output_dir, "eval_state.pt", "metrics.json", ("eval_state.pt",))
        metrics = run_attack_job(run, output_dir)
    return _lowest_robust_accuracy(metrics)


def main() -> None:
    hydra_entry(attack_task, "attack", "ask-attack")


if __name__ == "__main__":
    main()
