"""The ASK loss (Wang et al., IEEE Access 2022): pure functions returning per-example losses.

For an input's feature h(x') and fixed in-class references R_c (k per class, found on the clean
input), with similarities s_j = s(h(x'), r_j) and temperature T:

- instance-wise (soft kNN): p_c = sum_{j in R_c} softmax_j(s_j / T) over all references of all
  classes; loss = -log(p_y + eps). Computed as -logaddexp(logsigmoid(lse_{R_y} - lse_{not R_y}),
  log eps), which never forms a probability that could underflow.
- class-wise: z_c = (1 / (T |R_c|)) sum_{j in R_c} s_j; loss = cross_entropy(z, y), computed by
  :func:`margin_cross_entropy`. With cosine similarity the sum is one dot product,
  sum_j cos(h, r_j) = <h / |h|, sum_j r_j / |r_j|>, so the loss needs of the references only
  their per-class sums of unit vectors (:class:`ClassSums`): a [B, C, D] product instead of
  [B, C, k, D]. Every class-wise cosine margin is computed that way; an attack whose references
  stay fixed sums them once (:func:`sum_unit_references`) instead of at every step.

Why the own-versus-other form: at T = 0.01 a well-separated clean point has p_y = 1 - 1e-20.
Written as lse_own - lse_all (or as F.cross_entropy), the gradient is a difference of two nearly
equal terms and float32 rounding noise (~1e-8) swamps the true direction (~1e-20), so a sign
step moves at random. Written through lse_own - lse_other, autograd forms
sigmoid(-z) * (grad lse_own - grad lse_other): the same value, with the direction exact.

``self_features`` (the *include-self* option) adds the clean h(x) to R_y as one more reference.
Higher loss means h(x') has left its own class's neighbourhood; the attack ascends it and the
ASK-Def regulariser descends it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ask.constants import ASK_KINDS
from ask.knn.similarity import (
    flatten_features,
    l2_normalize,
    pairwise_similarity,
    rowwise_similarity,
    unit_dots,
)
from ask.utils import precision

__all__ = [
    "KINDS",
    "ClassSums",
    "ask_loss",
    "ask_margin",
    "log_slope",
    "logit_margin",
    "loss_from_margin",
    "margin_cross_entropy",
    "multi_layer_ask_loss",
    "multi_layer_ask_objective",
    "sum_unit_references",
]

KINDS = ASK_KINDS


class ClassSums(NamedTuple):
    """Per class, the sum of its references' unit vectors: all the class-wise cosine loss needs.

    Attributes:
        sums: [B, C, D] (per-example references) or [C, D] (one set shared by the batch).
        count: the references summed per class (k), the divisor of z_c.
    """

    sums: Tensor
    count: int


def sum_unit_references(references: Tensor, *, normalized: bool = False) -> ClassSums:
    """``references`` [..., C, k, D] as :class:`ClassSums`, in at least float32.

    Differentiable: ASK-Def's references may carry gradient back to the weights, and the sum of
    unit vectors passes it on exactly as the k separate similarities would. ``normalized``: the
    references are already unit vectors.
    """
    full = _full(references)
    unit = full if normalized else l2_normalize(full)
    return ClassSums(unit.sum(dim=-2), int(references.shape[-2]))


def logit_margin(logits: Tensor, labels: Tensor) -> Tensor:
    """``logsumexp_{c != y} z_c - z_y``: the cross-entropy is ``softplus`` of it."""
    own = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), -math.inf)
    return torch.logsumexp(others, dim=1) - own


def margin_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example cross-entropy, ``softplus(logsumexp_{c != y} z_c - z_y)``.

    Equal to ``F.cross_entropy(logits, labels, reduction="none")`` in value, but its gradient
    keeps an exact direction when the softmax is saturated (see the module docstring), which is
    what an attack's sign step needs on a confident model.
    """
    return F.softplus(logit_margin(logits, labels))


