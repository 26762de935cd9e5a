"""What every console script shares: Hydra wiring and one-line errors.

A problem with the user's input (:class:`ask.errors.AskError`) is printed as one line on stderr
and the process exits with status 2, without a traceback; files already written stay as they
were. In a multirun sweep the failing job writes ``failure.json`` into its directory and the
sweep goes on with the other jobs.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ask.config import RunConfig, config_dir, register_configs, resolve
from ask.errors import AskError

log = logging.getLogger("ask")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_task(task: Callable[[RunConfig, Path], Any], cfg: DictConfig, program: str) -> Any:
    """Resolve ``cfg``, run ``task`` in the Hydra output directory, and turn user errors into one line."""
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run = resolve(cfg)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
        return task(run, output_dir)
    except AskError as error:
        message = f"{program}: error: {error}"
        if _is_multirun():
            log.error(message)
            (output_dir / "failure.json").write_text(
                json.dumps({"error": str(error), "type": type(error).__name__}) + "\n"
            )
            return None
        print(message, file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"{program}: interrupted; completed epochs and written files are kept", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def hydra_entry(task: Callable[[RunConfig, Path], Any], config_name: str, program: str) -> None:
    """Run ``task`` as a Hydra application over the packaged config tree."""
    register_configs()

    def _main(cfg: DictConfig) -> Any:
        return run_task(task, cfg, program)

    hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(_main)()
