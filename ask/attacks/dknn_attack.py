"""DkNN attack: pull a point's hidden features towards guide points of the nearest other class.

Sitawarin and Wagner, *On the Robustness of Deep K-Nearest Neighbors*, IEEE Security and Privacy
Workshops (DLS) 2019, arXiv:1903.08333.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ask.attacks.base import Attack, warn_about
from ask.attacks.registry import register_attack
from ask.attacks.support import (
    POOL_SEED,
    adam_minimise,
    check_int,
    check_knn_layers,
    check_labels,
    check_positive,
    distance_from_similarity,
    flat_features,
    gather_pool,
    smallest_class,
)
from ask.attacks.threat import ThreatModel
from ask.errors import ConfigError
from ask.knn.fitted import cached_fit
from ask.knn.similarity import l2_normalize, rowwise_similarity

__all__ = ["DkNNAttack"]

logger = logging.getLogger(__name__)


def _positive(saved: object) -> float:
    """A cached eta back as a float (ValueError for anything but a finite positive number)."""
    if isinstance(saved, bool) or not isinstance(saved, (int, float)) or not 0 < saved < math.inf:
        raise ValueError(f"eta {saved!r} is not a finite positive number")
    return float(saved)


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
    from a pool point to its k-th nearest other pool point (estimated on ``eta_points`` pool points
    drawn with a fixed seed, and cached: it depends only on the pool).
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
        a: slope of the sigmoid (the authors use 0.3 to 4). With eta from the victim's small k,
            other-class guides can lie 5 to 15 eta away (digits, smallcnn block3), where a = 4
            saturates the sigmoid even in float64 and the gradient is exactly zero; the default
            a = 1 does not, and it was as strong as or stronger than 0.3, 2 and 4 there.
        lr: Adam's learning rate (a step in tanh space for L-inf; a fraction of eps for L2). With
            20 steps, 0.3 reaches the corners of the ball; 0.1 left points short of them.
        k: the neighbour rank behind eta_l (the victim's k).
        eta_points: pool points used to estimate eta_l.
        keep_best: return the lowest-loss iterate rather than the last one.
    """

    name = "dknn"
    needs_store = True

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "m": check_int(cls.name, "m", settings["m"]),
            "a": check_positive(cls.name, "a", settings["a"]),
            "lr": check_positive(cls.name, "lr", settings["lr"]),
            "k": check_int(cls.name, "k", settings["k"]),
            "eta_points": check_int(cls.name, "eta_points", settings["eta_points"]),
        }

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel,
        *,
        store: Any = None,
        generator: torch.Generator | None = None,
        layers: str | Sequence[str] = (),
        m: int = 15,
        a: float = 1.0,
        lr: float = 0.3,
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
        checked = self.check_settings({"m": m, "a": a, "lr": lr, "k": k, "eta_points": eta_points})
        self.m, self.a, self.lr = checked["m"], checked["a"], checked["lr"]
        self.k, self.eta_points = checked["k"], checked["eta_points"]
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
        distance of the last one. Computed on first use, kept for the attack object's life and,
        when the store has a cache directory, cached beside the pool's features
        (:mod:`ask.knn.fitted`), so a later evaluation of the same checkpoint skips the search.
        """
        if self._eta is None:
            n = len(self.store.labels)
            generator = torch.Generator().manual_seed(POOL_SEED)
            rows = torch.randperm(n, generator=generator)[: min(self.eta_points, n)]
            eta = {}
            for layer in self.layers:
                settings = {"layer": layer, "k": self.k, "eta_points": self.eta_points, "seed": POOL_SEED}
                eta[layer] = cached_fit(self.store, "dknn-eta", settings,
                                        lambda layer=layer: self._mean_kth_distance(layer, rows), _positive)
            self._eta = eta
            logger.info("dknn: eta per layer %s (k=%d, %d pool points)", eta, self.k, len(rows))
        return self._eta

    def _mean_kth_distance(self, layer: str, rows: Tensor) -> float:
        sims, _ = self.store.search(layer, self.store.features[layer][rows], self.k + 1)
        dist = distance_from_similarity(torch.as_tensor(sims)[:, self.k].float().cpu(), self.metric)
        return max(float(dist.mean()), 1e-12)

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
        check_labels(labels, num_classes)
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
        cosine = self.metric == "cosine"
        if cosine:  # fixed for the whole attack: normalised once, not at every step
            guide_feats = {layer: l2_normalize(g) for layer, g in guide_feats.items()}

        def loss_fn(x_adv: Tensor, _: Tensor) -> Tensor:
            feats = flat_features(self.model, x_adv, self.layers)
            total = 0.0
            for layer in self.layers:
                sim = rowwise_similarity(feats[layer], guide_feats[layer], self.metric, b_normalized=cosine)
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
        warn_about(result, self.name)
        return result.adversarial
