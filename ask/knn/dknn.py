"""Deep kNN victims (Papernot & McDaniel 2018; SPEC, Victims): kNN on several layers at once.

Two classifiers share one neighbour search (one forward pass for all layers, then an exact
search per layer):

- :class:`DkNNVoteClassifier`, the plain summed vote: every layer's k neighbours vote, the votes
  are added over the layers, no calibration.
- :class:`DkNNClassifier`, the conformal DkNN: the nonconformity of label j is
  alpha(x, j) = sum over layers of the number of the k neighbours whose label is not j; a
  calibration set held out from the pool gives the scores A = {alpha(x_i, y_i)}, and
  p_j(x) = |{a in A : a >= alpha(x, j)}| / |A|. Prediction argmax_j p_j, credibility max_j p_j,
  confidence 1 - the second largest p_j.

Since p_j is non-increasing in alpha(x, j), and alpha(x, j) = L·k - (votes for j), the labels with
the largest p always include those with the most summed votes; breaking ties in p by the smaller
nonconformity, then by the summed-vote rule, makes the DkNN prediction equal the summed-vote
prediction. The two victims differ in their scores (p-values, credibility) and in what a
calibration-aware defence or analysis can read from them, not in their labels.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ask.errors import ConfigError
from ask.knn.cache import model_device, to_float_images
from ask.knn.fitted import cached_fit, content_digest
from ask.knn.store import ReferenceStore
from ask.knn.victims import vote

log = logging.getLogger(__name__)

MISSING_CALIBRATION = (
    "victim 'dknn' needs a calibration split; set dataset.calib_per_class=N (e.g. 100) "
    "or use eval.victims=[dknn_vote]"
)


def _check_layers_and_k(store: ReferenceStore, layers: Sequence[str], k: int) -> tuple[str, ...]:
    layers = tuple(layers)
    if not layers:
        raise ConfigError("knn.layers is empty; DkNN needs at least one layer, e.g. [block3, block4]")
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise ConfigError(f"knn.layers lists {', '.join(repeated)} more than once; list each layer once")
    missing = [layer for layer in layers if layer not in store.features]
    if missing:
        raise ConfigError(
            f"layers {missing} are not in the reference store (it has {', '.join(store.layers)}); "
            "add them to knn.layers"
        )
    if not 1 <= k <= len(store):
        raise ConfigError(
            f"knn.k={k} but the reference pool has only {len(store)} points; "
            "lower knn.k or raise knn.pool_per_class"
        )
    return layers


def _first_listed(labels: Tensor, allowed: Tensor) -> Tensor:
    """For each row, the first entry of ``labels`` [B, M] whose class is set in ``allowed`` [B, C].

    Every row of ``allowed`` must contain at least one class present in that row of ``labels``.
    """
    hit = allowed.gather(1, labels).to(torch.uint8)
    return labels.gather(1, hit.argmax(dim=1, keepdim=True)).squeeze(1)


class _MultiLayerKNN:
    """Neighbour labels on several layers of ``model``, from one forward pass per batch.

    Layers are listed shallow to deep; :meth:`neighbor_labels` returns them deepest layer first,
    each layer's neighbours nearest first, which is the order the tie rule reads.
    """

    def __init__(
        self, model: nn.Module, store: ReferenceStore, layers: Sequence[str], k: int, batch_size: int
    ) -> None:
        self.layers = _check_layers_and_k(store, layers, k)
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        self.model = model
        self.store = store
        self.k = int(k)
        self.batch_size = int(batch_size)
        self.num_classes = store.num_classes

    @torch.no_grad()
    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Flattened float features of ``x`` at every layer, on the model's device (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        try:
            x = to_float_images(x.to(model_device(self.model)))
            out = self.model.forward_features(x, list(self.layers))
        finally:
            self.model.train(was_training)
        return {layer: out[layer].reshape(out[layer].shape[0], -1).float() for layer in self.layers}

    @torch.no_grad()
    def neighbor_labels(self, x: Tensor) -> Tensor:
        """Labels of the k nearest pool points at every layer, int64 [B, L·k] on the CPU.

        Columns: the deepest (last listed) layer's k neighbours first, nearest first, then the
        next-deepest layer's, and so on.
        """
        chunks = []
        for lo in range(0, x.shape[0], self.batch_size):
            feats = self.features(x[lo : lo + self.batch_size])
            per_layer = []
            for layer in reversed(self.layers):
                _, rows = self.store.search(layer, feats[layer], self.k)
                per_layer.append(self.store.labels[rows.cpu()])
            chunks.append(torch.cat(per_layer, dim=1))
        if not chunks:
            return torch.empty(0, len(self.layers) * self.k, dtype=torch.int64)
        return torch.cat(chunks)

    def _vote_counts(self, labels: Tensor) -> Tensor:
        """Summed votes per class, int64 [B, C], from :meth:`neighbor_labels`' output."""
        counts = torch.zeros(labels.shape[0], self.num_classes, dtype=torch.int64)
        return counts.scatter_add_(1, labels, torch.ones_like(labels))


