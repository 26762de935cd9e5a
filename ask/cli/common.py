"""What every console script shares: Hydra wiring, the run directory's records and one-line errors.

A problem with the user's input (:class:`ask.errors.AskError`) is printed as one line on stderr
and the process exits with status 2, without a traceback; files already written stay as they
were. In a multirun sweep any failing job (a user error or a crash) writes ``failure.json`` into
its directory and the sweep goes on with the other jobs, whatever the launcher (basic, joblib,
submitit): the sweep's report names the failures. A job refused because its directory belongs to
another run writes nothing there.

The records of a run, ``config.yaml`` (resolved) and ``.hydra/`` (Hydra's composed config, its own
settings and the overrides; Hydra itself is told not to write them, ``hydra.output_subdir: null``),
are written only once the config passed validation and the directory is this run's: under its
lock, after :func:`ask.utils.rundir.claim_run_directory`. A refused or invalid command leaves a
live or finished run's records as they were.

The command line is checked before Hydra sees it, by :mod:`ask.cli.overrides`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ask.cli.overrides import command_line_problem
from ask.config import RunConfig, config_dir, register_configs, resolve
from ask.errors import AskError, ConfigError, RunDirectoryError, os_error_message
from ask.training.preemption import RunStopped
from ask.utils.io import atomic_write_text
from ask.utils.runfiles import (
    CONFIG_FILE,
    EVAL_STATE_FILE,
    FAILURE_FILE,
    HYDRA_FILE,
    HYDRA_RECORDS_DIR,
    LAST_CHECKPOINT,
    OVERRIDES_FILE,
    RUN_FILES,
)

log = logging.getLogger("ask")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_SWEEP_FAILED = 1  # some job of a -m sweep failed (its failure.json says why)
EXIT_STOPPED = 143  # 128 + SIGTERM, what a scheduler expects from a job that stopped on its signal


def _is_multirun() -> bool:
    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


def run_task(task: Callable[[RunConfig, Path], Any], cfg: DictConfig, program: str) -> Any:
    """Resolve ``cfg``, run ``task`` in the Hydra output directory, and turn user errors into one line."""
    from ask.training import distributed  # imports torch: after the arguments were checked

    output_dir = Path(HydraConfig.get().runtime.output_dir)
    group = distributed.current()
    try:
        run = resolve(cfg)
        from ask.wiring import check_run_settings  # inside: a missing faiss is one line too

        check_run_settings(run)  # a value out of range stops here, before any data loads or model trains
        with _own_run_directory(output_dir, cfg, run, group):
            return task(run, output_dir)
    except RunStopped as stopped:
        # Pre-emption is not a failure: the progress is written and the same command resumes.
        print(f"{program}: {stopped}", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    except KeyboardInterrupt:
        print(f"{program}: interrupted; the {_PROGRESS.get(program, 'files written')} in {output_dir} are kept; "
              "run the same command to continue", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as error:
        problem = user_problem(error)
        if problem is not None:
            message = f"{program}: error: {problem}"
            if _is_multirun():
                log.error(message)
                if not isinstance(error, RunDirectoryError):  # the directory is another run's
                    _record_failure(output_dir, error)
                return None
            print(message, file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        if not _is_multirun():
            raise
        # One crashed job must not take the rest of a week-long sweep with it.
        log.exception("%s: job failed with %s", program, type(error).__name__)
        _record_failure(output_dir, error, traceback.format_exc())
        return None


@contextmanager
def _own_run_directory(output_dir: Path, cfg: DictConfig, run: RunConfig, group: Any) -> Iterator[None]:
    """Hold the run directory's lock around the task and write its records once the directory is ours.

    Rank 0 of a ``torchrun`` group decides and tells the others, which neither lock nor write.
    """
    from ask.utils.rundir import claim_run_directory, run_lock

    if not group.is_main:
        refusal = group.broadcast(None)
        if refusal:
            raise ConfigError(refusal)
        yield
        return
    with ExitStack() as held:
        error: AskError | OSError | None = None
        try:
            held.enter_context(run_lock(output_dir, reentrant=True))
            config = OmegaConf.to_container(cfg, resolve=True)
            assert isinstance(config, dict)
            finished = run.task in RUN_FILES and claim_run_directory(output_dir, config, RUN_FILES[run.task],
                                                                     run.overwrite)
            if not finished:  # a finished run's records describe its results: they stay as they are
                _write_records(output_dir, cfg)
        except (AskError, OSError) as problem:  # OSError: a full disk under the lock; the other ranks must hear
            error = problem
        group.broadcast(str(error) if error else None)
        if error is not None:
            raise error
        yield


def _write_records(output_dir: Path, cfg: DictConfig) -> None:
    """``config.yaml`` resolved, and what Hydra would have written into ``.hydra/`` before the task."""
    atomic_write_text(output_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
    records = output_dir / HYDRA_RECORDS_DIR
    atomic_write_text(records / CONFIG_FILE, OmegaConf.to_yaml(cfg))
    try:
        hydra_config = HydraConfig.instance().cfg
    except ValueError:  # not under hydra.main (a test calling run_task): nothing more to record
        return
    if hydra_config is not None:
        atomic_write_text(records / HYDRA_FILE, OmegaConf.to_yaml(hydra_config))
        atomic_write_text(records / OVERRIDES_FILE, OmegaConf.to_yaml(hydra_config.hydra.overrides.task))


# What an interrupted run leaves for the same command to continue from.
_PROGRESS = {"ask-train": f"completed epochs ({LAST_CHECKPOINT})",
             "ask-attack": f"completed batches ({EVAL_STATE_FILE})"}


def user_problem(error: BaseException) -> str | None:
    """The one line to print for ``error`` when the user can fix it, else None (a bug: a traceback).

    Besides :class:`AskError`, the operating system's refusals that come from the user's paths or
    disks: a full disk, a folder where a file belongs (or the other way round), a symbolic link loop.
    """
    if isinstance(error, AskError):
        return str(error)
    if isinstance(error, OSError):
        return os_error_message(error)
    return None


def _record_failure(output_dir: Path, error: BaseException, trace: str | None = None) -> None:
    """Write the job's ``failure.json``, which ``ask-report`` lists beside the results."""
    record = {"error": str(error), "type": type(error).__name__}
    if trace:
        record["traceback"] = trace
    (output_dir / FAILURE_FILE).write_text(json.dumps(record) + "\n")


