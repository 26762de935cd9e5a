"""``ask-train``: train a backbone plainly or with a defence (``defense=...``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ask.cli.common import hydra_entry
from ask.config import RunConfig
from ask.utils.runfiles import RUN_FILES

log = logging.getLogger(__name__)


def train_task(run: RunConfig, output_dir: Path) -> float:
    from ask.training import distributed
    from ask.training.trainer import train  # torch-heavy imports after argument parsing
    from ask.utils.rundir import continue_unfinished_run

    group = distributed.current()
    files = RUN_FILES["train"]
    done = output_dir / files.done
    # The directory was claimed for these settings, so a summary there is this run's: nothing to do.
    if group.broadcast(done.is_file()):
        log.info("%s already holds the finished run of these settings; nothing to do (overwrite=true trains "
                 "it again)", output_dir)
        return float("nan") if not group.is_main else float(json.loads(done.read_text())["test_acc"])
    if group.is_main and not run.train.resume:
        continue_unfinished_run(output_dir, files)
    group.barrier()
    summary: dict[str, Any] = train(run, output_dir)
    if not group.is_main:
        return float("nan")
    print(f"\ntest accuracy {summary['test_acc']:.4f} (best epoch {summary['best_epoch']}); "
          f"checkpoint {summary['checkpoint']}")
    return float(summary["test_acc"])


def main() -> None:
    hydra_entry(train_task, "train", "ask-train")


if __name__ == "__main__":
    main()
