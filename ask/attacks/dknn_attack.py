"""DkNN attack: pull a point's hidden features towards guide points of the nearest other class.

Sitawarin and Wagner, *On the Robustness of Deep K-Nearest Neighbors*, IEEE Security and Privacy
Workshops (DLS) 2019, arXiv:1903.08333.

This module also holds the helpers the other kNN baselines share (layer checks, pool distances,
and :func:`adam_minimise`, Adam inside the threat ball).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ask.attacks.base import AscentResult, Attack, LossFn, ThreatModel, project, random_init, register_attack
from ask.errors import ConfigError, ModelError
from ask.knn.similarity import rowwise_similarity

__all__ = [
    "DkNNAttack",
    "adam_minimise",
    "check_int",
    "check_knn_layers",
    "check_positive",
    "distance_from_similarity",
    "gather_pool",
    "smallest_class",
]

logger = logging.getLogger(__name__)

# tanh(w) never reaches +-1: starting points on the ball's surface map to this, not to +-inf.
_TANH_LIMIT = 1 - 1e-6
# Seed of the pool subsamples that fitted components draw (thresholds, heads): fixed, so two
# attack objects on the same store fit the same thing whatever points they later attack.
POOL_SEED = 0


# ------------------------------------------------------------------------- shared checks
def check_int(attack: str, name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``, else :class:`ConfigError` naming ``attack.name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"attack '{attack}' {name}={value!r} must be an integer >= {minimum}")
    return int(value)


def check_positive(attack: str, name: str, value: Any, allow_zero: bool = False) -> float:
    """``value`` as a finite float > 0 (or >= 0), else :class:`ConfigError`."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"attack '{attack}' {name}={value!r} must be a finite number {bound}")
    return float(value)


def check_knn_layers(attack: str, model: nn.Module, store: Any, layers: str | Sequence[str]) -> list[str]:
    """The attacked layers as a list, checked against the model and the reference store."""
    layer_list = [layers] if isinstance(layers, str) else list(layers)
    if not layer_list:
        raise ConfigError(f"attack '{attack}' needs at least one layer; set layers=[block3] (a layer of the model)")
    if len(set(layer_list)) != len(layer_list):
        raise ConfigError(f"attack '{attack}' layers={layer_list} names a layer twice; list each layer once")
    if not hasattr(model, "forward_features"):
        raise ModelError(
            f"attack '{attack}' needs a model with forward_features(x, layers); got {type(model).__name__}"
        )
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
    return {layer: feats[layer].flatten(1) for layer in layers}


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
            loss = _per_example(loss_fn(x_adv, labels), batch)
            (grad,) = torch.autograd.grad(loss.sum(), w)
        record(x_adv.detach().clamp(0.0, 1.0), loss)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        zero_grad.logical_and_(grad.flatten(1).abs().amax(dim=1) == 0)
        w.grad = grad
        optimiser.step()

    with torch.no_grad():
        x_final = project(to_image(w).detach(), x_clean, eps, norm)
        if keep_best or observe is not None:
            record(x_final, _per_example(loss_fn(x_final, labels), batch))
    x_out = best_x if keep_best else x_final
    objective = torch.stack(trace) if trace else torch.empty(0, batch, device=device)
    return AscentResult(x_out.detach(), objective, zero_grad, nonfinite)


def _per_example(loss: Tensor, batch: int) -> Tensor:
    if loss.shape != (batch,):
        raise ValueError(f"the attack loss must be per-example with shape [{batch}], got {tuple(loss.shape)}")
    return loss


def log_result(name: str, result: AscentResult) -> None:
    """Warn about points whose gradient was zero throughout or whose loss went non-finite."""
    batch = result.zero_grad.shape[0]
    n_zero = int(result.zero_grad.sum())
    if n_zero:
        logger.warning(
            "%s: the input gradient was exactly zero at every step for %d of %d points; "
            "they were not perturbed (saturated loss or gradient masking)", name, n_zero, batch,
        )
    n_bad = int(result.nonfinite.sum())
    if n_bad:
        logger.warning("%s: the attack loss was NaN/Inf for %d of %d points", name, n_bad, batch)


