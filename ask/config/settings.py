"""Each attack's and each defence's own settings, typed.

One dataclass per ``conf/attack/<name>.yaml`` (the section ``attack.methods.<name>``) and per
``conf/defense/<name>.yaml`` (its ``params``). The rule: **the YAML holds every value and its
comment; a dataclass states only names and types, never a default.** A field without a YAML key,
or a YAML key without a field, fails ``tests/test_config.py``. :func:`ask.config.resolve` checks a
composed config against these classes, so a mistyped key or a value of the wrong type is refused
in one line before any data loads. Value ranges are the attack's or defence's own
(``check_settings``, run by ``ask.wiring.check_run_settings`` before any data loads too); range
checks that need the data (a ``k`` larger than the pool's smallest class) stay in its constructor.

The classes live here rather than beside ``ask/attacks/<name>.py`` because the check runs while
the config is resolved, and ``ask.config`` sits below the attacks and defences (it may not
import them; docs/ARCHITECTURE.md). The attack or defence registered under the same name takes
one of these (``build_attack(..., settings=...)``, ``build_defense``).
"""

from __future__ import annotations

import difflib
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from fractions import Fraction
from typing import Any

from ask.errors import ConfigError


def parse_size(value: Any, name: str) -> float:
    """Turn ``0.03``, ``"0.03"`` or ``"8/255"`` into a float; reject anything else."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} is not a number; give a value such as 8/255 or 0.03")
    if isinstance(value, (int, float)):
        # nan passes every comparison's negation (nan >= 0 is False, but so is nan < 0): say what it is.
        if math.isnan(value):
            raise ConfigError(f"{name}=nan is not a number; give a value such as 8/255 or 0.03")
        if math.isinf(value):
            raise ConfigError(f"{name}={value} is infinite; give a finite value such as 8/255 or 0.03")
        return float(value)
    try:
        return float(Fraction(str(value).strip()))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"{name}={value!r} is not a number; give a value such as 8/255 or 0.03"
        ) from None


class Size(float):
    """The type of a perturbation size: a number or a fraction such as ``8/255``.

    A marker for the check only: the value is kept as written (``"4/255"`` stays text) so that the
    resolved config, and every key built from it, reads as it did; the defence parses it.
    """


# ------------------------------------------------------------------------------------ attacks
@dataclass
class PGDSettings:
    """``conf/attack/pgd.yaml``: PGD on the DNN's cross-entropy (:class:`ask.attacks.pgd.PGDAttack`)."""

    keep_best: bool


@dataclass
class ASKSettings:
    """``conf/attack/ask.yaml`` and ``ask_instance.yaml``: ASK-Atk (:class:`ask.attacks.ask.ASKAttack`)."""

    layers: list[str]
    kappa: list[float] | None
    temperature: float
    k: int
    kind: str
    include_self: bool
    keep_best: bool
    chunk_mb: float


@dataclass
class DkNNAttackSettings:
    """``conf/attack/dknn.yaml``: the DkNN attack (:class:`ask.attacks.dknn_attack.DkNNAttack`)."""

    layers: list[str]
    m: int
    a: float
    lr: float
    k: int
    eta_points: int
    keep_best: bool


@dataclass
class AdvKNNSettings:
    """``conf/attack/advknn.yaml``: Adv-kNN (:class:`ask.attacks.advknn.AdvKNNAttack`)."""

    layers: list[str]
    k: int
    fit_steps: int
    fit_lr: float
    fit_points: int
    weight_decay: float
    kl: str
    smoothing: float
    keep_best: bool


@dataclass
class FeatureSettings:
    """``conf/attack/feature.yaml``: feature adversaries (:class:`ask.attacks.feature.FeatureAttack`)."""

    layers: list[str]
    keep_best: bool


@dataclass
class MinNormSettings:
    """``conf/attack/minnorm.yaml``: the minimum-norm kNN attack (:class:`ask.attacks.minnorm.MinNormAttack`)."""

    layers: list[str]
    m: int
    c: float
    lr: float
    k: int
    margin: float


#: Attack option name (``conf/attack/<name>.yaml``, the registry name) -> its settings.
ATTACK_SETTINGS: dict[str, type] = {
    "ask": ASKSettings,
    "ask_instance": ASKSettings,
    "pgd": PGDSettings,
    "dknn": DkNNAttackSettings,
    "advknn": AdvKNNSettings,
    "feature": FeatureSettings,
    "minnorm": MinNormSettings,
}


# ----------------------------------------------------------------------------------- defences
@dataclass
class NoDefenseSettings:
    """``conf/defense/none.yaml``: plain training has no settings."""


@dataclass
class ATSettings:
    """``conf/defense/at.yaml``: adversarial training (:class:`ask.defenses.at.AdversarialTraining`)."""

    eps: Size
    step_size: Size
    steps: int
    norm: str
    random_start: bool


@dataclass
class TradesSettings:
    """``conf/defense/trades.yaml``: TRADES (:class:`ask.defenses.trades.TRADES`)."""

    beta: float
    eps: Size
    step_size: Size
    steps: int
    norm: str
    init_std: float


