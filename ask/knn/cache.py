"""Where a reference store's features come from: the key that names them, their extraction from a
model batch by batch, and the cache directory they are written to and read back from (its file
format is :mod:`ask.knn.features`).

Features are computed once per (model, pool, layers, dtype) and cached on disk; every later lookup
is a faiss search, never a recomputation of the pool's features (the paper code's main cost).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ask.errors import ConfigError, require_named_layers
from ask.knn.features import CACHE_FORMAT, FeatureWriter, read_cache
from ask.utils.runtime import to_device

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_FORMAT",
    "PoolArrays",
    "check_extraction",
    "int64_numpy",
    "model_chunks",
    "model_device",
    "plain_key",
    "read_features",
    "store_cache_key",
    "tensor_digest",
    "to_float_images",
    "write_features",
]

EMPTY_POOL = "the reference pool is empty; raise knn.pool_per_class or check the training split"
NO_KEY = "cache_path needs a cache_key (see store_cache_key) so a stale cache is never reused"


def tensor_digest(t: Tensor) -> str:
    """Short sha1 of a tensor's dtype, shape and bytes, for cache keys."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha1(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel() > 0:
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def store_cache_key(
    checkpoint_digest: str,
    layers: Sequence[str],
    metric: str,
    pool_indices: Tensor,
    image_shape: Sequence[int],
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Plain-data key that identifies a store's contents (compared with ``==`` on reload).

    ``extra`` takes anything else that changes the features (dataset name, split, resize) and
    must be plain data (str, numbers, lists, dicts). The feature dtype is checked separately.
    """
    key = {
        "format": CACHE_FORMAT,
        "checkpoint": str(checkpoint_digest),
        "layers": [str(layer) for layer in layers],
        "metric": str(metric),
        "pool": tensor_digest(torch.as_tensor(pool_indices, dtype=torch.int64)),
        "n_pool": int(len(pool_indices)),
        "image_shape": [int(s) for s in image_shape],
    }
    if extra:
        key["extra"] = dict(extra)
    return key


def plain_key(key: Any) -> Any:
    """The key as it reads back from JSON (tuples become lists), so == compares like with like."""
    return None if key is None else json.loads(json.dumps(key, sort_keys=True))


def int64_numpy(x: Any) -> np.ndarray:
    return torch.as_tensor(x).detach().to("cpu", torch.int64).reshape(-1).numpy()


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model without either."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def to_float_images(batch: Tensor) -> Tensor:
    """uint8 images scaled to [0, 1], float images as float32."""
    if batch.dtype == torch.uint8:
        return batch.float().div_(255.0)
    if batch.is_floating_point():
        return batch.float()
    raise ValueError(f"images must be uint8 or float in [0, 1]; got {batch.dtype}")


class PoolArrays(NamedTuple):
    """What a store is made of: labels [N], pool indices [N] and each layer's [N, D] features."""

    labels: np.ndarray
    pool_indices: np.ndarray
    features: dict[str, np.ndarray]


def write_features(
    chunks: Iterable[tuple[Mapping[str, Any], Any]],
    n: int,
    layers: tuple[str, ...],
    metric: str,
    feature_dtype: str,
    pool_indices: Tensor | None,
    cache_path: str | Path | None,
    cache_key: dict | None,
) -> PoolArrays:
    """The ``n`` rows of ``(features by layer, labels)`` chunks written to ``cache_path`` (replacing
    any old cache there once complete, then memory-mapped back) or, without it, into RAM."""
    if n < 1:
        raise ConfigError(EMPTY_POOL)
    if cache_path is not None and cache_key is None:
        raise ValueError(NO_KEY)
    pool = np.arange(n, dtype=np.int64) if pool_indices is None else int64_numpy(pool_indices)
    writer = FeatureWriter(n, layers, feature_dtype, cache_path)
    try:
        for features, labels in chunks:
            writer.write(features, labels)
        meta = {"key": plain_key(cache_key), "metric": metric}
        arrays = writer.finish(pool, meta)
    except BaseException:
        writer.abort()
        raise
    return PoolArrays(writer.labels, pool, arrays)


def read_features(
    path: Path,
    cache_key: dict,
    layers: tuple[str, ...],
    metric: str,
    feature_dtype: str,
    labels: Tensor | None,
    pool_indices: Tensor | None,
) -> PoolArrays | None:
    """The arrays cached at ``path``, or None (with a warning if a cache was there but is stale,
    partial or unreadable; such a cache is never used)."""
    if not path.exists() and not path.is_symlink():
        return None
    n = None if labels is None else int(torch.as_tensor(labels).numel())
    expect = {
        "key": plain_key(cache_key), "layers": list(layers), "metric": metric,
        "feature_dtype": feature_dtype, "n": n,
    }
    if n is None:  # no labels to compare: accept the cached size
        try:
            expect["n"] = json.loads((path / "meta.json").read_text()).get("n")
        except (OSError, ValueError, AttributeError):
            pass
    found = read_cache(path, expect)
    if isinstance(found, str):
        log.warning("ignoring reference-feature cache %s: %s; recomputing the features", path, found)
        return None
    _, cached_labels, cached_pool, arrays = found
    if labels is not None and not np.array_equal(cached_labels, int64_numpy(labels)):
        reason = "its pool labels differ"
    elif pool_indices is not None and not np.array_equal(cached_pool, int64_numpy(pool_indices)):
        reason = "its pool indices differ"
    else:
        reason = None
    if reason is not None:
        log.warning("ignoring reference-feature cache %s: %s; recomputing the features", path, reason)
        return None
    return PoolArrays(cached_labels, cached_pool, dict(zip(layers, arrays, strict=True)))


def check_extraction(model: nn.Module, images: Tensor, labels: Tensor, layers: tuple[str, ...],
                     batch_size: int, cache_path: str | Path | None, cache_key: dict | None) -> Tensor:
    """The labels as int64 [N] after the checks a feature extraction needs (one clear error each)."""
    if not layers:
        raise ConfigError("knn.layers is empty; name at least one layer, e.g. [block3]")
    require_named_layers("the reference store", model)
    if hasattr(model, "check_layers"):
        model.check_layers(layers)
    if batch_size < 1:
        raise ConfigError(f"knn.batch_size={batch_size} must be >= 1")
    labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).reshape(-1)
    n = labels.numel()
    if images.shape[0] != n:
        raise ValueError(f"{images.shape[0]} images but {n} labels")
    if n == 0:
        raise ConfigError(EMPTY_POOL)
    if cache_path is not None and cache_key is None:
        raise ValueError(NO_KEY)
    return labels


def model_chunks(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    layers: tuple[str, ...],
    batch_size: int,
    device: torch.device,
    progress: bool,
) -> Iterator[tuple[dict[str, Tensor], Tensor]]:
    """Flattened CPU features of ``images`` at ``layers`` with their labels, one batch at a time.

    The caller puts the model in eval mode; gradients are off only around each forward pass,
    never across a ``yield`` (a generator's context would otherwise leak into its consumer).
    """
    n = images.shape[0]
    with tqdm(total=n, disable=not progress, desc="reference features", unit="img", leave=False) as bar:
        for lo in range(0, n, batch_size):
            with torch.no_grad():
                x = to_float_images(to_device(images[lo : lo + batch_size], device))
                out = model.forward_features(x, list(layers))
                feats = {layer: out[layer].reshape(x.shape[0], -1).float().cpu() for layer in layers}
            bar.update(x.shape[0])
            yield feats, labels[lo : lo + x.shape[0]]
