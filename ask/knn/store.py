"""The reference pool: labelled points with their features precomputed at each layer, and exact
nearest-neighbour search over them with faiss.

Features are computed once per (model, pool, layers) and cached on disk; every later lookup is a
faiss search, never a recomputation of the pool's features (the paper code's main cost).

Search is exact (``IndexFlatIP`` on L2-normalised vectors for cosine, ``IndexFlatL2`` for l2):
approximate neighbours would change the robustness numbers. The similarities returned are
recomputed in torch for the k rows found (same guarded formulas as :mod:`ask.knn.similarity`),
because faiss's L2 path expands |a|² + |b|² - 2 a·b and loses precision for near-identical points;
the k results are then re-sorted by these exact values.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ask.errors import ConfigError, ModelError
from ask.knn.similarity import check_metric, l2_normalize, rowwise_similarity
from ask.utils.io import LoadError, atomic_save, safe_load

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# GPU faiss's k-selection handles at most this many neighbours; larger k falls back to the CPU.
_GPU_MAX_K = 2048

_threads_configured = False


def _configure_faiss_threads() -> None:
    """Cap faiss's OpenMP threads at torch's intra-op count.

    faiss and torch each bundle an OpenMP runtime; letting both default to every core makes them
    fight on small machines. Done once, lazily, so importing the module changes no global state.
    """
    global _threads_configured
    if not _threads_configured:
        faiss.omp_set_num_threads(max(1, min(faiss.omp_get_max_threads(), torch.get_num_threads())))
        _threads_configured = True


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
    must be plain data (str, numbers, lists, dicts).
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


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _to_float_images(batch: Tensor) -> Tensor:
    if batch.dtype == torch.uint8:
        return batch.float().div_(255.0)
    if batch.is_floating_point():
        return batch.float()
    raise ValueError(f"images must be uint8 or float in [0, 1]; got {batch.dtype}")


class ReferenceStore:
    """Labelled pool points with flattened float32 features per layer (all on the CPU).

    Attributes: ``layers``, ``metric``, ``num_classes``, ``labels`` (int64 [N]), ``features``
    (layer -> float32 [N, D]), ``pool_indices`` (int64 [N], rows of the split the pool came from)
    and ``from_cache`` (whether :meth:`build` loaded the features from its cache file).
    """

    def __init__(
        self,
        layers: Sequence[str],
        metric: str,
        num_classes: int,
        labels: Tensor,
        features: Mapping[str, Tensor],
        pool_indices: Tensor | None = None,
        *,
        use_gpu_index: bool = True,
    ) -> None:
        check_metric(metric)
        self.layers: tuple[str, ...] = tuple(layers)
        self.metric = metric
        self.num_classes = int(num_classes)
        self.labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).reshape(-1)
        n = self.labels.numel()
        if pool_indices is None:
            pool_indices = torch.arange(n)
        self.pool_indices = torch.as_tensor(pool_indices).detach().to("cpu", torch.int64).reshape(-1)
        if self.pool_indices.numel() != n:
            raise ValueError(f"pool_indices has {self.pool_indices.numel()} entries for {n} labels")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= self.num_classes):
            raise ValueError(
                f"pool labels must lie in [0, {self.num_classes}); got {int(self.labels.min())}..{int(self.labels.max())}"
            )
        missing = [layer for layer in self.layers if layer not in features]
        if missing:
            raise ValueError(f"features missing for layers {missing}")
        self.features: dict[str, Tensor] = {}
        for layer in self.layers:
            f = features[layer].detach().to("cpu", torch.float32)
            f = f.reshape(f.shape[0], -1).contiguous()
            if f.shape[0] != n:
                raise ValueError(f"layer {layer!r} has {f.shape[0]} feature rows for {n} labels")
            self.features[layer] = f
        self.use_gpu_index = use_gpu_index
        self.from_cache = False
        self._class_rows = [torch.nonzero(self.labels == c).flatten() for c in range(self.num_classes)]
        self._indexes: dict[tuple, Any] = {}
        self._gpu_resources: Any = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        layers: Sequence[str],
        metric: str,
        num_classes: int,
        *,
        pool_indices: Tensor | None = None,
        batch_size: int = 256,
        device: torch.device | str | None = None,
        cache_path: str | Path | None = None,
        cache_key: dict | None = None,
        progress: bool = True,
        use_gpu_index: bool = True,
    ) -> ReferenceStore:
        """Compute (or load from ``cache_path``) the pool's features at ``layers``.

        ``model`` must offer ``forward_features(x, layers)``; it runs in eval mode under
        ``torch.no_grad`` and its training flag is restored afterwards. ``images`` are uint8
        (N×C×H×W) or float in [0, 1]; batches go to ``device`` (default: the model's device).
        The cache is used only if its stored key equals ``cache_key`` and its layers, metric,
        labels and pool indices match; otherwise (or if the file is unreadable) a warning is
        logged and the features are recomputed and the file rewritten.
        """
        check_metric(metric)
        layers = tuple(layers)
        if not layers:
            raise ConfigError("knn.layers is empty; name at least one layer, e.g. [block3]")
        if hasattr(model, "check_layers"):
            model.check_layers(layers)
        labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).reshape(-1)
        n = labels.numel()
        if images.shape[0] != n:
            raise ValueError(f"{images.shape[0]} images but {n} labels")
        if pool_indices is None:
            pool_indices = torch.arange(n)
        pool_indices = torch.as_tensor(pool_indices).detach().to("cpu", torch.int64).reshape(-1)
        if cache_path is not None and cache_key is None:
            raise ValueError(
                "cache_path needs a cache_key (see store_cache_key) so a stale cache is never reused"
            )

        if cache_path is not None:
            cache_path = Path(cache_path).expanduser()
            cached = cls._load_cache(cache_path, cache_key, layers, metric, labels, pool_indices)
            if cached is not None:
                store = cls(
                    layers, metric, num_classes, labels, cached, pool_indices, use_gpu_index=use_gpu_index
                )
                store.from_cache = True
                log.info("loaded reference features for %d points from %s", n, cache_path)
                return store

        features = _extract_features(model, images, layers, batch_size, device, progress)
        store = cls(layers, metric, num_classes, labels, features, pool_indices, use_gpu_index=use_gpu_index)
        if cache_path is not None:
            payload = {
                "key": cache_key,
                "layers": list(layers),
                "metric": metric,
                "labels": store.labels,
                "pool_indices": store.pool_indices,
                "features": store.features,
            }
            try:
                atomic_save(payload, cache_path)
            except OSError as exc:  # a cache is an optimisation: a full disk must not end the run
                log.warning(
                    "could not write the reference-feature cache %s (%s); continuing without it",
                    cache_path,
                    exc,
                )
        return store

    @staticmethod
    def _load_cache(
        path: Path,
        key: dict | None,
        layers: tuple[str, ...],
        metric: str,
        labels: Tensor,
        pool_indices: Tensor,
    ) -> dict[str, Tensor] | None:
        if not path.exists():
            return None
        try:
            data = safe_load(path)
        except LoadError as exc:
            log.warning("reference-feature cache %s is unreadable (%s); recomputing the features", path, exc)
            return None
        try:
            reason = _cache_mismatch(data, key, layers, metric, labels, pool_indices)
        except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
            reason = f"its contents are malformed ({exc})"
        if reason is not None:
            log.warning("ignoring reference-feature cache %s: %s; recomputing the features", path, reason)
            return None
        return {layer: data["features"][layer] for layer in layers}

    # ------------------------------------------------------------------ properties

    def __len__(self) -> int:
        return self.labels.numel()

    def class_counts(self) -> Tensor:
        """Number of pool points of each class, int64 [num_classes]."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def dim(self, layer: str) -> int:
        """Flattened feature size at ``layer``."""
        self._check_layer(layer)
        return self.features[layer].shape[1]

    # ------------------------------------------------------------------ search

    def search(self, layer: str, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` pool points most similar to each query (exact).

        ``queries``: [B, D] (or [B, ...], flattened) features at ``layer``. Returns
        ``(similarities [B, k], pool rows [B, k] int64)``, most similar first, on the queries'
        device. Not differentiable: recompute similarities from the rows where a gradient is needed.
        """
        self._check_layer(layer)
        n = len(self)
        if k < 1:
            raise ConfigError(f"knn.k={k} must be >= 1")
        if k > n:
            raise ConfigError(
                f"knn.k={k} but the reference pool has only {n} points; lower knn.k or raise knn.pool_per_class"
            )
        q = self._prepare_queries(layer, queries)
        index = self._index(layer, None, queries.device, k)
        rows = self._raw_search(index, q, k)
        sims, rows = self._exact_sorted(layer, q, torch.from_numpy(rows))
        return sims.to(queries.device), rows.to(queries.device)

    def search_per_class(self, layer: str, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """For every class c, the ``k`` pool points of class c most similar to each query (exact).

        Returns ``(similarities [B, C, k], global pool rows [B, C, k] int64)``, most similar first
        within each class, on the queries' device. One faiss index per class, built on first use.
        """
        self._check_layer(layer)
        if k < 1:
            raise ConfigError(f"knn.k={k} must be >= 1")
        counts = self.class_counts()
        smallest = int(torch.argmin(counts))
        if k > int(counts[smallest]):
            raise ConfigError(
                f"knn.k={k} but class {smallest} has only {int(counts[smallest])} reference points; "
                "lower knn.k or raise knn.pool_per_class"
            )
        q = self._prepare_queries(layer, queries)
        b = q.shape[0]
        sims = torch.empty(b, self.num_classes, k, dtype=torch.float32)
        rows = torch.empty(b, self.num_classes, k, dtype=torch.int64)
        for c in range(self.num_classes):
            index = self._index(layer, c, queries.device, k)
            local = torch.from_numpy(self._raw_search(index, q, k))
            sims[:, c], rows[:, c] = self._exact_sorted(layer, q, self._class_rows[c][local])
        return sims.to(queries.device), rows.to(queries.device)

    # ------------------------------------------------------------------ internals

    def _check_layer(self, layer: str) -> None:
        if layer not in self.features:
            raise ConfigError(
                f"layer {layer!r} is not in the reference store (it has {', '.join(self.layers)}); add it to knn.layers"
            )

    def _prepare_queries(self, layer: str, queries: Tensor) -> Tensor:
        q = queries.detach().reshape(queries.shape[0], -1).to("cpu", torch.float32).contiguous()
        d = self.features[layer].shape[1]
        if q.shape[1] != d:
            raise ModelError(
                f"queries at layer {layer!r} have {q.shape[1]} features but the reference pool has {d}; "
                "build the store with the same model and layer"
            )
        if not torch.isfinite(q).all():
            raise ValueError(f"queries at layer {layer!r} contain NaN or Inf")
        return q

    def _base_vectors(self, layer: str, rows: Tensor | None) -> np.ndarray:
        f = self.features[layer] if rows is None else self.features[layer][rows]
        if self.metric == "cosine":
            f = l2_normalize(f)  # same guard as the similarity: zero rows stay zero
        return np.ascontiguousarray(f.numpy(), dtype=np.float32)

    def _index(self, layer: str, cls: int | None, query_device: torch.device, k: int) -> Any:
        """The flat index over ``layer`` (all points, or class ``cls`` only), cached per device."""
        _configure_faiss_threads()
        gpu = self._gpu_device(query_device) if k <= _GPU_MAX_K else None
        cache_key = (layer, cls, gpu)
        index = self._indexes.get(cache_key)
        if index is None:
            base = self._base_vectors(layer, None if cls is None else self._class_rows[cls])
            d = base.shape[1]
            index = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
            index.add(base)
            if gpu is not None:
                if self._gpu_resources is None:
                    self._gpu_resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu, index)
            self._indexes[cache_key] = index
        return index

    def _gpu_device(self, query_device: torch.device) -> int | None:
        if not self.use_gpu_index or query_device.type != "cuda":
            return None
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            return None
        return query_device.index if query_device.index is not None else torch.cuda.current_device()

    def _raw_search(self, index: Any, q: Tensor, k: int) -> np.ndarray:
        qn = l2_normalize(q) if self.metric == "cosine" else q
        x = np.ascontiguousarray(qn.numpy(), dtype=np.float32)
        _, rows = index.search(x, k)
        if (rows < 0).any():  # faiss pads with -1 when it finds fewer than k points
            raise RuntimeError("faiss returned fewer neighbours than requested")
        return rows.astype(np.int64, copy=False)

    def _exact_sorted(self, layer: str, q: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        sims = rowwise_similarity(q, self.features[layer][rows], self.metric).float()
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices
        return sims.gather(1, order), rows.gather(1, order)


def _cache_mismatch(
    data: Any, key: dict | None, layers: tuple[str, ...], metric: str, labels: Tensor, pool_indices: Tensor
) -> str | None:
    """Why a loaded cache cannot be used, or None if it can."""
    if not isinstance(data, dict) or not isinstance(data.get("features"), dict):
        return "it is not a feature cache"
    if data.get("key") != key:
        return "it was built for another model, pool or setting"
    if tuple(data.get("layers", ())) != layers or data.get("metric") != metric:
        return "its layers or metric differ"
    if not torch.equal(data["labels"], labels) or not torch.equal(data["pool_indices"], pool_indices):
        return "its pool labels or indices differ"
    for layer in layers:
        f = data["features"].get(layer)
        if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] != labels.numel():
            return f"its features for layer {layer!r} are missing or mis-shaped"
    return None


@torch.no_grad()
def _extract_features(
    model: nn.Module,
    images: Tensor,
    layers: tuple[str, ...],
    batch_size: int,
    device: torch.device | str | None,
    progress: bool,
) -> dict[str, Tensor]:
    """Flattened float32 CPU features of ``images`` at ``layers``, in eval mode, batch by batch."""
    if batch_size < 1:
        raise ConfigError(f"knn.batch_size={batch_size} must be >= 1")
    device = torch.device(device) if device is not None else _model_device(model)
    n = images.shape[0]
    if n == 0:
        raise ConfigError("the reference pool is empty; raise knn.pool_per_class or check the training split")
    chunks: dict[str, list[Tensor]] = {layer: [] for layer in layers}
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        with tqdm(total=n, disable=not progress, desc="reference features", unit="img", leave=False) as bar:
            for lo in range(0, n, batch_size):
                x = _to_float_images(images[lo : lo + batch_size].to(device, non_blocking=True))
                out = model.forward_features(x, list(layers))
                for layer in layers:
                    f = out[layer]
                    chunks[layer].append(f.reshape(f.shape[0], -1).float().cpu())
                bar.update(x.shape[0])
    finally:
        model.train(was_training)
    log.info(
        "computed reference features for %d points at %s in %.1f s",
        n,
        ", ".join(layers),
        time.perf_counter() - start,
    )
    return {layer: torch.cat(chunks[layer]) for layer in layers}