def hydra_entry(task: Callable[[RunConfig, Path], Any], config_name: str, program: str) -> None:
    """Run ``task`` as a Hydra application over the packaged config tree."""
    register_configs()
    problem = command_line_problem(sys.argv[1:], Path(config_dir()))
    if problem:
        print(f"{program}: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    # A log file on a full disk would print a traceback for every record ("--- Logging error ---"),
    # burying the one line that says what failed; the write that matters still fails with that line.
    logging.raiseExceptions = False

    def _main(cfg: DictConfig) -> Any:
        return run_task(task, cfg, program)

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        from ask.reporting.callback import FAILED_JOBS

        FAILED_JOBS.clear()  # what an earlier sweep in this process left
        hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(_main)()
        if FAILED_JOBS:  # a sweep: the others finished, but a scheduler must see that it is not all done
            where = ", ".join(str(path / FAILURE_FILE) for path in FAILED_JOBS[:3])
            more = f" and {len(FAILED_JOBS) - 3} more" if len(FAILED_JOBS) > 3 else ""
            print(f"{program}: error: {len(FAILED_JOBS)} sweep job(s) failed: see {where}{more}; fix them and "
                  "rerun those jobs", file=sys.stderr)
            sys.exit(EXIT_SWEEP_FAILED)
        return
    from ask.training import distributed  # a torchrun worker

    status = 0
    try:
        try:
            group = distributed.init_from_env()
        except AskError as error:  # ASK_DIST_TIMEOUT_MIN: before Hydra, so run_task cannot report it
            print(f"{program}: error: {error}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        sys.argv.extend(_rank_overrides(group, sys.argv[1:], program, config_name))
        hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(_main)()
    except SystemExit as stop:
        status = exit_status(stop.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        status = EXIT_INTERRUPTED
    except BaseException:  # what the interpreter would print before exiting with 1
        traceback.print_exc()
        status = 1
    # Only here, out of the except blocks, are the error and its traceback gone, and with them the
    # trainer's frames, whose DistributedDataParallel reducer would keep the process group alive.
    try:
        distributed.shutdown()
    except Exception:
        traceback.print_exc()
        status = status or 1
    _end_worker(status)


def exit_status(code: Any) -> int:
    """The status that ``sys.exit(code)`` ends the interpreter with: None is 0, a non-integer is printed and is 1."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF  # what the parent sees
    print(code, file=sys.stderr)
    return 1


def _end_worker(status: int) -> NoReturn:
    """End a ``torchrun`` worker with ``status`` the way multiprocessing ends its children: ``os._exit``.

    Belt and braces for :func:`ask.training.distributed.shutdown`: interpreter finalisation makes
    any C++ thread that still wants the GIL exit mid-destructor (std::terminate, SIGABRT), and a
    worker has such threads whenever something still holds a process group (gloo's run loops
    releasing a finished collective's tensors, NCCL's watchdog). Skipping finalisation leaves
    them nothing to trip over. Every file is written and closed by now; only the log handlers and
    the standard streams need flushing, and atexit handlers do not run.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing more can be said on it
            pass
    os._exit(status)


def _rank_overrides(group: Any, arguments: list[str], program: str, task: str) -> list[str]:
    """Hydra overrides that put every ``torchrun`` rank in rank 0's output directory (``<output_root>/<task>/...``).

    Hydra names the directory by the clock, which can tick between ranks, so rank 0 picks it and
    broadcasts it. The other ranks neither save Hydra's config copy nor open its log file there.
    """
    if any(a.startswith("-m") or a == "--multirun" for a in arguments):
        print(f"{program}: error: torchrun runs one job; drop -m or launch the sweep without torchrun",
              file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    extra = []
    if not any(a.startswith("hydra.run.dir=") for a in arguments):
        from datetime import datetime

        stamp = group.broadcast(datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
        extra.append(f"hydra.run.dir=${{output_root}}/{task}/{stamp}")
    if not group.is_main:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return extra
