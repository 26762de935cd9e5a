"""The attack contract, the L-inf/L2 ball and the shared projected-gradient loop.

Every attack follows the torchattacks contract: ``attack = SomeAttack(model, threat, **hyper)``,
then ``x_adv = attack(images, labels)`` with images in [0, 1] (normalisation lives inside the
model). The call puts the model in eval mode and restores every module's previous mode, takes
its device from the model, differentiates only with respect to the input (no parameter ``.grad``
is ever written) and returns detached images inside the ball and inside [0, 1].

A new attack is one small module in this package: subclass :class:`Attack`, set ``name`` (the
``conf/attack/`` option name), implement :meth:`Attack.perturb`, decorate the class with
:func:`register_attack`. The package imports every module it contains, so the registry sees the
new file without further edits. Attacks that ascend a per-example loss reuse
:meth:`Attack.maximise`; code that needs the same loop outside an attack (the inner maximisation
of a defence) calls :func:`pgd_maximise` directly.
"""

from __future__ import annotations

import inspect
import logging
import math
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from torch import Tensor, nn

from ask.constants import NORMS
from ask.errors import ConfigError, DataError

__all__ = [
    "ATTACKS",
    "NORMS",
    "AscentResult",
    "Attack",
    "LossFn",
    "ThreatModel",
    "ascent_step",
    "available_attacks",
    "build_attack",
    "pgd_maximise",
    "project",
    "random_init",
    "register_attack",
    "start_point",
    "warn_about",
]

logger = logging.getLogger(__name__)


#: A per-example objective: ``loss_fn(x_adv, labels) -> Tensor[B]``; the loop ascends it. It may
#: also return ``(objective, direction)``: the loop then records ``objective`` and steps along the
#: gradient of ``direction``, a per-example surrogate whose gradient is the objective's times a
#: positive per-example factor (same sign and normalised steps, no float32 underflow).
LossFn = Callable[[Tensor, Tensor], "Tensor | tuple[Tensor, Tensor]"]

# Per-example norms below this count as zero (avoids 0/0 in the L2 direction).
_TINY = 1e-12


def attack_seed(seed: int, attack_name: str) -> int:
    """A per-attack seed, stable across runs and independent of the attack's position in the list."""
    return seed * 1_000_003 + zlib.crc32(attack_name.encode())


# ------------------------------------------------------------------------------ threat model
@dataclass(frozen=True)
class ThreatModel:
    """The ball every attack of a run shares: radius, norm and the step budget.

    Attributes:
        eps: radius of the ball in [0, 1] pixel units (e.g. 8/255).
        norm: ``"linf"`` or ``"l2"``.
        steps: number of gradient steps.
        step_size: length of one step (a sign step for L-inf, a normalised-gradient step for L2).
        random_start: start from a uniform random point of the ball rather than the clean image.
    """

    eps: float
    norm: str = "linf"
    steps: int = 20
    step_size: float = 2 / 255
    random_start: bool = True

    def __post_init__(self) -> None:
        for field_name in ("eps", "step_size"):
            value = getattr(self, field_name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"attack.{field_name}={value!r} must be a finite number such as 8/255")
            object.__setattr__(self, field_name, float(value))
        if self.eps < 0:
            raise ConfigError(f"attack.eps={self.eps} must be >= 0")
        if self.step_size <= 0:
            raise ConfigError(f"attack.step_size={self.step_size} must be > 0")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"attack.steps={self.steps!r} must be an integer >= 0")
        if self.norm not in NORMS:
            raise ConfigError(f"attack.norm={self.norm!r} is not one of {', '.join(NORMS)}")

    @property
    def is_trivial(self) -> bool:
        """True when the ball or the budget is empty, so the attack returns the clean images."""
        return self.eps == 0 or self.steps == 0


