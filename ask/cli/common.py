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

from ask.config import RunConfig, SettingsSection, config_dir, register_configs, resolve
from ask.errors import AskError, ConfigError, RunDirectoryError, os_error_message
from ask.training.preemption import RunStopped
from ask.utils.io import atomic_write_text

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
    from ask.utils.rundir import RUN_FILES, claim_run_directory, run_lock

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
    atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    records = output_dir / ".hydra"
    atomic_write_text(records / "config.yaml", OmegaConf.to_yaml(cfg))
    try:
        hydra_config = HydraConfig.instance().cfg
    except ValueError:  # not under hydra.main (a test calling run_task): nothing more to record
        return
    if hydra_config is not None:
        atomic_write_text(records / "hydra.yaml", OmegaConf.to_yaml(hydra_config))
        atomic_write_text(records / "overrides.yaml", OmegaConf.to_yaml(hydra_config.hydra.overrides.task))


# What an interrupted run leaves for the same command to continue from.
_PROGRESS = {"ask-train": "completed epochs (last.pt)", "ask-attack": "completed batches (eval_state.pt)"}


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
    (output_dir / "failure.json").write_text(json.dumps(record) + "\n")


def config_search_path(arguments: list[str], conf: Path) -> list[Path]:
    """The config folders Hydra composes from: ``conf`` and the user's own, in Hydra's order.

    A user's folder comes from ``--config-dir DIR`` (``-cd``), ``--config-path DIR`` (``-cp``) or a
    ``hydra.searchpath=[file://DIR, pkg://module]`` override; its groups and options count as much
    as the shipped ones.
    """
    folders: list[Path] = []
    flags = ("--config-dir", "-cd", "--config-path", "-cp")
    for i, argument in enumerate(arguments):
        name, has_value, value = argument.partition("=")
        if name in flags:
            value = value if has_value else (arguments[i + 1] if i + 1 < len(arguments) else "")
            if value:
                folders.append(Path(value).expanduser())
        elif name.lstrip("+") == "hydra.searchpath" and has_value:
            entries = value.strip().removeprefix("[").removesuffix("]").split(",")
            for entry in entries:
                found = _search_path_entry(entry.strip().strip("'\""))
                if found is not None:
                    folders.append(found)
    return [*folders, conf]


def _search_path_entry(entry: str) -> Path | None:
    """The folder a ``hydra.searchpath`` entry names (``file://DIR``, ``pkg://module.path`` or a bare path)."""
    if entry.startswith("pkg://"):
        import importlib.util

        module, _, rest = entry.removeprefix("pkg://").partition("/")
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(next(iter(spec.submodule_search_locations))) / rest
    path = entry.removeprefix("file://")
    return Path(path).expanduser() if path else None


