"""Differentiable similarities between deep features.

Two metrics (SPEC, notation): ``"cosine"`` and ``"l2"``, the latter being *minus* the Euclidean
distance so that larger always means closer. Both are NaN-free by construction: hidden features
after ReLU and pooling can be exactly zero, and an unguarded norm or square root there turns the
ASK loss into NaN and silently disables the attack (SPEC, pitfalls).
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from ask.constants import METRICS
from ask.errors import ConfigError
from ask.utils.layout import is_channels_last

# Guard on vector norms and distances. The guard acts on the *squared* quantity (clamped at
# _EPS**2 before the square root), so the derivative of the clamp is exactly zero below the guard
# and the square root is never evaluated at 0: values and gradients stay finite.
_EPS = 1e-8


def check_metric(metric: str) -> None:
    """Raise :class:`ConfigError` unless ``metric`` is one this module computes."""
    if metric not in METRICS:
        raise ConfigError(
            f"metric {metric!r} is not one of {', '.join(METRICS)}; set knn.metric to cosine or l2"
        )


def _work_dtype(*tensors: Tensor) -> torch.dtype:
    # Half-precision features (autocast) are promoted: the squared-norm guard underflows in fp16.
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def safe_norm(x: Tensor, dim: int = -1, keepdim: bool = False) -> Tensor:
    """Euclidean norm along ``dim`` clamped below at a tiny constant, with finite gradients at 0."""
    return x.pow(2).sum(dim=dim, keepdim=keepdim).clamp_min(_EPS**2).sqrt()


def l2_normalize(x: Tensor, dim: int = -1) -> Tensor:
    """``x / max(|x|, tiny)``: all-zero rows stay zero (similarity 0 to everything) instead of NaN."""
    return x / safe_norm(x, dim=dim, keepdim=True)


def flatten_features(features: Tensor) -> Tensor:
    """``features.flatten(1)`` (C, H, W order), whose gradient comes back in the features' layout.

    A channels-last activation flattens through a copy, and plain autograd returns its gradient
    in the default layout, so the backbone's backward pass below the tapped layer starts with
    mixed layouts. Handing the gradient back channels-last instead made an ASK-Atk step on a
    channels-last smallcnn (CIFAR-10 batch, block3, CPU, one thread) about 2 % cheaper.
    """
    if is_channels_last(features):
        return _FlattenChannelsLast.apply(features)
    return features.flatten(1)


class _FlattenChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, features: Tensor) -> Tensor:
        ctx.shape = features.shape
        return features.flatten(1)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.reshape(ctx.shape).contiguous(memory_format=torch.channels_last)


def unit_dots(a: Tensor, b: Tensor) -> Tensor:
    """``<a_i / max(|a_i|, tiny), b_ic>`` for every row of ``a`` [B, D] and every row c of ``b``.

    ``b`` is [C, D] (one set for the batch, result [B, C]) or [B, C, D] (rows per example, result
    [B, C]); only ``a`` is normalised. Equal in value and gradient to
    ``(a @ b.T) / safe_norm(a)`` (the same guard at |a| = 0), with a hand-written backward:
    autograd's path through the norm forms five [B, D] temporaries per call, which on the CPU
    added about 5 ms to the 7 ms of the [B, C, D] product itself for a CIFAR-10 batch at 8,192-d
    (one thread). Differentiable once (a second backward raises).
    """
    if a.dim() != 2 or b.dim() not in (2, 3) or b.shape[-1] != a.shape[1] or (b.dim() == 3 and len(b) != len(a)):
        raise ValueError(f"unit_dots needs a [B, D] and b [C, D] or [B, C, D]; got {tuple(a.shape)} and {tuple(b.shape)}")
    return _UnitDots.apply(a, b)


class _UnitDots(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor) -> Tensor:
        norm = torch.linalg.vector_norm(a, dim=1, keepdim=True)
        live = norm >= _EPS  # where the guard is off, |a| moves with a
        norm = norm.clamp_min(_EPS)
        # einsum, not bmm(b, a[..., None]): torch's CPU batched matrix-vector product took 25 ms
        # for a CIFAR-10 batch at 8,192-d, the einsum's layout 1.5 ms.
        dots = a @ b.T if b.dim() == 2 else torch.einsum("bd,bcd->bc", a, b)
        ctx.save_for_backward(a, b, norm, live, dots)
        return dots / norm

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        a, b, norm, live, dots = ctx.saved_tensors
        scaled = grad / norm
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = scaled @ b if b.dim() == 2 else torch.einsum("bc,bcd->bd", scaled, b)
            # d|a|/da = a / |a|: the totals move by -dots / |a|^2 along it.
            along = (scaled * dots).sum(dim=1, keepdim=True) / norm.square() * live
            grad_a.addcmul_(a, along, value=-1)
        if ctx.needs_input_grad[1]:
            grad_b = scaled.T @ a if b.dim() == 2 else scaled.unsqueeze(2) * a.unsqueeze(1)
        return grad_a, grad_b


def _safe_sqrt(squared: Tensor) -> Tensor:
    return squared.clamp_min(_EPS**2).sqrt()


def pairwise_similarity(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """Similarity of every row of ``a`` [B, D] to every row of ``b`` [N, D]; returns [B, N].

    ``"cosine"``: a·b / (max(|a|, tiny) max(|b|, tiny)). ``"l2"``: minus the Euclidean distance,
    computed as sqrt(|a|² + |b|² - 2 a·b) (memory B×N, not B×N×D); the squared distance is clamped
    at a tiny positive value, which also absorbs the rounding that can make it slightly negative.
    For an exact distance between near-identical points use :func:`rowwise_similarity`.
    """
    check_metric(metric)
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"pairwise_similarity needs [B, D] and [N, D] with the same D; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    dtype = _work_dtype(a, b)
    a, b = a.to(dtype), b.to(dtype)
    if metric == "cosine":
        return l2_normalize(a) @ l2_normalize(b).T
    squared = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * (a @ b.T)
    return -_safe_sqrt(squared)


def rowwise_similarity(a: Tensor, b: Tensor, metric: str, *, b_normalized: bool = False,
                       max_chunk_bytes: int | None = None) -> Tensor:
    """Similarity of each row ``a[i]`` [D] to its own references ``b[i]`` [M, D]; returns [B, M].

    This is the one the ASK loss differentiates. For ``"l2"`` the distance comes from the explicit
    differences (exact even when a perturbed point sits next to its clean reference, where the
    |a|² + |b|² - 2 a·b expansion loses all its digits); memory is B×M×D.

    ``b_normalized`` (cosine only) says ``b`` is already ``l2_normalize``-d: an attack whose
    references stay fixed normalises them once instead of at every step, which would otherwise
    cost several passes over B×M×D per step, more than the similarity itself.

    ``max_chunk_bytes`` bounds that B×M×D temporary (the differences for ``"l2"``, the normalised
    copy of ``b`` for cosine): larger products run over slices of the M axis, each recomputed in
    the backward pass rather than kept for it, so the temporaries of one slice are all that is
    alive at once. Cosine against normalised ``b`` forms no such temporary and is never split.
    """
    check_metric(metric)
    if a.dim() != 2 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]:
        raise ValueError(
            f"rowwise_similarity needs [B, D] and [B, M, D]; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    batch, refs, dim = b.shape
    per_ref = batch * dim * _work_dtype(a, b).itemsize
    if max_chunk_bytes is None or (metric == "cosine" and b_normalized) or refs * per_ref <= max_chunk_bytes:
        return _rowwise(a, b, metric, b_normalized)
    width = max(1, max_chunk_bytes // per_ref)
    piece = partial(_rowwise, metric=metric, b_normalized=b_normalized)
    return torch.cat([checkpoint(piece, a, b[:, start:start + width], use_reentrant=False)
                      for start in range(0, refs, width)], dim=1)


def _rowwise(a: Tensor, b: Tensor, metric: str, b_normalized: bool) -> Tensor:
    """:func:`rowwise_similarity` on checked shapes, in one piece."""
    dtype = _work_dtype(a, b)
    a, b = a.to(dtype), b.to(dtype)
    if metric == "cosine":
        return torch.einsum("bd,bmd->bm", l2_normalize(a), b if b_normalized else l2_normalize(b))
    squared = (a.unsqueeze(1) - b).pow(2).sum(-1)
    return -_safe_sqrt(squared)
