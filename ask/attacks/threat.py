"""The ball every attack of a run shares, and the moves inside it.

:class:`ThreatModel` holds the radius, norm and step budget; :func:`project`,
:func:`random_init`, :func:`start_point` and :func:`ascent_step` are the L-inf/L2 geometry that
the shared ascent (:mod:`ask.attacks.ascent`), the attacks with their own loops and the defences'
inner maximisations all use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ask.constants import NORMS
from ask.errors import ConfigError

__all__ = ["ThreatModel", "ascent_step", "project", "random_init", "start_point"]

# Per-example norms below this count as zero (avoids 0/0 in the L2 direction).
_TINY = 1e-12


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