def ask_margin(
    features: Tensor,
    references: Tensor | ClassSums,
    labels: Tensor,
    *,
    metric: str,
    temperature: float,
    kind: str = "instance",
    self_features: Tensor | None = None,
    references_normalized: bool = False,
    max_chunk_bytes: int | None = None,
) -> Tensor:
    """Per-example margin m of one layer; the ASK loss is an increasing function of it.

    instance: m = lse_{not R_y}(s/T) - lse_{R_y}(s/T), so p_y = sigmoid(-m);
    class: m = lse_{c != y} z_c - z_y, so the cross-entropy is softplus(m).

    Args:
        features: h(x') of the perturbed inputs, [B, D] (anything [B, ...] is flattened).
        references: reference features, [B, C, k, D] (per-example references, as ASK-Atk
            finds them) or [C, k, D] (one reference set shared by the batch, as in ASK-Def);
            ``references[..., c, :, :]`` are the references of class c. For the class-wise
            cosine loss they may come already summed as :class:`ClassSums`.
        labels: [B] class indices in [0, C); the class whose references count as "own".
        metric: ``"cosine"`` or ``"l2"`` (minus the Euclidean distance).
        temperature: T > 0.
        kind: ``"instance"`` (soft kNN probability) or ``"class"`` (class-mean logits).
        self_features: optional clean h(x), [B, D]; joins R_y as one more reference.
        references_normalized: the per-example ``references`` are already unit vectors (cosine
            only; see :func:`ask.knn.similarity.rowwise_similarity`).
        max_chunk_bytes: the largest [B, m, D] temporary the per-example similarity may form
            (``rowwise_similarity``'s chunking; None: no limit). The class-wise cosine margin and
            shared references form none.

    Returns:
        [B] margins, differentiable with respect to ``features``; float32 (float64 for float64
        inputs) even under ``torch.autocast``, which is switched off inside.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(KINDS)}")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    feats = flatten_features(features)
    batch, dim = feats.shape
    summed = isinstance(references, ClassSums)
    if summed and (kind, metric) != ("class", "cosine"):
        raise ValueError(f"summed references serve the class-wise cosine loss only, not kind={kind!r} "
                         f"metric={metric!r}; pass the [B, C, k, D] references")
    if summed:
        shape, shared = references.sums.shape, references.sums.dim() == 2
        if shape[-1] != dim or not (shared or (len(shape) == 3 and shape[0] == batch)):
            raise ValueError(f"summed references must be [B={batch}, C, D={dim}] or [C, D={dim}], got {tuple(shape)}")
    else:
        shape, shared = references.shape, references.dim() == 3
        if shape[-1] != dim or not (shared or (references.dim() == 4 and shape[0] == batch)):
            raise ValueError(f"references must be [B={batch}, C, k, D={dim}] or [C, k, D={dim}], got {tuple(shape)}")
    num_classes = shape[-2] if summed else shape[-3]
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape [{batch}], got {tuple(labels.shape)}")
    labels = labels.to(device=feats.device, dtype=torch.long)
    if batch and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) to match the references' class axis")

    # Under torch.autocast the products below would run in bf16/fp16 even on fp32 inputs; with
    # metric=l2 on 2,048-d features that rounding exceeds the spread of the similarities, so the
    # margin is computed with autocast off, on at-least-fp32 copies (the gradient flows back through
    # the casts in the features' own dtype).
    with precision.fp32():
        if kind == "class" and metric == "cosine":
            sums = references if summed else sum_unit_references(references, normalized=references_normalized)
            return _class_cosine_margin(_full(feats), ClassSums(_full(sums.sums), sums.count), labels,
                                        temperature=temperature,
                                        self_features=None if self_features is None else _full(self_features))
        return _margin(_full(feats), _full(references), labels, metric=metric, temperature=temperature,
                       kind=kind, self_features=None if self_features is None else _full(self_features),
                       references_normalized=references_normalized, max_chunk_bytes=max_chunk_bytes)


def _full(tensor: Tensor) -> Tensor:
    """``tensor`` in float32, or float64 if it already is."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _class_cosine_margin(feats: Tensor, references: ClassSums, labels: Tensor, *, temperature: float,
                         self_features: Tensor | None) -> Tensor:
    """The class-wise cosine margin from summed unit references (full-precision, checked inputs)."""
    totals = unit_dots(feats, references.sums)
    self_sim = None
    if self_features is not None:
        self_sim = rowwise_similarity(feats, self_features.flatten(1).unsqueeze(1), "cosine")[:, 0]
    return _class_margin(totals, references.count, labels, self_sim, temperature)


def _class_margin(totals: Tensor, k: int, labels: Tensor, self_sim: Tensor | None, temperature: float) -> Tensor:
    """Class-wise margin from per-class similarity totals [B, C]; the self reference counts in R_y (|R_y| = k + 1)."""
    counts = torch.full_like(totals, float(k))
    if self_sim is not None:
        onehot = F.one_hot(labels, totals.shape[1]).to(totals.dtype)
        totals = totals + onehot * self_sim.unsqueeze(1)
        counts = counts + onehot
    return logit_margin(totals / (counts * temperature), labels)


def _margin(feats: Tensor, references: Tensor, labels: Tensor, *, metric: str, temperature: float, kind: str,
            self_features: Tensor | None, references_normalized: bool, max_chunk_bytes: int | None) -> Tensor:
    """:func:`ask_margin` on checked, full-precision inputs (``feats`` already flattened to [B, D])."""
    batch, dim = feats.shape
    shared = references.dim() == 3
    num_classes, k = references.shape[-3], references.shape[-2]
    if shared:
        # One [B, D] x [D, C*k] product: per-example similarity would copy the set B times
        # (420 MB for a CIFAR-10 batch at smallcnn's block3).
        sims = pairwise_similarity(feats, references.reshape(num_classes * k, dim), metric)
    else:
        sims = rowwise_similarity(feats, references.reshape(batch, num_classes * k, dim), metric,
                                  b_normalized=references_normalized, max_chunk_bytes=max_chunk_bytes)
    self_sim = None
    if self_features is not None:
        self_sim = rowwise_similarity(feats, self_features.flatten(1).unsqueeze(1), metric)[:, 0]

    if kind == "instance":
        logits = sims / temperature
        ref_class = torch.arange(num_classes, device=feats.device).repeat_interleave(k)
        own = ref_class.unsqueeze(0) == labels.unsqueeze(1)  # [B, C*k]
        own_logits = logits.masked_fill(~own, -math.inf)
        other_logits = logits.masked_fill(own, -math.inf)
        if self_sim is not None:
            own_logits = torch.cat([own_logits, (self_sim / temperature).unsqueeze(1)], dim=1)
        return torch.logsumexp(other_logits, dim=1) - torch.logsumexp(own_logits, dim=1)

    return _class_margin(sims.view(batch, num_classes, k).sum(dim=2), k, labels, self_sim, temperature)


