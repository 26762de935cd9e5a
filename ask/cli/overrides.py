"""Checks of a console script's command line before Hydra composes it: each problem in one line.

Hydra refuses an unknown config option, an unknown setting or a value of the wrong type too, but
after several lines of detail and with exit status 1, and it accepts a repeated list entry that it
then merges away; these checks say what is wrong and what exists instead. They parse the
arguments with Hydra's own ``OverridesParser``, once (:func:`parse_overrides`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override
from omegaconf import OmegaConf

from ask.config import RunConfig, SettingsSection
from ask.errors import ConfigError


def command_line_problem(arguments: list[str], conf: Path) -> str | None:
    """The first problem with ``arguments`` (a console script's ``sys.argv[1:]``) as a message, else None.

    ``conf`` is the shipped config folder; a user's ``--config-dir`` and ``hydra.searchpath``
    count as much (:func:`config_search_path`).
    """
    folders = config_search_path(arguments, conf)
    overrides = parse_overrides(arguments)
    return (unknown_group_options(overrides, folders) or bad_settings(overrides, folders)
            or unusable_output_dir(arguments))


def parse_overrides(arguments: list[str]) -> list[tuple[str, Override]]:
    """The ``key=value`` arguments, each with Hydra's parse of it; none when Hydra cannot parse them
    (Hydra's own parser explains malformed input better than a second guess would)."""
    candidates = [a for a in arguments if not a.startswith("-") and "=" in a]
    try:
        overrides = OverridesParser.create().parse_overrides(candidates)
    except Exception:
        return []
    return list(zip(candidates, overrides, strict=True))


def _choices(value: Any) -> list[Any]:
    """The values a ``key=a,b`` sweep (``ChoiceSweep``) runs, or the one value of a plain override."""
    return value.list if isinstance(value, ChoiceSweep) else [value]


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


def unknown_group_options(overrides: list[tuple[str, Override]], folders: list[Path]) -> str | None:
    """The first ``group=option`` override naming an option that no ``<folder>/<group>/`` holds, or one
    option twice (``attack=[pgd,pgd]``), as a message.

    Hydra reports such a typo with its search path but without the choices, and not at all
    helpfully for lists (``attack=[ask,cw]``); this says what exists instead. ``overrides`` is
    :func:`parse_overrides`; ``folders`` is :func:`config_search_path`: options in a user's
    ``--config-dir`` are as good as shipped ones.
    """
    for argument, override in overrides:
        group = override.key_or_group.lstrip("+~")
        group_folders = [folder / group for folder in folders if (folder / group).is_dir()]
        # hydra/* groups also take the plugins' options (hydra/launcher=joblib), which live outside conf/.
        if (override.package or "." in group or group.startswith("hydra/") or not group_folders
                or override.is_delete()):
            continue
        value = override.value()
        flat = [item for v in _choices(value) for item in (v if isinstance(v, list) else [v])]
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


def bad_settings(overrides: list[tuple[str, Override]], folders: list[Path]) -> str | None:
    """The first ``key=value`` override naming a setting the schema lacks, or a value of the wrong type.

    Hydra refuses both too, but after several lines of OmegaConf detail and with exit status 1;
    this says it in one line, listing the settings that exist. An attack's settings
    (``attack.methods.<name>.<key>``) are checked against its typed settings, and so are
    ``defense.params.<key>`` when the command names the defence (``defense=at``); values that Hydra
    resolves later (``${...}``) are left to :func:`ask.config.resolve`.
    """
    defense = next((o.value() for _, o in overrides if o.key_or_group == "defense" and not o.package
                    and isinstance(o.value(), str)), None)
    for argument, override in overrides:
        key = override.key_or_group
        if (override.package or override.is_delete() or override.is_add() or override.is_force_add()
                or key.startswith("hydra") or "/" in key
                or ("." not in key and any((folder / key).is_dir() for folder in folders))):
            continue
        value = override.value()
        if override.is_sweep_override() and not isinstance(value, ChoiceSweep):
            continue  # range() and interval() sweeps: Hydra checks their bounds
        problem = _check_setting(key, _choices(value), argument.split("=", 1)[1], defense)
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
