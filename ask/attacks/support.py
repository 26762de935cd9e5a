"""Helpers the kNN baseline attacks share (DkNN, Adv-kNN, feature adversaries, minimum-norm).

Hyperparameter and layer checks with one message format, reads of the reference pool (class
sizes, distances behind similarities, pool features by row), flattened hidden features, and
:func:`adam_minimise`, Adam inside the threat ball. Public so that tests can check these pieces
on their own; it registers no attack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ask.attacks.ascent import AscentResult, LossFn, _check_objective, input_gradient
from ask.attacks.threat import ThreatModel, project, random_init
from ask.errors import ConfigError, require_named_layers
from ask.knn.similarity import flatten_features

__all__ = [
    "POOL_SEED",
    "adam_minimise",
    "check_int",
    "check_knn_layers",
    "check_labels",
    "check_positive",
    "distance_from_similarity",
    "flat_features",
    "gather_pool",
    "smallest_class",
]

# tanh(w) never reaches +-1: starting points on the ball's surface map to this, not to +-inf.
_TANH_LIMIT = 1 - 1e-6
# Seed of the pool subsamples that fitted components draw (thresholds, heads): fixed, so two
# attack objects on the same store fit the same thing whatever points they later attack.
POOL_SEED = 0


# ------------------------------------------------------------------------- shared checks
def check_int(attack: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, else :class:`ConfigError` naming the setting to change."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"attack.methods.{attack}.{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def check_positive(attack: str, name: str, value: Any, allow_zero: bool = False, example: str = "") -> float:
    """``value`` as a finite float > 0 (or >= 0), else :class:`ConfigError` (suggesting ``example``)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        hint = f", e.g. {example}" if example else ""
        raise ConfigError(f"attack.methods.{attack}.{name}={value!r} must be a finite number {bound}{hint}")
    return float(value)


def check_knn_layers(attack: str, model: nn.Module, store: Any, layers: str | Sequence[str]) -> list[str]:
    """The attacked layers as a list, checked against the model and the reference store."""
    layer_list = [layers] if isinstance(layers, str) else list(layers)
    if not layer_list:
        raise ConfigError(f"attack '{attack}' needs at least one layer; set layers=[block3] (a layer of the model)")
    if len(set(layer_list)) != len(layer_list):
        raise ConfigError(f"attack '{attack}' layers={layer_list} names a layer twice; list each layer once")
    require_named_layers(f"attack '{attack}'", model)
    check_layers = getattr(model, "check_layers", None)
    if callable(check_layers):
        check_layers(layer_list)
    missing = [layer for layer in layer_list if layer not in store.features]
    if missing:
        raise ConfigError(
            f"the reference store has no features for layer(s) {', '.join(missing)} "
            f"(it has: {', '.join(store.features)}); add them to knn.layers"
        )
    return layer_list


def smallest_class(store: Any) -> int:
    """Size of the smallest class of the reference pool."""
    labels = torch.as_tensor(store.labels).long()
    return int(torch.bincount(labels, minlength=store.num_classes).min())


def check_labels(labels: Tensor, num_classes: int) -> None:
    """:class:`ConfigError` unless every label is one of the reference store's ``num_classes`` classes."""
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ConfigError(
            f"labels must lie in [0, {num_classes}) (the reference store's classes); "
            "the model and the store come from different datasets"
        )


def distance_from_similarity(sim: Tensor, metric: str) -> Tensor:
    """The distance behind a similarity: Euclidean for ``"l2"`` (s = -d), 1 - cos for ``"cosine"``."""
    return -sim if metric == "l2" else 1.0 - sim


def gather_pool(store: Any, layer: str, rows: Tensor, like: Tensor) -> Tensor:
    """Pool features of ``rows`` (any shape) at ``layer``: [*rows.shape, D] on ``like``'s device/dtype."""
    pool = store.features[layer]
    rows = torch.as_tensor(rows).long()
    picked = pool.index_select(0, rows.reshape(-1).to(pool.device))
    return picked.view(*rows.shape, -1).to(device=like.device, dtype=like.dtype)