# ------------------------------------------------------------------------------ the attack
@register_attack
class DkNNAttack(Attack):
    """The DkNN attack (Sitawarin and Wagner 2019): move h_l(x') inside a cluster of another class.

    Guides (found once, on the clean input): for every class c != y, the mean distance from
    h_l(x) to the ``m`` nearest pool points of class c is summed over the attacked layers; the
    class t with the smallest sum is the target, and its ``m`` nearest pool points *at the first
    attacked layer* are the guides g_1..g_m (the same points at every layer, as in the authors'
    ``guide_layer``). The attack then minimises, over the threat ball,

        sum_l  mean_j  sigmoid(a * (d(h_l(x'), h_l(g_j)) / eta_l - 1)),

    a soft count of the guides still outside the radius eta_l, where eta_l is the mean distance
    from a pool point to its k-th nearest other pool point (estimated once per attack object on
    ``eta_points`` pool points drawn with a fixed seed, and cached: it depends only on the pool).
    d is the Euclidean distance for a store with metric ``"l2"`` and the cosine distance
    1 - cos for ``"cosine"``; the guides' features are the stored pool features.

    Optimiser: Adam on a tanh-parameterised point of the ball (see :func:`adam_minimise`),
    ``threat.steps`` iterations. The authors' binary search over a norm-penalty constant is
    dropped: the ball is the constraint, as for every attack of a run. The start is the clean
    image, or a uniform random point of the ball when ``threat.random_start`` is set. The result
    is the final iterate, or with ``keep_best`` the iterate with the lowest loss.

    Hyperparameters:
        layers: the attacked layer names (each must be in the store).
        m: number of guides (the authors use 15 to 100 with k = 75).
        a: slope of the sigmoid (the authors use 0.3 to 4).
        lr: Adam's learning rate (a step in tanh space for L-inf; a fraction of eps for L2).
        k: the neighbour rank behind eta_l (the victim's k).
        eta_points: pool points used to estimate eta_l.
        keep_best: return the lowest-loss iterate rather than the last one.
    """

    name = "dknn"
    needs_store = True

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel,
        *,
        store: Any = None,
        generator: torch.Generator | None = None,
        layers: str | Sequence[str] = (),
        m: int = 15,
        a: float = 4.0,
        lr: float = 0.1,
        k: int = 5,
        eta_points: int = 1000,
        keep_best: bool = False,
    ) -> None:
        layer_list = [layers] if isinstance(layers, str) else list(layers)
        super().__init__(
            model, threat, store=store, generator=generator, layers=layer_list, m=m, a=a, lr=lr, k=k,
            eta_points=eta_points, keep_best=keep_best,
        )
        self.layers = check_knn_layers(self.name, model, store, layer_list)
        self.m = check_int(self.name, "m", m)
        self.a = check_positive(self.name, "a", a)
        self.lr = check_positive(self.name, "lr", lr)
        self.k = check_int(self.name, "k", k)
        self.eta_points = check_int(self.name, "eta_points", eta_points)
        self.keep_best = bool(keep_best)
        smallest = smallest_class(store)
        if self.m > smallest:
            raise ConfigError(
                f"attack 'dknn' m={m} but the smallest class of the reference pool has {smallest} points; "
                "lower m or enlarge knn.pool_per_class"
            )
        if self.k + 1 > len(store.labels):
            raise ConfigError(f"attack 'dknn' k={k} needs at least k + 1 = {k + 1} pool points")
        self.metric: str = store.metric
        self._eta: dict[str, float] | None = None

    # ------------------------------------------------------------------------- fitted parts
    @torch.no_grad()
    def thresholds(self) -> dict[str, float]:
        """eta_l per layer: mean distance from a pool point to its k-th nearest other pool point.

        Uses only the pool: ``eta_points`` rows drawn with a fixed seed, their ``k + 1`` nearest
        pool points (the first being the point itself, or a duplicate at distance 0), and the
        distance of the last one. Computed on first use and cached.
        """
        if self._eta is None:
            n = len(self.store.labels)
            generator = torch.Generator().manual_seed(POOL_SEED)
            rows = torch.randperm(n, generator=generator)[: min(self.eta_points, n)]
            eta = {}
            for layer in self.layers:
                sims, _ = self.store.search(layer, self.store.features[layer][rows], self.k + 1)
                dist = distance_from_similarity(torch.as_tensor(sims)[:, self.k].float().cpu(), self.metric)
                eta[layer] = max(float(dist.mean()), 1e-12)
            self._eta = eta
            logger.info("dknn: eta per layer %s (k=%d, %d pool points)", eta, self.k, len(rows))
        return self._eta

    @torch.no_grad()
    def guides(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """``(targets [B], guide pool rows [B, m])`` for clean ``images`` (on the images' device)."""
        feats = flat_features(self.model, images, self.layers)
        total = None
        first_rows = None
        for layer in self.layers:
            sims, rows = self.store.search_per_class(layer, feats[layer], self.m)
            dist = distance_from_similarity(torch.as_tensor(sims).float(), self.metric).mean(dim=2)
            total = dist if total is None else total + dist
            if first_rows is None:
                first_rows = torch.as_tensor(rows).long()
        assert total is not None and first_rows is not None
        num_classes = total.shape[1]
        if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
            raise ConfigError(
                f"labels must lie in [0, {num_classes}) (the reference store's classes); "
                "the model and the store come from different datasets"
            )
        if num_classes < 2:
            raise ConfigError("attack 'dknn' needs a reference pool with at least two classes")
        y = labels.to(total.device).long()
        total = total.scatter(1, y.view(-1, 1), math.inf)
        targets = total.argmin(dim=1)
        guide_rows = first_rows.to(total.device)[torch.arange(len(y), device=total.device), targets]
        return targets.to(images.device), guide_rows.to(images.device)

    # --------------------------------------------------------------------------- the attack
    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        eta = self.thresholds()
        _, guide_rows = self.guides(images, labels)
        guide_feats = {layer: gather_pool(self.store, layer, guide_rows, images) for layer in self.layers}

        def loss_fn(x_adv: Tensor, _: Tensor) -> Tensor:
            feats = flat_features(self.model, x_adv, self.layers)
            total = 0.0
            for layer in self.layers:
                sim = rowwise_similarity(feats[layer], guide_feats[layer], self.metric)
                dist = distance_from_similarity(sim, self.metric)
                # float64: the sigmoid saturates (zero gradient) at an argument of ~17 in float32.
                ratio = dist.double() / eta[layer]
                total = total + torch.sigmoid(self.a * (ratio - 1.0)).mean(dim=1)
            return total.float()

        result = adam_minimise(
            loss_fn, images, labels, self.threat, lr=self.lr, random_start=self.threat.random_start,
            keep_best=self.keep_best, generator=self.generator,
        )
        self.last_result = result
        log_result(self.name, result)
        return result.adversarial
