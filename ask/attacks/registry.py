"""The attack registry: :func:`register_attack` files an :class:`~ask.attacks.base.Attack` class
under its name, :func:`build_attack` makes one from that name and its settings, and
:func:`attack_seed` gives each named attack its own random seed.
"""

from __future__ import annotations

import inspect
import zlib
from typing import Any, TypeVar

from torch import nn

from ask.attacks.base import Attack
from ask.attacks.threat import ThreatModel
from ask.config.settings import settings_values
from ask.errors import ConfigError

__all__ = ["ATTACKS", "attack_class", "attack_seed", "available_attacks", "build_attack", "register_attack"]


def attack_seed(seed: int, attack_name: str) -> int:
    """A per-attack seed, stable across runs and independent of the attack's position in the list."""
    return seed * 1_000_003 + zlib.crc32(attack_name.encode())


ATTACKS: dict[str, type[Attack]] = {}

_A = TypeVar("_A", bound=type[Attack])


def register_attack(cls: _A) -> _A:
    """Class decorator: file the attack under ``cls.name`` in :data:`ATTACKS`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set the class attribute 'name' before registering")
    existing = ATTACKS.get(cls.name)
    if existing is not None and existing is not cls:
        raise ValueError(f"attack name '{cls.name}' is taken by {existing.__name__}")
    ATTACKS[cls.name] = cls
    return cls


def available_attacks() -> list[str]:
    """Registered attack names, sorted."""
    return sorted(ATTACKS)


def attack_class(name: str) -> type[Attack]:
    """The attack class registered as ``name``; :class:`ConfigError` naming the choices if none is."""
    cls = ATTACKS.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown attack '{name}'; available attacks: {', '.join(available_attacks())}"
        )
    return cls


def build_attack(name: str, model: nn.Module, threat: ThreatModel, settings: Any = None, **kwargs: Any) -> Attack:
    """Instantiate the registered attack ``name``.

    ``settings`` is the attack's typed settings (``run.attack.settings(name)``, a dataclass of
    :mod:`ask.config.settings`) or a mapping of hyperparameters; ``kwargs`` add ``store``,
    ``generator`` and, from Python, hyperparameters left to the attack's defaults otherwise. An
    unknown name or an unknown hyperparameter raises :class:`ConfigError` naming the valid choices.
    """
    cls = attack_class(name)
    if settings is not None:
        kwargs = {**settings_values(settings), **kwargs}
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        accepted = [n for n, p in params.items() if n not in ("self", "model", "threat")
                    and p.kind is not inspect.Parameter.VAR_POSITIONAL]
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise ConfigError(
                f"attack '{name}' has no hyperparameter {', '.join(map(repr, unknown))}; "
                f"it accepts: {', '.join(accepted)}"
            )
    return cls(model, threat, **kwargs)