def flat_features(model: nn.Module, images: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """``model.forward_features`` flattened to [B, D] per layer."""
    feats = model.forward_features(images, list(layers))
    return {layer: flatten_features(feats[layer]) for layer in layers}


# ------------------------------------------------------------------ Adam inside the ball
def adam_minimise(
    loss_fn: LossFn,
    images: Tensor,
    labels: Tensor,
    threat: ThreatModel,
    *,
    lr: float,
    random_start: bool = False,
    keep_best: bool = False,
    generator: torch.Generator | None = None,
    observe: Callable[[Tensor, Tensor], None] | None = None,
) -> AscentResult:
    """Minimise a per-example loss with Adam over the threat ball, for ``threat.steps`` steps.

    Parametrisation (the point is always inside the ball and [0, 1]):

    - L-inf: ``x' = clip(x + eps * tanh(w), 0, 1)`` (Carlini-Wagner style change of variables, as
      in Sitawarin and Wagner's attacks). The clip to [0, 1] is passed straight through in the
      backward pass, so a pixel pinned at 0 or 1 still feels the gradient and can come back;
      ``lr`` is a step in w-space (at w = 0 a pixel moves by about ``lr * eps`` per step).
    - L2: ``x' = clip(x + P(eps / sqrt(D) * w), 0, 1)`` with P the (differentiable) radial
      projection onto the eps ball and the same straight-through clip; one Adam step moves the
      point by at most about ``lr * eps`` in L2 norm.

    Adam acts elementwise, so examples stay independent. Gradients come from
    :func:`torch.autograd.grad` with respect to w only (no model parameter ``.grad`` is
    written). Non-finite gradient entries count as zero.

    Args:
        loss_fn: ``loss_fn(x_adv, labels) -> Tensor[B]``, the loss to *decrease*.
        images: clean images in [0, 1].
        labels: passed to ``loss_fn``.
        threat: the ball (eps, norm) and the number of steps.
        lr: Adam's learning rate, in the units above.
        random_start: start from a uniform random point of the ball instead of the clean image.
        keep_best: return per example the iterate with the lowest loss (one extra forward pass).
        generator: random source of the random start.
        observe: called as ``observe(x_iterate, loss)`` (both detached) for every evaluated
            iterate, the final one included (which then costs one extra forward pass).

    Returns:
        An :class:`AscentResult` whose ``objective`` rows hold *minus* the loss (the quantity
        ascended, as for :func:`pgd_maximise`): row t is the iterate before step t, plus a last
        row for the final iterate when ``keep_best`` or ``observe`` is set.
    """
    x_clean = images.detach()
    eps, norm = threat.eps, threat.norm
    batch = x_clean.shape[0]
    device = x_clean.device
    if threat.is_trivial:
        flags = torch.zeros(batch, dtype=torch.bool, device=device)
        return AscentResult(x_clean.clone(), torch.empty(0, batch, device=device), flags, flags.clone())
    start = random_init(x_clean, eps, norm, generator) if (random_start and eps > 0) else x_clean
    start = project(start, x_clean, eps, norm)

    if norm == "linf":
        w0 = torch.atanh(((start - x_clean) / eps).clamp(-_TANH_LIMIT, _TANH_LIMIT))

        def to_image(w: Tensor) -> Tensor:
            raw = x_clean + eps * torch.tanh(w)
            return raw + (raw.clamp(0.0, 1.0) - raw).detach()  # straight-through clip

    elif norm == "l2":
        scale = eps / math.sqrt(x_clean[0].numel())
        w0 = (start - x_clean) / scale

        def to_image(w: Tensor) -> Tensor:
            delta = scale * w
            length = delta.flatten(1).norm(dim=1).view(-1, *([1] * (delta.dim() - 1)))
            # Differentiable radial projection: outside the ball only the tangential part of the
            # gradient survives, so Adam's fixed points are the constrained optimum's.
            delta = delta * (eps / length.clamp_min(eps))
            raw = x_clean + delta
            return raw + (raw.clamp(0.0, 1.0) - raw).detach()  # straight-through clip

    else:
        raise ConfigError(f"norm={norm!r} is not one of linf, l2")

    w = w0.detach().clone().requires_grad_(True)
    optimiser = torch.optim.Adam([w], lr=lr)
    zero_grad = torch.ones(batch, dtype=torch.bool, device=device)
    nonfinite = torch.zeros(batch, dtype=torch.bool, device=device)
    best_x = start.clone()
    best_loss = torch.full((batch,), math.inf, device=device)
    trace: list[Tensor] = []

    def record(x: Tensor, loss: Tensor) -> None:
        nonlocal best_x
        loss = loss.detach().float()
        trace.append(-loss)
        nonfinite.logical_or_(~torch.isfinite(loss))
        better = loss < best_loss  # NaN compares False: a NaN iterate is never kept
        best_loss.copy_(torch.where(better, loss, best_loss))
        best_x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x, best_x)
        if observe is not None:
            observe(x, loss)

    for _ in range(threat.steps):
        with torch.enable_grad():
            x_adv = to_image(w)
            loss = _check_objective(loss_fn(x_adv, labels), batch)
            grad = input_gradient(loss, w)
        record(x_adv.detach().clamp(0.0, 1.0), loss)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        zero_grad.logical_and_(grad.flatten(1).abs().amax(dim=1) == 0)
        w.grad = grad
        optimiser.step()

    with torch.no_grad():
        x_final = project(to_image(w).detach(), x_clean, eps, norm)
        if keep_best or observe is not None:
            record(x_final, _check_objective(loss_fn(x_final, labels), batch))
    x_out = best_x if keep_best else x_final
    objective = torch.stack(trace) if trace else torch.empty(0, batch, device=device)
    return AscentResult(x_out.detach(), objective, zero_grad, nonfinite)
