"""Attacks on the DNN and on kNN classifiers over its hidden features.

``build_attack(name, model, threat, **hyper)`` makes any registered attack; every module of this
package is imported here, so an attack file decorated with ``@register_attack`` is available
by its name without further edits.
"""

from __future__ import annotations

import importlib
import pkgutil

from ask.attacks.ascent import AscentResult, pgd_maximise
from ask.attacks.base import Attack
from ask.attacks.registry import (
    ATTACKS,
    attack_class,
    attack_seed,
    available_attacks,
    build_attack,
    register_attack,
)
from ask.attacks.threat import ThreatModel, ascent_step, project, random_init

# Fill the registry: one module per attack, discovered rather than listed.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

from ask.attacks.ask import ASKAttack  # noqa: E402
from ask.attacks.ask_loss import ask_loss, multi_layer_ask_loss  # noqa: E402
from ask.attacks.pgd import PGDAttack  # noqa: E402

__all__ = [
    "ATTACKS",
    "ASKAttack",
    "AscentResult",
    "Attack",
    "PGDAttack",
    "ThreatModel",
    "ascent_step",
    "ask_loss",
    "attack_class",
    "attack_seed",
    "available_attacks",
    "build_attack",
    "multi_layer_ask_loss",
    "pgd_maximise",
    "project",
    "random_init",
    "register_attack",
]
