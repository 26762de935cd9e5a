"""PGD-CE: projected gradient ascent on the network's cross-entropy.

Madry, Makelov, Schmidt, Tsipras and Vladu, *Towards Deep Learning Models Resistant to
Adversarial Attacks*, ICLR 2018, arXiv:1706.06083.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ask.attacks.ask_loss import logit_margin
from ask.attacks.base import Attack
from ask.attacks.registry import register_attack
from ask.attacks.threat import ThreatModel

__all__ = ["PGDAttack"]


@register_attack
class PGDAttack(Attack):
    """PGD on the DNN's cross-entropy (Madry et al. 2018), untargeted.

    Uniform random start in the ball, then ``steps`` times ``x <- Proj(x + step * sign(grad))``
    (L-inf) or a normalised-gradient step (L2), clipped to [0, 1]. In this project it is the
    baseline that attacks the network's logits and is transferred to the kNN victims. The
    cross-entropy is evaluated as ``softplus(lse_{c != y} z_c - z_y)`` so that a confident
    network's saturated softmax does not turn the sign step into float32 noise.

    Hyperparameters:
        keep_best: return per point the iterate with the highest cross-entropy rather than
            the last one.
    """

    name = "pgd"

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel,
        *,
        store: Any = None,
        generator: torch.Generator | None = None,
        keep_best: bool = False,
    ) -> None:
        super().__init__(model, threat, store=store, generator=generator, keep_best=keep_best)
        self.keep_best = keep_best

    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        def objective(x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            # Record the cross-entropy; step along its margin, whose gradient is the CE gradient
            # divided by sigmoid(margin) > 0 and does not underflow on a confident network.
            logits = self.model(x_adv)
            margin = logit_margin(logits, y)
            return F.softplus(margin), margin

        return self.maximise(objective, images, labels, keep_best=self.keep_best)
