"""Adv-kNN: attack a kNN through a differentiable head fitted to imitate its vote.

Li, Chen, He and Xue, *Adv-kNN: Adversarial Attacks on K-Nearest Neighbor Classifiers with
Approximate Gradients*, arXiv:1911.06591, 2019.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ask.attacks.base import Attack
from ask.attacks.registry import register_attack
from ask.attacks.support import POOL_SEED, check_int, check_knn_layers, check_positive, flat_features
from ask.attacks.threat import ThreatModel
from ask.errors import ConfigError
from ask.knn.fitted import cached_fit
from ask.knn.similarity import flatten_features, l2_normalize
from ask.utils import precision

__all__ = ["KL_DIRECTIONS", "AdvKNNAttack", "VoteHead"]

#: ``forward``: KL(p_kNN(x) || q(x')); ``reverse``: KL(q(x') || p_kNN(x)).
KL_DIRECTIONS = ("forward", "reverse")

logger = logging.getLogger(__name__)


class VoteHead(nn.Module):
    """Linear + log-softmax on one layer's features, standardised with the pool's statistics.

    ``forward(h) = log_softmax(W ((n(h) - mu) / sd) + b)``, where n is the L2 normalisation for
    a cosine store (the kNN compares directions, so the head sees what the kNN sees) and the
    identity for an l2 store; mu and sd are per-dimension statistics of the pool points the head
    is fitted on (dimensions that never vary there keep sd = 1).
    """

    def __init__(self, mean: Tensor, std: Tensor, num_classes: int, normalise: bool) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone())
        self.register_buffer("std", std.detach().clone())
        self.normalise = normalise
        self.linear = nn.Linear(mean.numel(), num_classes)
        nn.init.zeros_(self.linear.weight)  # start at the uniform distribution: deterministic fit
        nn.init.zeros_(self.linear.bias)

    def standardise(self, features: Tensor) -> Tensor:
        """``(n(h) - mu) / sd``: what the linear layer sees."""
        h = flatten_features(features).float()
        if self.normalise:
            h = l2_normalize(h)
        return (h - self.mean) / self.std

    def forward(self, features: Tensor) -> Tensor:
        # In fp32 inside an attack's autocast too: a bf16 linear layer rounds the logits it is
        # fitted on and attacked through (ask.utils.precision.fp32).
        with precision.fp32():
            return self.log_probs(self.standardise(features))

    def log_probs(self, standardised: Tensor) -> Tensor:
        """The head on already standardised features (the fit's input never changes)."""
        return F.log_softmax(self.linear(standardised), dim=1)


@register_attack
class AdvKNNAttack(Attack):
    """Adv-kNN (Li et al. 2019): PGD on a fitted surrogate of the kNN's vote distribution.

    Fitting (once per attack object, lazily, from the reference pool only): at every attacked
    layer l, ``fit_points`` pool points (drawn with a fixed seed) get their leave-one-out kNN vote
    distribution p_kNN (vote fractions of their k nearest *other* pool points); a
    :class:`VoteHead` q_l is fitted to them by minimising the mean KL(p_kNN || q_l) plus
    ``weight_decay * ||W||^2`` with full-batch Adam (``fit_steps`` steps, learning rate
    ``fit_lr``, from zero weights), on the model's device. Evaluated points never enter the fit, so
    a head is fitted once per (checkpoint, pool, layer, fit settings) and cached beside the pool's
    features when the store has a cache directory (:mod:`ask.knn.fitted`).

    Attack: for a clean x, p_l(x) is the kNN vote distribution of x at each layer (vote fractions
    of its k nearest pool points). PGD (:meth:`Attack.maximise`: random start, sign steps for
    L-inf, normalised steps for L2) maximises a KL divergence between the head on x' and p_l(x),
    summed over the layers:

    - ``kl="forward"`` (default): KL(p_l(x) || q_l(h_l(x'))) = the cross-entropy of the head
      against the clean vote, minus the vote's entropy. It grows monotonically as the head
      leaves the classes the kNN voted for.
    - ``kl="reverse"``: KL(q_l(h_l(x')) || p~_l(x)), with the vote smoothed as
      p~ = (1 - s) p + s / C (s = ``smoothing``) so its log is finite. Its minimum sits at
      q = p~, and ascent from a head that is *more* confident than p~ in the voted class climbs
      the wrong side to a local maximum of only -log p~_y (q -> one-hot on y); on the digits model
      it succeeded on under 1 % of points where the forward direction reached about 18 %.

    The head's weights carry an L2 penalty (``weight_decay``) because an unpenalised head on
    well-separated features grows logit gaps so large that its softmax saturates in float32 and
    the input gradient is exactly zero (about 40 % of the digits points never moved).

    Li et al. put a "deep kNN block" on the features and use its gradients in a C&W-style
    attack; a linear head on frozen features is the smallest such block.

    Hyperparameters:
        layers: the attacked layer names (each must be in the store); one head per layer.
        k: neighbours in the imitated vote (the victim's k).
        fit_steps: Adam steps of the fit.
        fit_lr: Adam's learning rate for the fit.
        fit_points: pool points the head is fitted on (all if the pool is smaller).
        weight_decay: L2 penalty on the head's weights during the fit.
        smoothing: s above (``kl="reverse"`` only); must lie in (0, 1].
        kl: ``"forward"`` or ``"reverse"``, see above.
        keep_best: return per point the iterate with the highest KL rather than the last one.
    """

    name = "advknn"
    needs_store = True

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel,
        *,
        store: Any = None,
        generator: torch.Generator | None = None,
        layers: str | Sequence[str] = (),
        k: int = 5,
        fit_steps: int = 300,
        fit_lr: float = 0.05,
        fit_points: int = 10000,
        weight_decay: float = 0.01,
        smoothing: float = 0.01,
        kl: str = "forward",
        keep_best: bool = False,
    ) -> None:
        layer_list = [layers] if isinstance(layers, str) else list(layers)
        super().__init__(
            model, threat, store=store, generator=generator, layers=layer_list, k=k, fit_steps=fit_steps,
            fit_lr=fit_lr, fit_points=fit_points, weight_decay=weight_decay, smoothing=smoothing, kl=kl,
            keep_best=keep_best,
        )
        self.layers = check_knn_layers(self.name, model, store, layer_list)
        checked = self.check_settings({"k": k, "fit_steps": fit_steps, "fit_lr": fit_lr, "fit_points": fit_points,
                                       "weight_decay": weight_decay, "smoothing": smoothing, "kl": kl})
        self.k, self.fit_steps, self.fit_lr = checked["k"], checked["fit_steps"], checked["fit_lr"]
        self.fit_points, self.weight_decay = checked["fit_points"], checked["weight_decay"]
        self.smoothing = checked["smoothing"]
        if self.k + 1 > len(store.labels):
            raise ConfigError(f"attack 'advknn' k={k} needs at least k + 1 = {k + 1} pool points")
        self.kl = kl
        self.keep_best = bool(keep_best)
        self.num_classes = int(store.num_classes)
        self._heads: dict[str, VoteHead] | None = None
        self.fit_agreement: dict[str, float] = {}

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        checked = {
            "k": check_int(cls.name, "k", settings["k"]),
            "fit_steps": check_int(cls.name, "fit_steps", settings["fit_steps"], minimum=0),
            "fit_lr": check_positive(cls.name, "fit_lr", settings["fit_lr"]),
            "fit_points": check_int(cls.name, "fit_points", settings["fit_points"], minimum=2),
            "weight_decay": check_positive(cls.name, "weight_decay", settings["weight_decay"], allow_zero=True),
            "smoothing": check_positive(cls.name, "smoothing", settings["smoothing"]),
        }
        if checked["smoothing"] > 1:
            raise ConfigError(f"attack 'advknn' smoothing={settings['smoothing']!r} must lie in (0, 1], e.g. 0.01")
        if settings["kl"] not in KL_DIRECTIONS:
            raise ConfigError(f"attack 'advknn' kl={settings['kl']!r} is not one of {', '.join(KL_DIRECTIONS)}")
        return checked

    # ------------------------------------------------------------------------- the kNN vote
    def votes(self, layer: str, features: Tensor, exclude: Tensor | None = None) -> Tensor:
        """kNN vote fractions [B, C] of ``features`` at ``layer`` (unsmoothed).

        ``exclude`` (pool rows [B]) makes the vote leave-one-out: each query's own pool row is
        dropped from its k + 1 nearest (the farthest one is dropped when the row is not among
        them, which only happens with more than k exact duplicates).
        """
        k = self.k if exclude is None else self.k + 1
        _, rows = self.store.search(layer, features, k)
        rows = torch.as_tensor(rows).long().cpu()
        if exclude is not None:
            drop = rows == exclude.view(-1, 1).cpu()
            drop[~drop.any(dim=1), -1] = True
            rows = rows[~drop].view(-1, self.k)
        labels = self.store.labels[rows]
        counts = torch.zeros(rows.shape[0], self.num_classes)
        counts.scatter_add_(1, labels, torch.ones(labels.shape, dtype=counts.dtype))
        return (counts / self.k).to(features.device)

    # ------------------------------------------------------------------------------ the fit
    def heads(self) -> dict[str, VoteHead]:
        """The fitted heads, one per layer (fitted on first use from the pool only, then cached)."""
        if self._heads is None:
            device = self.device()
            n = len(self.store.labels)
            generator = torch.Generator().manual_seed(POOL_SEED)
            rows = torch.randperm(n, generator=generator)[: min(self.fit_points, n)].sort().values
            self._heads = {layer: self._cached_head(layer, rows, device) for layer in self.layers}
        return self._heads

    def _cached_head(self, layer: str, rows: Tensor, device: torch.device) -> VoteHead:
        """The head of ``layer``: fitted once per (checkpoint, pool, layer, fit settings), see
        :mod:`ask.knn.fitted`; the device type is in the key because a GPU fit rounds differently."""
        settings = {
            "layer": layer, "k": self.k, "fit_steps": self.fit_steps, "fit_lr": self.fit_lr,
            "fit_points": self.fit_points, "weight_decay": self.weight_decay, "seed": POOL_SEED,
            "num_classes": self.num_classes, "device": device.type,
        }

        def fit() -> dict[str, Any]:
            head = self._fit(layer, rows, device)
            state = {name: value.cpu() for name, value in head.state_dict().items()}
            return {"state": state, "agreement": self.fit_agreement[layer]}

        def build(saved: dict[str, Any]) -> VoteHead:
            state = saved["state"]
            head = VoteHead(state["mean"], state["std"], self.num_classes, self.store.metric == "cosine")
            head.load_state_dict(state)  # RuntimeError for missing or mis-shaped entries
            self.fit_agreement[layer] = float(saved["agreement"])
            return head.to(device).requires_grad_(False).eval()

        return cached_fit(self.store, "advknn-head", settings, fit, build)

    def _fit(self, layer: str, rows: Tensor, device: torch.device) -> VoteHead:
        pool = self.store.features[layer]
        with torch.no_grad():
            target = self.votes(layer, pool[rows], exclude=rows).to(device)
            feats = pool[rows].to(device)
            basis = l2_normalize(feats.float()) if self.store.metric == "cosine" else feats.float()
            mean = basis.mean(dim=0)
            std = basis.std(dim=0)
            std = torch.where(std > 1e-8, std, torch.ones_like(std))
        head = VoteHead(mean, std, self.num_classes, self.store.metric == "cosine").to(device)
        # The pool's features are fixed during the fit: standardised once, not at every step
        # (on a 20,000-point CIFAR-10 pool that was 80 % of the fit). Same values, same head.
        with torch.no_grad():
            standardised = head.standardise(feats)
        del feats, basis
        optimiser = torch.optim.Adam(head.linear.parameters(), lr=self.fit_lr)
        params = list(head.linear.parameters())
        with torch.enable_grad():
            for _ in range(self.fit_steps):
                log_q = head.log_probs(standardised)
                loss = F.kl_div(log_q, target, reduction="batchmean")
                if self.weight_decay:
                    loss = loss + self.weight_decay * head.linear.weight.pow(2).sum()
                # Gradients of the head only: autograd.grad leaves the backbone untouched.
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads, strict=True):
                    p.grad = g
                optimiser.step()
        head.requires_grad_(False)
        head.eval()
        with torch.no_grad():
            log_q = head.log_probs(standardised)
            kl = float(F.kl_div(log_q, target, reduction="batchmean"))
            agree = float((log_q.argmax(1) == target.argmax(1)).float().mean())
        self.fit_agreement[layer] = agree
        logger.info(
            "advknn: head for layer %s fitted on %d pool points (KL %.4f, argmax agrees with the "
            "leave-one-out vote on %.1f%%)", layer, len(rows), kl, 100 * agree,
        )
        return head

    # --------------------------------------------------------------------------- the attack
    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        heads = self.heads()
        with torch.no_grad():
            clean = flat_features(self.model, images, self.layers)
            p = {layer: self.votes(layer, clean[layer]).to(images.device) for layer in self.layers}
            log_p = {
                layer: ((1 - self.smoothing) * v + self.smoothing / self.num_classes).log()
                for layer, v in p.items()
            }

        def objective(x_adv: Tensor, _: Tensor) -> Tensor:
            feats = flat_features(self.model, x_adv, self.layers)
            total = 0.0
            for layer in self.layers:
                log_q = heads[layer](feats[layer])
                if self.kl == "forward":
                    # KL(p || q) with the raw vote (0 log 0 = 0): the cross-entropy of q against
                    # the vote, minus a constant; it only grows as q leaves the voted classes.
                    total = total + (torch.xlogy(p[layer], p[layer]) - p[layer] * log_q).sum(dim=1)
                else:
                    total = total + (log_q.exp() * (log_q - log_p[layer])).sum(dim=1)
            return total

        return self.maximise(objective, images, labels, keep_best=self.keep_best)