def loss_from_margin(margin: Tensor, kind: str, log_eps: float = 1e-12) -> Tensor:
    """The ASK loss from its margin: -log(sigmoid(-m) + eps) (instance) or softplus(m) (class)."""
    if kind == "class" or log_eps <= 0:
        return F.softplus(margin)
    log_p_own = F.logsigmoid(-margin)
    return -torch.logaddexp(log_p_own, torch.full_like(log_p_own, math.log(log_eps)))


def log_slope(margin: Tensor, kind: str, log_eps: float = 1e-12) -> Tensor:
    """log of d loss / d margin (> 0), computed without forming the possibly underflowing slope."""
    slope = F.logsigmoid(margin)
    if kind == "class" or log_eps <= 0:
        return slope
    log_p_own = F.logsigmoid(-margin)
    return slope + log_p_own - torch.logaddexp(log_p_own, torch.full_like(log_p_own, math.log(log_eps)))


def ask_loss(
    features: Tensor,
    references: Tensor | ClassSums,
    labels: Tensor,
    *,
    metric: str,
    temperature: float,
    kind: str = "instance",
    self_features: Tensor | None = None,
    log_eps: float = 1e-12,
) -> Tensor:
    """Per-example ASK loss of one layer (arguments as for :func:`ask_margin`).

    ``log_eps`` is the small constant inside the instance-wise log (0 for the exact log).
    Returns [B] losses, differentiable with respect to ``features``.
    """
    margin = ask_margin(features, references, labels, metric=metric, temperature=temperature,
                        kind=kind, self_features=self_features)
    return loss_from_margin(margin, kind, log_eps)


def multi_layer_ask_objective(
    features: Mapping[str, Tensor],
    references: Mapping[str, Tensor | ClassSums],
    labels: Tensor,
    *,
    kappa: Mapping[str, float] | None = None,
    metric: str,
    temperature: float,
    kind: str = "instance",
    self_features: Mapping[str, Tensor] | None = None,
    log_eps: float = 1e-12,
    references_normalized: bool = False,
    max_chunk_bytes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``(loss, direction)``: sum_l kappa_l * ask_loss_l, and an ascent surrogate for attacks.

    The gradient of ``direction`` is the loss gradient divided by a positive per-example factor:
    sum_l kappa_l * w_l * grad m_l with w_l = slope_l / max_l' slope_l (slopes d loss_l / d m_l,
    formed in log space). Sign and normalised steps are unchanged by that factor, while the raw
    loss gradient of a confidently classified point (slope ~1e-44 at T = 0.01) underflows float32.
    Other arguments as for :func:`ask_margin`, per layer.
    """
    if not references:
        raise ValueError("references is empty; give the reference features of at least one layer")
    losses, margins, slopes = [], [], []
    for layer, refs in references.items():
        if layer not in features:
            raise KeyError(f"features for layer '{layer}' are missing (have: {', '.join(features)})")
        weight = 1.0 if kappa is None else float(kappa[layer])
        margin = ask_margin(
            features[layer], refs, labels, metric=metric, temperature=temperature, kind=kind,
            self_features=None if self_features is None else self_features[layer],
            references_normalized=references_normalized, max_chunk_bytes=max_chunk_bytes,
        )
        losses.append(weight * loss_from_margin(margin, kind, log_eps))
        margins.append(weight * margin)
        slopes.append(log_slope(margin.detach(), kind, log_eps))
    log_w = torch.stack(slopes)
    weights = torch.exp(log_w - log_w.max(dim=0, keepdim=True).values)
    direction = (weights * torch.stack(margins)).sum(dim=0)
    return torch.stack(losses).sum(dim=0), direction


def multi_layer_ask_loss(
    features: Mapping[str, Tensor],
    references: Mapping[str, Tensor],
    labels: Tensor,
    **options: Any,
) -> Tensor:
    """sum_l kappa_l * ask_loss_l over the layers of ``references``.

    ``features`` may hold unflattened activations (they are flattened per example); ``kappa``
    defaults to 1 for every layer; ``self_features`` (per layer) switches on include-self.
    Options as for :func:`multi_layer_ask_objective`.
    """
    return multi_layer_ask_objective(features, references, labels, **options)[0]
