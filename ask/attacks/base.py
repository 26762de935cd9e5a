"""The attack contract: :class:`Attack`, and :func:`warn_about` for the points an ascent could not move.

Every attack follows the torchattacks contract: ``attack = SomeAttack(model, threat, **hyper)``,
then ``x_adv = attack(images, labels)`` with images in [0, 1] (normalisation lives inside the
model). The call puts the model in eval mode and restores every module's previous mode, takes
its device from the model, differentiates only with respect to the input (no parameter ``.grad``
is ever written) and returns detached images inside the ball and inside [0, 1].

A new attack is one small module in this package: subclass :class:`Attack`, set ``name`` (the
``conf/attack/`` option name), implement :meth:`Attack.perturb`, decorate the class with
:func:`~ask.attacks.registry.register_attack`. The package imports every module it contains, so
the registry sees the new file without further edits. Attacks that ascend a per-example loss
reuse :meth:`Attack.maximise`; code that needs the same loop outside an attack (the inner
maximisation of a defence) calls :func:`~ask.attacks.ascent.pgd_maximise` directly. The ball
(:class:`~ask.attacks.threat.ThreatModel`) lives in :mod:`ask.attacks.threat`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ask.attacks.ascent import AscentResult, LossFn, pgd_maximise
from ask.attacks.threat import ThreatModel, project
from ask.errors import ConfigError, DataError

__all__ = ["Attack", "warn_about"]

logger = logging.getLogger(__name__)


def warn_about(result: AscentResult, name: str) -> None:
    """Log a warning for the points of ``result`` that never moved or whose objective went non-finite.

    An input gradient that is exactly zero at every step means a saturated loss or gradient
    masking: the point is returned unperturbed and its robustness is not measured. ``name``
    (the attack's) starts each message. Shared by :meth:`Attack.maximise` and the attacks that
    run their own loop.
    """
    batch = result.zero_grad.shape[0]
    problems = (
        (result.zero_grad, "the input gradient was exactly zero at every step for %d of %d points; "
                           "they were not perturbed (saturated loss or gradient masking)"),
        (result.nonfinite, "the attack loss was NaN/Inf for %d of %d points; "
                           "non-finite gradient entries counted as zero"),
    )
    for flags, message in problems:
        count = int(flags.sum())
        if count:
            logger.warning("%s: " + message, name, count, batch)


# ------------------------------------------------------------------------------- the attack
class Attack(ABC):
    """Base of every attack: ``attack(images, labels) -> adversarial images``.

    Subclasses declare their hyperparameters as keyword arguments of ``__init__`` and pass
    them on to ``super().__init__`` so they are recorded in :attr:`hyper` (for reports).

    Attributes:
        name: the option name under ``conf/attack/`` and in the registry.
        needs_store: the attack reads kNN reference features (a ``ReferenceStore``).
        model: the victim backbone (``forward`` gives logits; kNN attacks also use
            ``forward_features``).
        threat: the shared ball and step budget.
        store: the reference store, or None.
        generator: random source for random starts (None: torch's global generator).
        hyper: the attack's own hyperparameters, as given.
        last_result: the :class:`AscentResult` of the most recent call that used
            :meth:`maximise` (per-step objective trace, zero-gradient and non-finite flags).
    """

    name: ClassVar[str] = ""
    needs_store: ClassVar[bool] = False

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel,
        *,
        store: Any = None,
        generator: torch.Generator | None = None,
        **hyper: Any,
    ) -> None:
        if not isinstance(threat, ThreatModel):
            raise TypeError(f"threat must be a ThreatModel, got {type(threat).__name__}")
        if self.needs_store and store is None:
            raise ConfigError(
                f"attack '{self.name}' attacks kNN features and needs a reference store; "
                "build one from the training pool (knn settings) and pass store=..."
            )
        self.model = model
        self.threat = threat
        self.store = store
        self.generator = generator
        self.hyper: dict[str, Any] = dict(hyper)
        self.last_result: AscentResult | None = None

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        """The hyperparameters that need neither the model, the store nor the data, checked, as the
        values the attack uses (an int, a float); :class:`ConfigError` names the first bad one.

        ``settings`` maps hyperparameter names to values (the attack's typed settings, as
        :func:`~ask.config.settings.settings_values` gives them). The constructor checks through
        this, and :func:`ask.wiring.check_run_settings` calls it before any data loads or any
        model trains; checks against the model, the store or the data stay in the constructor.
        The default checks nothing.
        """
        return {}

    # ------------------------------------------------------------------------------ calling
    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        """Adversarial versions of ``images`` (detached, in [0, 1], inside the ball).

        Runs on the model's device and returns on the device the images came from. The model
        is in eval mode during the attack; each module's previous mode is restored afterwards.
        With ``eps == 0`` or ``steps == 0`` the clean images come back unchanged.
        """
        _check_inputs(images, labels)
        self.last_result = None
        if self.threat.is_trivial or images.shape[0] == 0:
            return images.detach().clone()
        device = self.device(images)
        x = images.detach().to(device)
        y = labels.detach().to(device)
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            x_adv = self.perturb(x, y)
        finally:
            # Per module, so a model with frozen (eval) parts comes back exactly as it was.
            for module, mode in modes:
                module.training = mode
        # The contract holds whatever perturb() did.
        x_adv = project(x_adv.detach(), x, self.threat.eps, self.threat.norm)
        return x_adv.to(images.device)

    @abstractmethod
    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        """The attack proper; images and labels are already on the model's device."""

    # ------------------------------------------------------------------------------ helpers
    def device(self, images: Tensor | None = None) -> torch.device:
        """The model's device (first parameter or buffer), else the images' device."""
        for tensor in self.model.parameters():
            return tensor.device
        for tensor in self.model.buffers():
            return tensor.device
        if images is not None:
            return images.device
        return torch.device("cpu")

    def maximise(
        self, loss_fn: LossFn, images: Tensor, labels: Tensor, *, keep_best: bool = False
    ) -> Tensor:
        """Run :func:`pgd_maximise` with this attack's threat model and generator.

        Stores the full result in :attr:`last_result` and logs a warning when some points
        had an all-zero gradient throughout (they never moved: a saturated loss or gradient
        masking) or a non-finite objective.
        """
        result = pgd_maximise(
            loss_fn, images, labels, self.threat, keep_best=keep_best, generator=self.generator
        )
        self.last_result = result
        warn_about(result, self.name)
        return result.adversarial

    def describe(self) -> dict[str, Any]:
        """Name, threat model and hyperparameters, for result files."""
        return {"name": self.name, "threat": asdict(self.threat), "hyper": dict(self.hyper)}

    def __repr__(self) -> str:
        hyper = ", ".join(f"{k}={v!r}" for k, v in self.hyper.items())
        return f"{type(self).__name__}({self.threat}{', ' + hyper if hyper else ''})"


def _check_inputs(images: Tensor, labels: Tensor) -> None:
    if not torch.is_floating_point(images):
        raise DataError(
            f"attack inputs must be float images in [0, 1], got dtype {images.dtype}; "
            "convert with images.float() / 255"
        )
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must have shape [{images.shape[0]}] to match the images, got {tuple(labels.shape)}"
        )
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise DataError(
            f"attack inputs must lie in [0, 1], got values in [{float(images.min()):.3g}, "
            f"{float(images.max()):.3g}]; normalisation belongs inside the model, not the data"
        )
