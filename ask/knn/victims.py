"""kNN victims: a majority vote of the k nearest reference points at one layer (SPEC, Victims)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ask.errors import ConfigError
from ask.knn.cache import model_device
from ask.knn.store import ReferenceStore


def vote(neighbor_labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Majority vote over ``neighbor_labels`` [B, k] (ordered most similar first).

    Returns ``(predictions [B] int64, vote fractions [B, C] float32)``. A tie goes to the tied
    class that appears first in the neighbour list, i.e. to the nearest neighbour among the tied
    classes (not to the lowest class index, which ``argmax`` of the fractions would give).
    """
    if neighbor_labels.dim() != 2 or neighbor_labels.shape[1] < 1:
        raise ValueError(f"neighbor_labels must be [B, k] with k >= 1; got {tuple(neighbor_labels.shape)}")
    labels = neighbor_labels.long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"neighbour labels must lie in [0, {num_classes})")
    b, k = labels.shape
    counts = torch.zeros(b, num_classes, dtype=torch.float32, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones(b, k, dtype=torch.float32, device=labels.device))
    tied = counts == counts.max(dim=1, keepdim=True).values
    # Position of the first neighbour whose class is among the tied winners; argmax returns the
    # first maximal index.
    first = tied.gather(1, labels).to(torch.uint8).argmax(dim=1, keepdim=True)
    return labels.gather(1, first).squeeze(1), counts / k


class KNNClassifier:
    """kNN on one layer's features of ``model``: k nearest pool points in ``store``, majority vote.

    Inputs are moved to the model's device; outputs come back on the input's device. The model
    runs in eval mode and its training flag is restored.
    """

    def __init__(self, model: nn.Module, store: ReferenceStore, layer: str, k: int) -> None:
        if layer not in store.features:
            raise ConfigError(
                f"layer {layer!r} is not in the reference store (it has {', '.join(store.layers)}); add it to knn.layers"
            )
        if not 1 <= k <= len(store):
            raise ConfigError(
                f"knn.k={k} but the reference pool has only {len(store)} points; lower knn.k or raise knn.pool_per_class"
            )
        self.model = model
        self.store = store
        self.layer = layer
        self.k = int(k)
        self.num_classes = store.num_classes

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        """Flattened features of ``x`` at the classifier's layer, on the model's device."""
        was_training = self.model.training
        self.model.eval()
        try:
            f = self.model.forward_features(x.to(model_device(self.model)), [self.layer])[self.layer]
        finally:
            self.model.train(was_training)
        return f.reshape(f.shape[0], -1).float()

    @torch.no_grad()
    def neighbors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(similarities [B, k], pool rows [B, k])`` of the k nearest pool points, nearest first."""
        return self.store.search(self.layer, self.features(x), self.k)

    @torch.no_grad()
    def predict_with_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(predictions [B], vote fractions [B, C])`` on ``x``'s device."""
        _, rows = self.neighbors(x)
        pred, scores = vote(self.store.labels[rows.cpu()], self.num_classes)
        return pred.to(x.device), scores.to(x.device)

    @torch.no_grad()
    def predict_scores(self, x: Tensor) -> Tensor:
        """Vote fractions [B, C] (each row sums to 1)."""
        return self.predict_with_scores(x)[1]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Majority-vote labels [B], ties to the nearest neighbour."""
        return self.predict_with_scores(x)[0]
