"""What every console script shares: Hydra wiring and one-line errors.

A problem with the user's input (:class:`ask.errors.AskError`) is printed as one line on stderr
and the process exits with status 2, without a traceback; files already written stay as they
were. In a multirun sweep any failing job (a user error or a crash) writes ``failure.json`` into
its directory and the sweep goes on with the other jobs, whatever the launcher (basic, joblib,
submitit): the sweep's report names the failures.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
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
            _record_failure(output_dir, error)
            return None
        print(message, file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print(f"{program}: interrupted; completed epochs and written files are kept", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:
        if not _is_multirun():
            raise
        # One crashed job must not take the rest of a week-long sweep with it.
        log.exception("%s: job failed with %s", program, type(error).__name__)
        _record_failure(output_dir, error, traceback.format_exc())
        return None


def _record_failure(output_dir: Path, error: BaseException, trace: str | None = None) -> None:
    """Write the job's ``failure.json``, which ``ask-report`` lists beside the results."""
    record = {"error": str(error), "type": type(error).__name__}
    if trace:
        record["traceback"] = trace
    (output_dir / "failure.json").write_text(json.dumps(record) + "\n")


def unknown_group_options(arguments: list[str], conf: Path) -> str | None:
    """The first ``group=option`` argument naming an option that ``conf/<group>/`` lacks, as a message.

    Hydra reports such a typo with its search path but without the choices, and not at all
    helpfully for lists (``attack=[ask,cw]``); this says what exists instead.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    candidates = [a for a in arguments if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # malformed input: Hydra's own parser will explain it
        return None
    for override in overrides:
        group = override.key_or_group.lstrip("+~")
        folder = conf / group
        # hydra/* groups also take the plugins' options (hydra/launcher=joblib), which live outside conf/.
        if (override.package or "." in group or group.startswith("hydra/") or not folder.is_dir()
                or override.is_delete()):
            continue
        value = override.value()
        values = value.list if isinstance(value, ChoiceSweep) else [value]
        flat = [item for v in values for item in (v if isinstance(v, list) else [v])]
        available = sorted(path.stem for path in folder.glob("*.yaml"))
        for option in flat:
            if isinstance(option, str) and option not in available and option != "null":
                return f"unknown {group} '{option}'; available: {', '.join(available)}"
    return None


def hydra_entry(task: Callable[[RunConfig, Path], Any], config_name: str, program: str) -> None:
    """Run ``task`` as a Hydra application over the packaged config tree."""
    register_configs()
    problem = unknown_group_options(sys.argv[1:], Path(config_dir()))
    if problem:
        print(f"{program}: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)

    def _main(cfg: DictConfig) -> Any:
        return run_task(task, cfg, program)

    hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(_main)()
