"""Config schemas, the location of ``conf/``, and the step from a composed config to typed objects."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ask.config.schema import (
    AttackConfig,
    DatasetConfig,
    EvalConfig,
    KnnConfig,
    ModelConfig,
    RunConfig,
    SettingsSection,
    TrainConfig,
    ignored_settings,
    parse_size,
    register_configs,
)
from ask.errors import ConfigError

__all__ = [
    "AttackConfig",
    "DatasetConfig",
    "EvalConfig",
    "KnnConfig",
    "ModelConfig",
    "RunConfig",
    "SettingsSection",
    "TrainConfig",
    "config_dir",
    "ignored_settings",
    "parse_size",
    "register_configs",
    "resolve",
]


def config_dir() -> str:
    """Absolute path of the config tree.

    A built wheel ships it inside the package (``ask/conf``); a source checkout or editable
    install keeps it at the repository root (``conf/``).
    """
    package_dir = Path(__file__).resolve().parent.parent  # the ask package (this is ask/config)
    for candidate in (package_dir / "conf", package_dir.parent / "conf"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise ConfigError(f"the config tree was not found next to {package_dir}; reinstall the ask package")


def resolve(cfg: DictConfig) -> RunConfig:
    """Composed config -> :class:`RunConfig`, running every range check; errors become one line."""
    missing = sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra"))
    if missing:
        raise ConfigError(f"{missing[0]} is not set; add {missing[0]}=... to the command line")
    try:
        run = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", "") or "a value"
        raise ConfigError(f"{key} is not set; add {key}=... to the command line") from None
    except OmegaConfBaseException as error:
        message = str(error).splitlines()[0]
        key = getattr(error, "full_key", "")
        raise ConfigError(f"bad config value{f' at {key}' if key else ''}: {message}") from None
    assert isinstance(run, RunConfig)
    return run
