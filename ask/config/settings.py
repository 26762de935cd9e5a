"""Each attack's and each defence's own settings, typed.

One dataclass per ``conf/attack/<name>.yaml`` (the section ``attack.methods.<name>``) and per
``conf/defense/<name>.yaml`` (its ``params``). The rule: **the YAML holds every value and its
comment; a dataclass states only names and types, never a default.** A field without a YAML key,
or a YAML key without a field, fails ``tests/test_config.py``. :func:`ask.config.resolve` checks a
composed config against these classes, so a mistyped key or a value of the wrong type is refused
in one line before any data loads; range checks that need the data (a ``k`` larger than the pool's
smallest class) stay with the attack or defence.

The classes live here rather than beside ``ask/attacks/<name>.py`` because the check runs while
the config is resolved, and ``ask.config`` sits below the attacks and defences (it may not
import them; docs/ARCHITECTURE.md). The attack or defence registered under the same name takes
one of these (``build_attack(..., settings=...)``, ``build_defense``).
"""

from __future__ import annotations

from dataclasses import dataclass


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


#: Defence option name (``conf/defense/<name>.yaml``, the registry name) -> the settings of its ``params``.
DEFENSE_SETTINGS: dict[str, type] = {
    "none": NoDefenseSettings,
    "at": ATSettings,
    "trades": TradesSettings,
    "ask_def": ASKDefSettings,
    "ask_def_authors": ASKDefSettings,
}