class DkNNVoteClassifier(_MultiLayerKNN):
    """The plain summed-vote Deep kNN (no calibration).

    Each of the listed layers contributes its k nearest pool points' labels; the votes are summed
    over the layers and the class with the most votes wins. Tie rule: among the tied classes, the
    one that appears first in the neighbour list of the deepest layer (the *last* entry of
    ``layers``, so list them shallow to deep), nearest first; if no tied class appears there, the
    next-deepest layer decides, and so on. With one layer this is exactly :class:`KNNClassifier`.

    ``batch_size`` bounds how many inputs go through the model at once. Outputs are on the input's
    device; the model runs in eval mode under ``torch.no_grad`` and its training flag is restored.
    """

    def __init__(
        self, model: nn.Module, store: ReferenceStore, layers: Sequence[str], k: int, *, batch_size: int = 256
    ) -> None:
        super().__init__(model, store, layers, k, batch_size)

    @torch.no_grad()
    def predict_with_scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(predictions [B] int64, vote fractions [B, C] float32)`` on ``x``'s device."""
        pred, scores = vote(self.neighbor_labels(x), self.num_classes)
        return pred.to(x.device), scores.to(x.device)

    @torch.no_grad()
    def predict_scores(self, x: Tensor) -> Tensor:
        """Summed-vote fractions [B, C]: votes for each class over all layers / (L·k); rows sum to 1."""
        return self.predict_with_scores(x)[1]

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Summed-vote labels [B] (tie rule in the class docstring)."""
        return self.predict_with_scores(x)[0]


class DkNNClassifier(_MultiLayerKNN):
    """kNN on several layers with conformal calibration (Papernot & McDaniel 2018).

    ``calibration_images`` / ``calibration_labels``: a labelled set held out from the pool (the
    dataset's calib split; uint8 or float in [0, 1]). Their nonconformity scores
    alpha(x_i, y_i) are computed once here and kept sorted in ``calibration_scores`` (int64, CPU).

    Prediction: argmax_j p_j(x); ties in p (frequent, p-values being multiples of 1/|A|) go to the
    smaller nonconformity alpha(x, j), then to the summed-vote tie rule of
    :class:`DkNNVoteClassifier`, so results are deterministic (and equal that variant's labels).
    Outputs are on the input's device; the model runs in eval mode under ``torch.no_grad`` and its
    training flag is restored.
    """

    def __init__(
        self,
        model: nn.Module,
        store: ReferenceStore,
        layers: Sequence[str],
        k: int,
        calibration_images: Tensor | None = None,
        calibration_labels: Tensor | None = None,
        batch_size: int = 256,
        *,
        progress: bool = False,
    ) -> None:
        super().__init__(model, store, layers, k, batch_size)
        if calibration_images is None or calibration_labels is None or calibration_images.shape[0] == 0:
            raise ConfigError(MISSING_CALIBRATION)
        labels = torch.as_tensor(calibration_labels).detach().to("cpu", torch.int64).reshape(-1)
        n = labels.numel()
        if calibration_images.shape[0] != n:
            raise ValueError(f"{calibration_images.shape[0]} calibration images but {n} labels")
        if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
            raise ValueError(
                f"calibration labels must lie in [0, {self.num_classes}); "
                f"got {int(labels.min())}..{int(labels.max())}"
            )

        def calibrate() -> Tensor:
            scores = []
            with tqdm(total=n, disable=not progress, desc="DkNN calibration", unit="img", leave=False) as bar:
                for lo in range(0, n, self.batch_size):
                    batch = calibration_images[lo : lo + self.batch_size]
                    alpha = self._nonconformity_cpu(batch)
                    scores.append(alpha.gather(1, labels[lo : lo + self.batch_size, None]).squeeze(1))
                    bar.update(batch.shape[0])
            return torch.cat(scores).sort().values

        def checked(saved: object) -> Tensor:
            top = len(self.layers) * self.k
            if not (isinstance(saved, Tensor) and saved.dtype == torch.int64 and saved.shape == (n,)):
                raise ValueError(f"expected {n} int64 scores")
            if n and (int(saved[0]) < 0 or int(saved[-1]) > top or not bool((saved[1:] >= saved[:-1]).all())):
                raise ValueError(f"the scores are not sorted values in [0, {top}]")
            return saved

        # A function of the network, the pool and the calibration split only: computed once per
        # checkpoint, then read from beside the pool's features (ask.knn.fitted).
        settings = {
            "layers": list(self.layers), "k": self.k, "batch_size": self.batch_size,
            "images": content_digest(torch.as_tensor(calibration_images)), "labels": content_digest(labels),
            "model": content_digest(*model.state_dict().values()), "device": model_device(model).type,
        }
        self.calibration_scores: Tensor = cached_fit(store, "dknn-calibration", settings, calibrate, checked)
        log.info(
            "DkNN calibrated on %d points: nonconformity %d..%d (of at most %d)",
            n,
            int(self.calibration_scores[0]),
            int(self.calibration_scores[-1]),
            len(self.layers) * self.k,
        )

    # ------------------------------------------------------------------ scores

    def _nonconformity_cpu(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if labels is None:
            labels = self.neighbor_labels(x)
        return len(self.layers) * self.k - self._vote_counts(labels)

    def _calibration_counts(self, alpha: Tensor) -> Tensor:
        """|{a in A : a >= alpha}| per entry (int64): A is sorted, so |A| - (number of a < alpha)."""
        below = torch.searchsorted(self.calibration_scores, alpha.contiguous(), side="left")
        return self.calibration_scores.numel() - below

    @torch.no_grad()
    def nonconformity(self, x: Tensor) -> Tensor:
        """alpha(x, j) [B, C] int64: over all layers, how many of the k neighbours are not labelled j."""
        return self._nonconformity_cpu(x).to(x.device)

    @torch.no_grad()
    def p_values(self, x: Tensor) -> Tensor:
        """p_j(x) [B, C] float32: the fraction of calibration scores >= alpha(x, j)."""
        counts = self._calibration_counts(self._nonconformity_cpu(x))
        return (counts.double() / self.calibration_scores.numel()).float().to(x.device)

    @torch.no_grad()
    def predict_with_confidence(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(predictions [B] int64, credibility [B], confidence [B])`` on ``x``'s device.

        Credibility is the largest p-value (that of the prediction); confidence is 1 minus the
        second largest (1 when there is a single class).
        """
        labels = self.neighbor_labels(x)
        alpha = self._nonconformity_cpu(x, labels)
        counts = self._calibration_counts(alpha)  # integer numerators of p: exact tie tests
        best = counts == counts.max(dim=1, keepdim=True).values
        alpha_among_best = alpha.masked_fill(~best, torch.iinfo(alpha.dtype).max)
        best &= alpha_among_best == alpha_among_best.min(dim=1, keepdim=True).values
        # The survivors are the labels with the most summed votes (p is monotone in alpha), so each
        # row has one among its neighbours and the summed-vote tie rule applies.
        pred = _first_listed(labels, best)
        p = counts.double() / self.calibration_scores.numel()
        top = p.topk(min(2, self.num_classes), dim=1).values
        credibility = top[:, 0]
        second = top[:, 1] if self.num_classes > 1 else torch.zeros_like(credibility)
        confidence = 1.0 - second
        return pred.to(x.device), credibility.float().to(x.device), confidence.float().to(x.device)

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """argmax_j p_j(x) [B], ties as in the class docstring."""
        return self.predict_with_confidence(x)[0]