def unknown_group_options(arguments: list[str], folders: list[Path]) -> str | None:
    """The first ``group=option`` argument naming an option that no ``<folder>/<group>/`` holds, or one
    option twice (``attack=[pgd,pgd]``), as a message.

    Hydra reports such a typo with its search path but without the choices, and not at all
    helpfully for lists (``attack=[ask,cw]``); this says what exists instead. ``folders`` is
    :func:`config_search_path`: options in a user's ``--config-dir`` are as good as shipped ones.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    candidates = [a for a in arguments if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # malformed input: Hydra's own parser will explain it
        return None
    for argument, override in zip(candidates, overrides, strict=True):
        group = override.key_or_group.lstrip("+~")
        group_folders = [folder / group for folder in folders if (folder / group).is_dir()]
        # hydra/* groups also take the plugins' options (hydra/launcher=joblib), which live outside conf/.
        if (override.package or "." in group or group.startswith("hydra/") or not group_folders
                or override.is_delete()):
            continue
        value = override.value()
        values = value.list if isinstance(value, ChoiceSweep) else [value]
        flat = [item for v in values for item in (v if isinstance(v, list) else [v])]
        available = sorted({path.stem for folder in group_folders for path in folder.glob("*.yaml")})
        for option in flat:
            if isinstance(option, str) and option not in available and option != "null":
                return f"unknown {group} '{option}'; available: {', '.join(available)}"
        repeated = next((o for i, o in enumerate(flat) if o in flat[:i]), None)
        if repeated is not None and not isinstance(value, ChoiceSweep):
            # Hydra merges the repeat away: the run would have fewer attacks than the command says.
            once = ",".join(str(o) for o in dict.fromkeys(flat))
            return f"{argument} names '{repeated}' twice; name each {group} once, e.g. {group}=[{once}]"
    return None


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def bad_settings(arguments: list[str], folders: list[Path]) -> str | None:
    """The first ``key=value`` argument naming a setting the schema lacks, or a value of the wrong type.

    Hydra refuses both too, but after several lines of OmegaConf detail and with exit status 1;
    this says it in one line, listing the settings that exist. An attack's settings
    (``attack.methods.<name>.<key>``) are checked against its typed settings, and so are
    ``defense.params.<key>`` when the command names the defence (``defense=at``); values that Hydra
    resolves later (``${...}``) are left to :func:`ask.config.resolve`.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    candidates = [a for a in arguments if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:  # malformed input: Hydra's own parser will explain it
        return None
    defense = next((o.value() for o in overrides if o.key_or_group == "defense" and not o.package
                    and isinstance(o.value(), str)), None)
    for argument, override in zip(candidates, overrides, strict=True):
        key = override.key_or_group
        if (override.package or override.is_delete() or override.is_add() or override.is_force_add()
                or key.startswith("hydra") or "/" in key
                or ("." not in key and any((folder / key).is_dir() for folder in folders))):
            continue
        value = override.value()
        if override.is_sweep_override() and not isinstance(value, ChoiceSweep):
            continue  # range() and interval() sweeps: Hydra checks their bounds
        values = value.list if isinstance(value, ChoiceSweep) else [value]
        problem = _check_setting(key, values, argument.split("=", 1)[1], defense)
        if problem:
            return problem
    return None


def _check_setting(key: str, values: list[Any], text: str, defense: str | None) -> str | None:
    """Walk ``key`` down the :class:`RunConfig` dataclasses and try ``values`` on the field it names."""
    import dataclasses
    import types
    import typing

    from omegaconf import MISSING
    from omegaconf.errors import OmegaConfBaseException

    section = _settings_section(key, defense)
    if section is not None:
        for item in values:
            if not (isinstance(item, str) and "${" in item):  # an interpolation: checked at resolve
                try:
                    section.check(key.rsplit(".", 1)[1], item)
                except ConfigError as error:
                    return str(error)
        return None
    node: Any = RunConfig
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(node):
            return None  # a free-form section such as attack.methods: the attack or defence checks it
        hints = typing.get_type_hints(node)
        if part not in hints:
            section = ".".join(parts[:depth])
            where = f"{section} has" if section else "the settings are"
            return f"unknown setting '{key}'; {where}: {', '.join(sorted(hints))}"
        annotation, default = hints[part], _default(node, part)
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        node = options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else annotation
    if dataclasses.is_dataclass(node) or node is Any:
        return None
    probe = OmegaConf.structured(
        dataclasses.make_dataclass("Probe", [("v", annotation, dataclasses.field(default=MISSING))])
    )
    expected = annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None: say what X is
        expected = next(a for a in typing.get_args(annotation) if a is not type(None))
    for item in values:
        if isinstance(item, str) and "${" in item:
            continue  # an interpolation: resolved, and type-checked, at composition
        try:
            probe.v = item
        except OmegaConfBaseException:
            shown = text if len(values) == 1 else f"{text} ({item!r})"
            if typing.get_origin(expected) is list:
                return f"{key}={shown} is not a list; write it as {key}=[{item}]"
            if item is None:
                return f"{key}=null is not allowed; give {_TYPE_NAMES.get(expected, 'a value')}"
            example = "" if default is None else f"; e.g. {key}={default}"
            return f"{key}={shown} is not {_TYPE_NAMES.get(expected, 'a valid value')}{example}"
    return None


def _settings_section(key: str, defense: str | None) -> SettingsSection | None:
    """The attack's or the named defence's settings that ``key`` falls in, if it does."""
    parts = key.split(".")
    try:
        if len(parts) == 4 and parts[:2] == ["attack", "methods"]:
            return SettingsSection.of_attack(parts[2])
        if len(parts) == 3 and parts[:2] == ["defense", "params"] and defense is not None:
            return SettingsSection.of_defense(defense)
    except ConfigError:  # an unknown attack or defence: Hydra names the options
        return None
    return None


def _default(cls: Any, name: str) -> Any:
    """The schema's default for field ``name`` of dataclass ``cls``, or None when it has none."""
    import dataclasses

    from omegaconf import MISSING

    for f in dataclasses.fields(cls):
        if f.name == name and f.default is not dataclasses.MISSING and f.default != MISSING:
            return str(f.default).lower() if isinstance(f.default, bool) else f.default
    return None


def hydra_entry(task: Callable[[RunConfig, Path], Any], config_name: str, program: str) -> None:
    """Run ``task`` as a Hydra application over the packaged config tree."""
    register_configs()
    folders = config_search_path(sys.argv[1:], Path(config_dir()))
    problem = (unknown_group_options(sys.argv[1:], folders) or bad_settings(sys.argv[1:], folders)
               or unusable_output_dir(sys.argv[1:]))
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
            where = ", ".join(str(path / "failure.json") for path in FAILED_JOBS[:3])
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
        status = _exit_status(stop.code)
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


def unusable_output_dir(arguments: list[str]) -> str | None:
    """The first ``hydra.run.dir=`` / ``hydra.sweep.dir=`` argument whose path runs into a file, as a message.

    Hydra would fail creating it with a traceback; the nearest existing ancestor must be a folder.
    """
    for argument in arguments:
        key, _, value = argument.partition("=")
        if key not in ("hydra.run.dir", "hydra.sweep.dir") or not value or "${" in value:
            continue
        path = Path(value).expanduser()
        for candidate in (path, *path.parents):
            if candidate.is_dir():
                break
            if candidate.is_symlink() and not candidate.exists():
                return f"{key}={value}: '{candidate}' is a broken link or a loop of links; fix the link or choose another {key}"
            if candidate.exists():
                return f"{key}={value}: '{candidate}' is a file, not a folder; choose another {key}"
    return None


def _exit_status(code: Any) -> int:
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
