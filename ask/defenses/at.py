"""Standard adversarial training (AT), and the pieces every adversarial defence shares.

Madry, Makelov, Schmidt, Tsipras and Vladu, *Towards Deep Learning Models Resistant to
Adversarial Attacks*, ICLR 2018, arXiv:1706.06083: minimise CE(f(x_PGD), y), where x_PGD
maximises the cross-entropy inside the eps ball (PGD with a uniform random start).

The shared pieces (:func:`inner_mode`, :func:`make_threat`, :func:`pgd_ce`) live here because
PGD-CE is the building block of the other defences too (ASK-Def's CE term is exactly AT's).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ask.attacks.ascent import pgd_maximise
from ask.attacks.ask_loss import logit_margin
from ask.attacks.threat import ThreatModel, start_point
from ask.config.schema import parse_size
from ask.constants import NORMS
from ask.defenses.base import Defense, register_defense
from ask.errors import ConfigError

__all__ = ["AdversarialTraining", "check_number", "inner_mode", "make_threat", "module_mode", "pgd_ce"]


@contextmanager
def module_mode(model: nn.Module, training: bool) -> Iterator[nn.Module]:
    """Every module in train (``training=True``) or eval mode; each module's own flag restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


@contextmanager
def inner_mode(model: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """Run an inner maximisation: eval mode (or train mode), parameters frozen; both restored after.

    Eval mode: batch norm normalises with its running statistics and does not update them from
    adversarial points. ``training=True`` is the authors' ASK-Def inner ASK loop: batch
    statistics, running statistics updated at every step. Frozen parameters: the attack
    differentiates with respect to the input only, and autograd then keeps no activations for
    weight gradients (about 7 % faster on a CPU).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    with module_mode(model, training):
        for parameter in trainable:
            parameter.requires_grad_(False)
        try:
            yield model
        finally:
            for parameter in trainable:
                parameter.requires_grad_(True)


def check_number(defense: str, name: str, value: Any, *, minimum: float = 0.0, strict: bool = False,
                 integer: bool = False) -> Any:
    """``value`` checked as a finite number >= ``minimum`` (> with ``strict``), else :class:`ConfigError`.

    Sizes may be fractions such as ``"8/255"`` (as in the attack settings).
    """
    if integer:
        ok = not isinstance(value, bool) and isinstance(value, int)
        number = value if ok else None
    else:
        try:
            number = parse_size(value, f"defense.params.{name}")
        except ConfigError:
            number = None
        ok = number is not None and math.isfinite(number)
    if not ok or number < minimum or (strict and number == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        kind = "an integer" if integer else "a number"
        raise ConfigError(
            f"defense.params.{name}={value!r} must be {kind} {bound} for defense={defense}; "
            f"see conf/defense/{defense}.yaml"
        )
    return number


def make_threat(defense: str, *, eps: Any, step_size: Any, steps: Any, norm: str,
                random_start: bool = True, eps_name: str = "eps") -> ThreatModel:
    """The inner maximisation's ball and budget, with errors naming the defence's settings."""
    if norm not in NORMS:
        raise ConfigError(f"defense '{defense}' norm={norm!r} is not one of {', '.join(NORMS)}")
    return ThreatModel(
        eps=check_number(defense, eps_name, eps),
        norm=norm,
        steps=check_number(defense, "steps", steps, integer=True),
        step_size=check_number(defense, "step_size", step_size, strict=True),
        random_start=bool(random_start),
    )


def pgd_ce(model: nn.Module, images: Tensor, labels: Tensor, threat: ThreatModel, training: bool = False,
           chunk: int | None = None) -> Tensor:
    """PGD on the cross-entropy (Madry et al. 2018), in eval mode (or train mode); returns detached x_PGD.

    Steps follow the logit margin ``lse_{c != y} z_c - z_y``, whose gradient is the
    cross-entropy's divided by a positive per-example factor: the same sign steps, without the
    float32 underflow of a saturated softmax. The random start draws from torch's global
    generator, whose state the trainer's checkpoints carry, so a resumed run repeats it.

    ``chunk``: in eval mode, at most this many images per forward/backward pass (ASK-Def's
    C * n_ref references: 5,000 images a step on ImageNet-1k). Eval-mode examples are
    independent and the start is drawn once for all, so the pieces give what one pass would. In
    train mode batch statistics couple the images, so they always go through together.
    """
    if threat.is_trivial:
        return images.detach()

    def objective(x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        margin = logit_margin(model(x_adv), y)
        loss = F.softplus(margin)
        # In train mode batch statistics couple the examples, so only the loss's own gradient is exact.
        return loss, loss if training else margin

    with inner_mode(model, training):
        if training or chunk is None or len(images) <= chunk:
            return pgd_maximise(objective, images, labels, threat).adversarial
        start = start_point(images, threat)
        return torch.cat([
            pgd_maximise(objective, images[i:i + chunk], labels[i:i + chunk], threat, start=start[i:i + chunk]).adversarial
            for i in range(0, len(images), chunk)
        ])


@register_defense
class AdversarialTraining(Defense):
    """AT: minimise CE(f(x_PGD), y) with x_PGD from PGD-CE at ``eps`` (Madry et al. 2018).

    The inner PGD runs in eval mode (batch-norm statistics are not updated by the attack); the
    outer loss runs in the model's own (train) mode, so batch norm normalises the adversarial
    batch with its own statistics, as in Madry et al.

    Hyperparameters (``conf/defense/at.yaml``):
        eps: radius of the training ball. Default 4/255, the eps of ASK-Def's PGD term, so AT
            and ASK-Def differ only by ASK-Def's kNN term (the paper's comparison).
        step_size, steps: the inner PGD budget (2/255, 10 steps).
        norm: ``linf`` or ``l2``.
        random_start: uniform random start in the ball (Madry et al.).
    """

    name = "at"

    def __init__(
        self,
        model: nn.Module,
        *,
        label_smoothing: float = 0.0,
        eps: Any = "4/255",
        step_size: Any = "2/255",
        steps: int = 10,
        norm: str = "linf",
        random_start: bool = True,
        **unknown: Any,
    ) -> None:
        super().__init__(model, label_smoothing=label_smoothing, **unknown)
        self.threat = self.check_settings({"eps": eps, "step_size": step_size, "steps": steps, "norm": norm,
                                           "random_start": random_start})["threat"]

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        return {"threat": make_threat(cls.name, eps=settings["eps"], step_size=settings["step_size"],
                                      steps=settings["steps"], norm=settings["norm"],
                                      random_start=settings["random_start"])}

    def adversarial(self, images: Tensor, labels: Tensor) -> Tensor:
        """x_PGD for the batch (inner maximisation, eval mode, model flags restored)."""
        return pgd_ce(self.model, images, labels, self.threat)

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = self.adversarial(images, labels)
        logits = self.model(x_adv)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing), logits
