"""``ask-train``: train a backbone plainly or with a defence (``defense=...``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ask.cli.common import hydra_entry
from ask.config import RunConfig

log = logging.getLogger("ask")


def train_task(run: RunConfig, output_dir: Path) -> float:
    from ask.training import distributed
    from ask.training.trainer import train  # torch-heavy imports after argument parsing

    group = distributed.current()
    if group.is_main:
        continue_unfinished_run(run, output_dir)
    group.barrier()
    summary: dict[str, Any] = train(run, output_dir)
    if not group.is_main:
        return float("nan")
    print(f"\ntest accuracy {summary['test_acc']:.4f} (best epoch {summary['best_epoch']}); "
          f"checkpoint {summary['checkpoint']}")
    return float(summary["test_acc"])


def continue_unfinished_run(run: RunConfig, output_dir: Path) -> None:
    """The same command after a crash continues the crashed run instead of starting over.

    Only for a fresh directory (one with ``last.pt`` resumes by itself) and no ``train.resume``.
    """
    from omegaconf import OmegaConf

    from ask.training.rundir import adopt_run, find_unfinished_run

    if run.train.resume or (output_dir / "last.pt").exists() or not (output_dir / "config.yaml").exists():
        return
    config = OmegaConf.to_container(OmegaConf.load(output_dir / "config.yaml"), resolve=True)
    source = find_unfinished_run(output_dir, config)  # type: ignore[arg-type]
    if source is not None:
        log.info("continuing the unfinished run %s (same config) in %s", source, output_dir)
        adopt_run(source, output_dir)


def main() -> None:
    hydra_entry(train_task, "train", "ask-train")


if __name__ == "__main__":
    main()