@dataclass
class ASKDefSettings:
    """``conf/defense/ask_def.yaml`` and ``ask_def_authors.yaml``: ASK-Def (:class:`ask.defenses.ask_def.ASKDefense`)."""

    layer: str | None
    metric: str
    temperature: float
    kind: str
    beta: float
    n_ref: int
    eps_pgd: Size
    eps_ask: Size
    step_size: Size
    steps: int
    norm: str
    reference_chunk: int | None
    reference_draw: str
    augment_references: bool
    reference_mode: str
    reference_grad: bool
    ask_mode: str
    pgd_mode: str
    ask_start_clip: bool
    clean_pass: bool
    full_forward: bool
    log_eps: float


#: Defence option name (``conf/defense/<name>.yaml``, the registry name) -> the settings of its ``params``.
DEFENSE_SETTINGS: dict[str, type] = {
    "none": NoDefenseSettings,
    "at": ATSettings,
    "trades": TradesSettings,
    "ask_def": ASKDefSettings,
    "ask_def_authors": ASKDefSettings,
}


# ------------------------------------------------------------- each attack's and defence's settings
def settings_values(settings: Any) -> dict[str, Any]:
    """One attack's or defence's settings as a plain dict of keyword arguments: from its settings
    dataclass, or from a mapping of them (as Python callers give them)."""
    if isinstance(settings, Mapping):
        return dict(settings)
    return {f.name: getattr(settings, f.name) for f in fields(settings)}


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               Size: "a number or a fraction such as 8/255"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value``, as the composed config holds it, is of type ``hint`` (no conversion)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_fits(v, item) for v in value)
    if hint is type(None):
        return value is None
    if isinstance(value, bool) or hint is bool:
        return isinstance(value, bool) and hint is bool
    if hint is Size:
        try:
            parse_size(value, "")
        except ConfigError:
            return False
        return True
    if hint is float:
        return isinstance(value, (int, float))  # an int is a float's value too (1024 for chunk_mb)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    """``hint`` as the error messages say it: ``an integer or null``, ``a list of strings``."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    names = []
    for option in options:
        if option is type(None):
            continue
        if typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            names.append("a list of " + {str: "strings", float: "numbers", int: "integers"}.get(item, "values"))
        else:
            names.append(_TYPE_NAMES.get(option, getattr(option, "__name__", str(option))))
    return " or ".join(names) + (" or null" if type(None) in options else "")


@dataclass(frozen=True)
class SettingsSection:
    """Where one attack's or defence's settings sit in the config, and their type.

    Attributes:
        type: the settings dataclass (:mod:`ask.config.settings`).
        path: the section's dotted path, ``attack.methods.ask`` or ``defense.params``.
        owner: whose settings they are, as messages say it: ``attack 'ask'``.
        source: the YAML file holding their values.
    """

    type: type
    path: str
    owner: str
    source: str

    @classmethod
    def of_attack(cls, name: str) -> SettingsSection:
        if name not in ATTACK_SETTINGS:
            raise ConfigError(f"unknown attack '{name}'; available attacks: {', '.join(sorted(ATTACK_SETTINGS))}")
        return cls(ATTACK_SETTINGS[name], f"attack.methods.{name}", f"attack '{name}'", f"conf/attack/{name}.yaml")

    @classmethod
    def of_defense(cls, name: str) -> SettingsSection:
        if name not in DEFENSE_SETTINGS:
            raise ConfigError(f"unknown defense '{name}'; available: {', '.join(sorted(DEFENSE_SETTINGS))}")
        return cls(DEFENSE_SETTINGS[name], "defense.params", f"defense '{name}'", f"conf/defense/{name}.yaml")

    def check(self, key: str, value: Any) -> None:
        """:class:`ConfigError` unless ``key`` is a setting of the section and ``value`` is of its type."""
        hints = typing.get_type_hints(self.type)
        if key not in hints:
            names = [f.name for f in fields(self.type)]
            close = difflib.get_close_matches(str(key), names, n=1)
            guess = f"did you mean {self.path}.{close[0]}? " if close else ""
            raise ConfigError(f"{self.path}.{key}: {self.owner} has no setting '{key}'; {guess}"
                              f"its settings are: {', '.join(names) or 'none'}")
        if not _fits(value, hints[key]):
            shown = "null" if value is None else (str(value).lower() if isinstance(value, bool) else value)
            raise ConfigError(f"{self.path}.{key}={shown} is not {_type_name(hints[key])}; see {self.source}")

    def typed(self, values: Mapping[str, Any]) -> Any:
        """``values`` as the settings dataclass: every field given (the YAML holds the values), no
        other key, each of its field's type; any problem is one :class:`ConfigError` line."""
        for key, value in values.items():
            self.check(key, value)
        missing = [f.name for f in fields(self.type) if f.name not in values]
        if missing:
            raise ConfigError(f"{self.path}.{missing[0]} is not set; add {self.path}.{missing[0]}=... "
                              f"(the values are in {self.source})")
        return self.type(**dict(values))
