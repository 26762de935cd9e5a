"""TRADES (Zhang, Yu, Jiao, Xing, El Ghaoui and Jordan, *Theoretically Principled Trade-off between
Robustness and Accuracy*, ICML 2019, arXiv:1901.08573).

Minimise CE(f(x), y) + beta * KL(f(x) || f(x_adv)), where x_adv maximises the same KL inside the
eps ball, starting from x plus a small Gaussian (at x_adv = x the KL and its gradient are zero,
so an ascent from x itself would never move).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ask.attacks.ascent import input_gradient
from ask.attacks.threat import ascent_step, project
from ask.defenses.at import check_number, inner_mode, make_threat
from ask.defenses.base import Defense, register_defense

__all__ = ["TRADES", "kl_divergence"]


def kl_divergence(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """Per-example KL(softmax(clean) || softmax(adv)), computed from log-probabilities (no 0 * log 0)."""
    log_p = F.log_softmax(clean_logits.float(), dim=1)
    log_q = F.log_softmax(adv_logits.float(), dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


@register_defense
class TRADES(Defense):
    """TRADES: CE on the clean batch plus ``beta`` times the clean-to-adversarial KL (Zhang et al. 2019).

    Inner maximisation (eval mode, batch-norm statistics untouched): x_adv starts at
    ``x + init_std * N(0, 1)`` (projected into the ball and [0, 1]) and takes ``steps`` sign
    steps (L-inf; normalised for L2) up the KL against the clean prediction, which is held fixed
    during the ascent. The outer loss runs in train mode and differentiates the KL through both
    the clean and the adversarial predictions, as the authors do; the clean and adversarial
    batches go through the network separately, so each is normalised by its own batch
    statistics (TRADES' reference code).

    Hyperparameters (``conf/defense/trades.yaml``):
        beta: weight of the KL term (6, the authors' CIFAR-10 value).
        eps: radius of the ball. Default 8/255, the TRADES paper's CIFAR-10 setting (a stronger
            conventional baseline than AT at 4/255; set ``eps`` to compare at equal radius).
        step_size, steps: the inner budget (2/255, 10 steps).
        norm: ``linf`` or ``l2``.
        init_std: standard deviation of the Gaussian start (0.001, the authors').
    """

    name = "trades"

    def __init__(
        self,
        model: nn.Module,
        *,
        label_smoothing: float = 0.0,
        beta: float = 6.0,
        eps: Any = "8/255",
        step_size: Any = "2/255",
        steps: int = 10,
        norm: str = "linf",
        init_std: float = 0.001,
        **unknown: Any,
    ) -> None:
        super().__init__(model, label_smoothing=label_smoothing, **unknown)
        checked = self.check_settings({"beta": beta, "eps": eps, "step_size": step_size, "steps": steps,
                                       "norm": norm, "init_std": init_std})
        self.beta, self.init_std, self.threat = checked["beta"], checked["init_std"], checked["threat"]

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "beta": check_number(cls.name, "beta", settings["beta"]),
            "init_std": check_number(cls.name, "init_std", settings["init_std"]),
            # The Gaussian start replaces the ball's uniform one.
            "threat": make_threat(cls.name, eps=settings["eps"], step_size=settings["step_size"],
                                  steps=settings["steps"], norm=settings["norm"], random_start=False),
        }

    def adversarial(self, images: Tensor) -> Tensor:
        """x_adv maximising KL(f(x) || f(x_adv)) (eval mode, model flags restored), detached."""
        threat = self.threat
        x_clean = images.detach()
        if threat.is_trivial:
            return x_clean
        with inner_mode(self.model), torch.no_grad():
            target = self.model(x_clean).detach()
            noise = torch.randn(x_clean.shape, device=x_clean.device, dtype=x_clean.dtype)
            x_adv = project(x_clean + self.init_std * noise, x_clean, threat.eps, threat.norm)
        with inner_mode(self.model):
            for _ in range(threat.steps):
                x_adv.requires_grad_(True)
                with torch.enable_grad():
                    kl = kl_divergence(target, self.model(x_adv)).sum()
                    grad = input_gradient(kl, x_adv)
                x_adv = project(ascent_step(x_adv.detach(), grad, threat.step_size, threat.norm),
                                x_clean, threat.eps, threat.norm)
        return x_adv.detach()

    def robust_term(self, images: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
        """``(mean KL(f(x) || f(x_adv)), clean logits)`` in the model's current mode."""
        clean_logits = self.model(images)
        adv_logits = self.model(x_adv)
        return kl_divergence(clean_logits, adv_logits).mean(), clean_logits

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        x_adv = self.adversarial(images)
        kl, clean_logits = self.robust_term(images, x_adv)
        ce = F.cross_entropy(clean_logits, labels, label_smoothing=self.label_smoothing)
        # Clean logits: TRADES fits the clean batch, so the running train accuracy is the clean one.
        return ce + self.beta * kl, clean_logits