# ------------------------------------------------------------------------------- ball helpers
def _per_example_norm(t: Tensor) -> Tensor:
    """L2 norm of each example, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: Tensor, x_clean: Tensor, eps: float, norm: str) -> Tensor:
    """Project ``x_adv`` into the ``norm`` ball of radius ``eps`` around ``x_clean``, then into [0, 1].

    Clipping to [0, 1] after the ball keeps the point inside the ball: with ``x_clean`` in
    [0, 1], clipping only shrinks each coordinate of the perturbation.
    """
    delta = x_adv - x_clean
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    elif norm == "l2":
        length = _per_example_norm(delta)
        # where() rather than eps / max(length, tiny): exact 1 inside the ball, no 0/0 at eps = 0.
        scale = torch.where(length > eps, eps / length.clamp_min(_TINY), torch.ones_like(length))
        delta = delta * scale
    else:
        raise ConfigError(f"norm={norm!r} is not one of {', '.join(NORMS)}")
    return (x_clean + delta).clamp(0.0, 1.0)


def _rand(shape: torch.Size, like: Tensor, generator: torch.Generator | None, normal: bool) -> Tensor:
    # A generator lives on one device; draw there, then move, so a CPU generator drives a GPU run.
    device = generator.device if generator is not None else like.device
    draw = torch.randn if normal else torch.rand
    out = draw(shape, generator=generator, device=device, dtype=like.dtype)
    return out.to(like.device)


def random_init(x: Tensor, eps: float, norm: str, generator: torch.Generator | None = None,
                clip: bool = True) -> Tensor:
    """A uniformly random point of the ball around ``x``, clipped to [0, 1] unless ``clip=False``.

    L-inf: each pixel moves by U(-eps, eps). L2: a uniform direction (normalised Gaussian)
    times a radius ``eps * u ** (1 / d)``, which is uniform in the volume of the d-ball.
    """
    if norm == "linf":
        delta = (2 * _rand(x.shape, x, generator, normal=False) - 1) * eps
    elif norm == "l2":
        direction = _rand(x.shape, x, generator, normal=True)
        direction = direction / _per_example_norm(direction).clamp_min(_TINY)
        dim = x[0].numel()
        u = _rand(torch.Size([x.shape[0]]), x, generator, normal=False)
        radius = eps * u.pow(1.0 / dim)
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    else:
        raise ConfigError(f"norm={norm!r} is not one of {', '.join(NORMS)}")
    return (x + delta).clamp(0.0, 1.0) if clip else x + delta


def start_point(images: Tensor, threat: ThreatModel, generator: torch.Generator | None = None,
                clip: bool = True) -> Tensor:
    """The ascent's first iterate: a uniform random point of the ball, projected into it and [0, 1]
    unless ``clip=False``; the images themselves without a random start or with ``eps = 0``."""
    x_clean = images.detach()
    if not (threat.random_start and threat.eps > 0):
        return x_clean.clone()
    start = random_init(x_clean, threat.eps, threat.norm, generator, clip=clip)
    return project(start, x_clean, threat.eps, threat.norm) if clip else start


def ascent_step(x_adv: Tensor, grad: Tensor, step_size: float, norm: str) -> Tensor:
    """One ascent step (not yet projected): ``sign(grad)`` for L-inf, ``grad / ||grad||`` for L2.

    Non-finite gradient entries are treated as zero, and an all-zero gradient gives a zero
    step, so a broken example stays where it is instead of turning the batch to NaN.
    """
    grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if norm == "linf":
        return x_adv + step_size * grad.sign()
    if norm == "l2":
        return x_adv + step_size * grad / _per_example_norm(grad).clamp_min(_TINY)
    raise ConfigError(f"norm={norm!r} is not one of {', '.join(NORMS)}")


# ------------------------------------------------------------------------------ shared loop
class AscentResult(NamedTuple):
    """What :func:`pgd_maximise` returns.

    Attributes:
        adversarial: the final (or, with ``keep_best``, the best) iterate, detached, [B, ...].
        objective: the per-example objective at each evaluated iterate, [n, B] (detached);
            row t is the iterate before step t (row 0 is the start point); with ``keep_best``
            a last row holds the final iterate, so n = steps + 1, otherwise n = steps.
        zero_grad: [B] bool, True where the input gradient was exactly zero at every step
            (saturated loss or gradient masking; the point never moved).
        nonfinite: [B] bool, True where the objective was NaN/Inf at some iterate.
    """

    adversarial: Tensor
    objective: Tensor
    zero_grad: Tensor
    nonfinite: Tensor


def pgd_maximise(
    loss_fn: LossFn,
    images: Tensor,
    labels: Tensor,
    threat: ThreatModel,
    *,
    keep_best: bool = False,
    generator: torch.Generator | None = None,
    clip_start: bool = True,
    start: Tensor | None = None,
) -> AscentResult:
    """Projected gradient ascent of a per-example objective inside the threat ball.

    Random start (if ``threat.random_start``), then ``threat.steps`` times
    ``x <- Proj(x + step(grad))``. Gradients are taken with :func:`torch.autograd.grad` with
    respect to the input only, under ``torch.enable_grad()`` so the loop also works when the
    caller runs under ``no_grad``. The model's train/eval mode is the caller's business (an
    :class:`Attack` sets eval mode around it).

    Because examples are independent (eval-mode batch norm), the gradient of the summed
    objective gives every example its own gradient.

    Args:
        loss_fn: ``loss_fn(x_adv, labels) -> Tensor[B]``, the objective to *increase*.
        images: clean images in [0, 1], [B, ...].
        labels: whatever ``loss_fn`` needs as its second argument.
        threat: the ball and the step budget.
        keep_best: return, per example, the iterate with the highest objective (costs one
            extra forward pass to score the final iterate).
        generator: random source of the random start.
        clip_start: project the random start into the ball and [0, 1] before the first step
            (``False``: the authors' ASK-Def start, x + U(-eps, eps) as drawn; every step still
            projects).
        start: the first iterate, already drawn (:func:`start_point`) instead of drawing one: a
            caller that splits a batch draws the start of the whole batch once, so that the
            pieces begin where one call would have.
    """
    x_clean = images.detach()
    eps, norm = threat.eps, threat.norm
    x_adv = start_point(x_clean, threat, generator, clip_start) if start is None else start.detach().clone()

    batch = x_clean.shape[0]
    device = x_clean.device
    zero_grad = torch.ones(batch, dtype=torch.bool, device=device)
    nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)
    best_x = x_adv.clone() if keep_best else x_adv
    best_obj = torch.full((batch,), -math.inf, device=device)
    trace: list[Tensor] = []

    def record(x: Tensor, obj: Tensor) -> None:
        nonlocal best_x
        obj = obj.detach().float()
        trace.append(obj)
        nonfinite.logical_or_(~torch.isfinite(obj))
        if keep_best:
            better = obj > best_obj  # NaN compares False, so a NaN iterate is never kept
            best_obj.copy_(torch.where(better, obj, best_obj))
            best_x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x.detach(), best_x)

    for _ in range(threat.steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            obj, direction = _split_objective(loss_fn(x_adv, labels), batch)
            (grad,) = torch.autograd.grad(direction.sum(), x_adv)
        x_adv = x_adv.detach()
        record(x_adv, obj)
        zero_grad.logical_and_(grad.flatten(1).abs().amax(dim=1) == 0)
        x_adv = project(ascent_step(x_adv, grad, threat.step_size, norm), x_clean, eps, norm)

    if keep_best:
        with torch.no_grad():
            record(x_adv, _split_objective(loss_fn(x_adv, labels), batch)[0])
        x_adv = best_x

    objective = torch.stack(trace) if trace else torch.empty(0, batch, device=device)
    return AscentResult(x_adv.detach(), objective, zero_grad, nonfinite)


def _split_objective(returned: Tensor | tuple[Tensor, Tensor], batch: int) -> tuple[Tensor, Tensor]:
    """``(objective, direction)`` from what a loss function returned (the objective alone is both)."""
    if isinstance(returned, tuple):
        objective, direction = returned
        return _check_objective(objective, batch), _check_objective(direction, batch)
    objective = _check_objective(returned, batch)
    return objective, objective


def _check_objective(obj: Tensor, batch: int) -> Tensor:
    if obj.shape != (batch,):
        raise ValueError(f"the attack loss must be per-example with shape [{batch}], got {tuple(obj.shape)}")
    return obj


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


# ----------------------------------------------------------------------------------- registry
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


def build_attack(name: str, model: nn.Module, threat: ThreatModel, settings: Any = None, **kwargs: Any) -> Attack:
    """Instantiate the registered attack ``name``.

    ``settings`` is the attack's typed settings (``run.attack.settings(name)``, a dataclass of
    :mod:`ask.config.settings`) or a mapping of hyperparameters; ``kwargs`` add ``store``,
    ``generator`` and, from Python, hyperparameters left to the attack's defaults otherwise. An
    unknown name or an unknown hyperparameter raises :class:`ConfigError` naming the valid choices.
    """
    cls = ATTACKS.get(name)
    if cls is None:
        raise ConfigError(
            f"unknown attack '{name}'; available attacks: {', '.join(available_attacks())}"
        )
    if settings is not None:
        given = settings if isinstance(settings, Mapping) else {f.name: getattr(settings, f.name) for f in fields(settings)}
        kwargs = {**given, **kwargs}
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
