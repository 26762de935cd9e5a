"""Plain (undefended) training: cross-entropy on the clean batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ask.defenses.base import Defense, register_defense


@register_defense
class NoDefense(Defense):
    name = "none"

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing), logits
