"""The shared projected-gradient loop: :func:`pgd_maximise` ascends a per-example objective.

Attacks reach it through :meth:`ask.attacks.base.Attack.maximise`; code that needs the same loop
outside an attack (the inner maximisation of a defence) calls :func:`pgd_maximise` directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ask.attacks.threat import ThreatModel, ascent_step, project, start_point
from ask.utils import precision

__all__ = ["AscentResult", "LossFn", "input_gradient", "pgd_maximise"]

#: A per-example objective: ``loss_fn(x_adv, labels) -> Tensor[B]``; the loop ascends it. It may
#: also return ``(objective, direction)``: the loop then records ``objective`` and steps along the
#: gradient of ``direction``, a per-example surrogate whose gradient is the objective's times a
#: positive per-example factor (same sign and normalised steps, no float32 underflow).
LossFn = Callable[[Tensor, Tensor], "Tensor | tuple[Tensor, Tensor]"]


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
    ``x <- Proj(x + step(grad))``. Gradients are taken with :func:`input_gradient` (outside any
    autocast) with respect to the input only, under ``torch.enable_grad()`` so the loop also works when the
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
            grad = input_gradient(direction, x_adv)
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


def input_gradient(objective: Tensor, inputs: Tensor) -> Tensor:
    """The gradient of ``objective.sum()`` with respect to ``inputs``, taken outside any autocast.

    PyTorch's advice: the backward pass then runs each op in its forward's dtype, so the backbone's
    stays bf16 and an objective computed in fp32 inside the caller's autocast (the ASK margin)
    keeps an fp32 gradient. Taken under autocast, the margin's products were differentiated as
    bf16 matmuls (a step direction off by ~0.5 % relative) that also re-cast the fixed
    references at every step. Every attack and inner-maximisation loop takes its gradient here.
    """
    with precision.fp32():
        (grad,) = torch.autograd.grad(objective.sum(), inputs)
    return grad


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

