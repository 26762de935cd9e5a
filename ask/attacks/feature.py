"""Feature adversaries: make a point's hidden features imitate those of a guide of another class.

Sabour, Cao, Faghri and Fleet, *Adversarial Manipulation of Deep Representations*, ICLR 2016,
arXiv:1511.05122.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ask.attacks.base import Attack
from ask.attacks.registry import register_attack
from ask.attacks.support import check_knn_layers, check_labels, flat_features, gather_pool
from ask.attacks.threat import ThreatModel
from ask.errors import ConfigError

__all__ = ["FeatureAttack"]

# Guards the per-layer normalisation when a clean point already sits on its guide.
_TINY = 1e-12


@register_attack
class FeatureAttack(Attack):
    """Feature adversaries (Sabour et al. 2016) against kNN victims: PGD towards a guide's features.

    The guide x_g of a clean input x is the pool point of another class nearest to h_l(x) at the
    first attacked layer, under the store's metric (``store.search_per_class`` with k = 1, the
    input's own class excluded). Its stored pool features h_l(x_g) are the targets, at every
    attacked layer. The attack minimises

        sum_l ||h_l(x') - h_l(x_g)||^2 / ||h_l(x) - h_l(x_g)||^2

    by projected gradient ascent on its negative (:meth:`Attack.maximise`: random start if
    ``threat.random_start``, sign steps for L-inf, normalised steps for L2). Each layer's term is
    divided by its value at the clean input so layers of different scale count alike; with one
    layer this is Sabour et al.'s squared Euclidean objective up to a constant factor, which the
    steps ignore. (Sabour et al. solve a box-constrained L-BFGS problem; here the ball is shared
    with every other attack of the run.)

    Hyperparameters:
        layers: the attacked layer names (each must be in the store); the first picks the guide.
        keep_best: return per point the iterate with the smallest objective rather than the last.
    """

    name = "feature"
    needs_store = True

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel,
        *,
        store: Any = None,
        generator: torch.Generator | None = None,
        layers: str | Sequence[str] = (),
        keep_best: bool = False,
    ) -> None:
        layer_list = [layers] if isinstance(layers, str) else list(layers)
        super().__init__(model, threat, store=store, generator=generator, layers=layer_list, keep_best=keep_best)
        self.layers = check_knn_layers(self.name, model, store, layer_list)
        if store.num_classes < 2:
            raise ConfigError("attack 'feature' needs a reference pool with at least two classes")
        self.keep_best = bool(keep_best)

    @torch.no_grad()
    def guides(self, images: Tensor, labels: Tensor) -> Tensor:
        """Pool rows [B] of the guides: the nearest pool point of another class, at the first layer."""
        layer = self.layers[0]
        query = flat_features(self.model, images, [layer])[layer]
        sims, rows = self.store.search_per_class(layer, query, 1)
        sims = torch.as_tensor(sims).float()[:, :, 0]
        rows = torch.as_tensor(rows).long()[:, :, 0]
        num_classes = sims.shape[1]
        check_labels(labels, num_classes)
        y = labels.to(sims.device).long().view(-1, 1)
        best_class = sims.scatter(1, y, -float("inf")).argmax(dim=1, keepdim=True)
        return rows.to(sims.device).gather(1, best_class).squeeze(1).to(images.device)

    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        guide_rows = self.guides(images, labels)
        targets = {layer: gather_pool(self.store, layer, guide_rows, images) for layer in self.layers}
        with torch.no_grad():
            clean = flat_features(self.model, images, self.layers)
            scale = {
                layer: (clean[layer].float() - targets[layer]).pow(2).sum(1).clamp_min(_TINY)
                for layer in self.layers
            }

        def objective(x_adv: Tensor, _: Tensor) -> Tensor:
            feats = flat_features(self.model, x_adv, self.layers)
            total = 0.0
            for layer in self.layers:
                total = total + (feats[layer].float() - targets[layer]).pow(2).sum(1) / scale[layer]
            return -total

        return self.maximise(objective, images, labels, keep_best=self.keep_best)
