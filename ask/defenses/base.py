"""The defence interface: a training loss computed from one batch.

Each defence is one small module registered under its ``conf/defense/`` option name. The trainer
owns the loop, the optimiser and the schedule; a defence only says what to minimise.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ask.config.settings import settings_values
from ask.errors import ConfigError

DEFENSES: dict[str, type[Defense]] = {}


class Defense(ABC):
    name: ClassVar[str]

    def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0, **params: Any) -> None:
        if params:
            raise ConfigError(
                f"defense '{self.name}' got unknown settings {sorted(params)}; see conf/defense/{self.name}.yaml"
            )
        self.model = model
        self.label_smoothing = label_smoothing

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The settings that need neither the model nor the data, checked, as the values the defence
        uses (a number, a threat model); :class:`ConfigError` names the first bad one.

        ``settings`` maps setting names to values (the defence's typed settings, as
        :func:`~ask.config.settings.settings_values` gives them). The constructor checks through
        this, and :func:`ask.wiring.check_run_settings` calls it before any data loads or any
        model trains; checks against the model or the data stay in the constructor. The default
        checks nothing.
        """
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs beyond the weights and the random streams (plain tensors and data)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 (a no-op by default)
        """Restore :meth:`state_dict`."""

    @abstractmethod
    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the scalar training loss and the logits used for the running train accuracy."""


def register_defense(cls: type[Defense]) -> type[Defense]:
    DEFENSES[cls.name] = cls
    return cls


def defense_class(name: str) -> type[Defense]:
    """The defence class registered as ``name``; :class:`ConfigError` naming the choices if none is."""
    if name not in DEFENSES:
        raise ConfigError(f"unknown defense '{name}'; available: {', '.join(sorted(DEFENSES))}")
    return DEFENSES[name]


def build_defense(name: str, model: nn.Module, settings: Any, **common: Any) -> Defense:
    """The registered defence ``name``: ``settings`` is its typed settings (``run.defense.settings()``,
    a dataclass of :mod:`ask.config.settings`) or a mapping of them; ``common`` is what the trainer
    adds (``label_smoothing``, a defence's trainer-side inputs)."""
    return defense_class(name)(model, **common, **settings_values(settings))
