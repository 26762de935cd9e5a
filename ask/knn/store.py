"""The reference pool: labelled points with their features precomputed at each layer, and
nearest-neighbour search over them with faiss.

Jobs are split by module: the cache key, the extraction from a model and the cache directory live
in :mod:`ask.knn.cache` (file format: :mod:`ask.knn.features`); the faiss indexes, exact
re-ranking and recall in :mod:`ask.knn.search` (:class:`~ask.knn.search.PoolIndexes`, reached as
``store.indexes``); the index settings are one :class:`~ask.knn.indexes.IndexSettings`. This
module holds the store's arrays and its public search API.

Scale: features are written chunk by chunk into preallocated ``.npy`` files and read back as
memory maps, so a pool of millions of points never sits in RAM as a whole;
``feature_dtype="float16"`` halves disk and memory. ``store.features[layer]`` is a CPU tensor
over that map (float32 or float16): gather the rows you need, then ``.float()``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ask.errors import ConfigError, ModelError
from ask.knn.cache import (
    PoolArrays,
    check_extraction,
    model_chunks,
    model_device,
    plain_key,
    read_features,
    write_features,
)
from ask.knn.features import FeatureFile, as_feature_tensor, feature_file_info, gather_rows, scan_rows
from ask.knn.indexes import IndexSettings
from ask.knn.search import RECALL_QUERIES, RECALL_SEED, SHARED_DEPTH, PoolIndexes
from ask.knn.similarity import check_metric
from ask.utils.diskarrays import remove_tree

log = logging.getLogger(__name__)

__all__ = ["EXACT_SEARCH", "ReferenceStore"]

#: The default: exact flat search over float32 features, on the GPU where faiss can.
EXACT_SEARCH = IndexSettings()
# Rows per chunk when scanning the pool (index fill, exact scans): about 32 MiB of float32.
_CHUNK_BYTES = 32 << 20


class ReferenceStore:
    """Labelled pool points with flattened features per layer (all on the CPU).

    Attributes: ``layers``, ``metric``, ``num_classes``, ``labels`` (int64 [N]), ``features``
    (layer -> float32 or float16 [N, D], possibly a read-only-on-disk memory map: gather rows,
    then ``.float()``), ``pool_indices`` (int64 [N], rows of the split the pool came from),
    ``feature_dtype``, ``settings`` (the :class:`IndexSettings`, with the features' actual dtype),
    ``indexes`` (the faiss indexes, :class:`PoolIndexes`), ``from_cache`` (whether :meth:`build`
    loaded the features from its cache directory), and ``cache_path`` / ``cache_key``: the cache
    directory the features live in and its key, or None for a store held in memory (parts fitted
    on the pool are cached there, see :mod:`ask.knn.fitted`).
    """

    def __init__(
        self,
        layers: Sequence[str],
        metric: str,
        num_classes: int,
        labels: Tensor,
        features: Mapping[str, Tensor | np.ndarray],
        pool_indices: Tensor | None = None,
        *,
        settings: IndexSettings = EXACT_SEARCH,
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
        self._files: dict[str, FeatureFile] = {}
        for layer in self.layers:
            raw = features[layer]
            info = feature_file_info(raw) if isinstance(raw, np.ndarray) else None
            f = as_feature_tensor(raw)
            if f.shape[0] != n:
                raise ValueError(f"layer {layer!r} has {f.shape[0]} feature rows for {n} labels")
            self.features[layer] = f
            if info is not None and f.data_ptr() == raw.ctypes.data:
                self._files[layer] = info  # scans read the file, not the map (see scan)
        dtypes = {str(f.dtype).removeprefix("torch.") for f in self.features.values()}
        self.feature_dtype = "float16" if "float16" in dtypes else "float32"
        self.settings = replace(settings, feature_dtype=self.feature_dtype)
        self.from_cache = False
        self.cache_path: Path | None = None
        self.cache_key: dict | None = None
        # One stable sort instead of a comparison per class: ImageNet has 1,000 classes.
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        self._class_rows = list(torch.split(order, counts))
        self.indexes = PoolIndexes(self, self.settings)

    # ------------------------------------------------------------------ construction

    @classmethod
    def _from_arrays(cls, arrays: PoolArrays, layers: tuple[str, ...], metric: str, num_classes: int,
                     settings: IndexSettings, cache_path: Path | None, cache_key: dict | None) -> ReferenceStore:
        store = cls(layers, metric, num_classes, torch.from_numpy(arrays.labels), arrays.features,
                    torch.from_numpy(arrays.pool_indices), settings=settings)
        if cache_path is not None:
            store.cache_path, store.cache_key = cache_path, plain_key(cache_key)
        return store

    @classmethod
    def from_chunks(
        cls,
        chunks: Iterable[tuple[Mapping[str, Any], Any]],
        n: int,
        layers: Sequence[str],
        metric: str,
        num_classes: int,
        *,
        pool_indices: Tensor | None = None,
        cache_path: str | Path | None = None,
        cache_key: dict | None = None,
        settings: IndexSettings = EXACT_SEARCH,
    ) -> ReferenceStore:
        """A store from ``(features by layer [B, ...], labels [B])`` chunks of any source, in order.

        ``n`` is the total number of rows (the arrays are preallocated). With ``cache_path`` the
        features go straight to a new cache directory there (replacing any old one once complete)
        and are memory-mapped back; without it they fill preallocated arrays in RAM, in
        ``settings.feature_dtype``. Either way no chunk is kept after it is written, so peak
        memory is one chunk plus the output.
        """
        check_metric(metric)
        layers = tuple(layers)
        arrays = write_features(chunks, n, layers, metric, settings.feature_dtype, pool_indices, cache_path, cache_key)
        path = None if cache_path is None else Path(cache_path).expanduser()
        return cls._from_arrays(arrays, layers, metric, num_classes, settings, path, cache_key)

    @classmethod
    def load(
        cls,
        cache_path: str | Path,
        cache_key: dict,
        layers: Sequence[str],
        metric: str,
        num_classes: int,
        *,
        labels: Tensor | None = None,
        pool_indices: Tensor | None = None,
        settings: IndexSettings = EXACT_SEARCH,
    ) -> ReferenceStore | None:
        """The store cached at ``cache_path``, or None (with a warning if a cache was there but
        is stale, partial or unreadable; such a cache is never used).

        Usable only if its key, layers, metric, dtype (``settings.feature_dtype``) and size match,
        and (when given) its labels and pool indices equal ``labels`` / ``pool_indices``. Features
        stay on disk, memory-mapped.
        """
        path = Path(cache_path).expanduser()
        layers = tuple(layers)
        arrays = read_features(path, cache_key, layers, metric, settings.feature_dtype, labels, pool_indices)
        if arrays is None:
            return None
        store = cls._from_arrays(arrays, layers, metric, num_classes, settings, path, cache_key)
        store.from_cache = True
        return store

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
        settings: IndexSettings = EXACT_SEARCH,
    ) -> ReferenceStore:
        """Compute (or load from the ``cache_path`` directory) the pool's features at ``layers``.

        ``model`` must offer ``forward_features(x, layers)``; it runs in eval mode under
        ``torch.no_grad`` and its training flag is restored afterwards. ``images`` are uint8
        (N×C×H×W) or float in [0, 1]; batches go to ``device`` (default: the model's device).
        The cache is used only if its stored key equals ``cache_key`` and its layers, metric,
        dtype, labels and pool indices match; otherwise (or if it is unreadable) a warning is
        logged, the features are recomputed and the directory replaced. Features are written
        batch by batch (:meth:`from_chunks`), never gathered in RAM.
        """
        check_metric(metric)
        layers = tuple(layers)
        labels = check_extraction(model, images, labels, layers, batch_size, cache_path, cache_key)
        n = labels.numel()
        if pool_indices is None:
            pool_indices = torch.arange(n)
        pool_indices = torch.as_tensor(pool_indices).detach().to("cpu", torch.int64).reshape(-1)
        if cache_path is not None:
            cache_path = Path(cache_path).expanduser()
            store = cls.load(cache_path, cache_key, layers, metric, num_classes, labels=labels,
                             pool_indices=pool_indices, settings=settings)
            if store is not None:
                log.info("loaded reference features for %d points from %s", n, cache_path)
                return store
            if cache_path.exists() or cache_path.is_symlink():
                remove_tree(cache_path)  # stale: freeing its space before the rebuild matters at scale

        device = torch.device(device) if device is not None else model_device(model)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            def build_into(path: Path | None) -> ReferenceStore:
                chunks = model_chunks(model, images, labels, layers, batch_size, device, progress)
                return cls.from_chunks(chunks, n, layers, metric, num_classes, pool_indices=pool_indices,
                                       cache_path=path, cache_key=cache_key, settings=settings)
            try:
                store = build_into(cache_path)
            except OSError as exc:  # a cache is an optimisation: a full disk must not end the run
                if cache_path is None:
                    raise
                log.warning("could not write the reference-feature cache %s (%s); keeping the features in memory",
                            cache_path, exc)
                store = build_into(None)
        finally:
            model.train(was_training)
        log.info("computed reference features for %d points at %s in %.1f s (%s)",
                 n, ", ".join(layers), time.perf_counter() - start, settings.feature_dtype)
        return store

    # ------------------------------------------------------------------ the arrays

    def __len__(self) -> int:
        return self.labels.numel()

    def class_counts(self) -> Tensor:
        """Number of pool points of each class, int64 [num_classes]."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def class_rows(self, cls: int) -> Tensor:
        """The pool rows of class ``cls``, ascending, int64."""
        return self._class_rows[cls]

    def dim(self, layer: str) -> int:
        """Flattened feature size at ``layer``."""
        self.check_layer(layer)
        return self.features[layer].shape[1]

    def rows(self, layer: str, rows: Tensor) -> Tensor:
        """float32 features of pool ``rows`` (any shape) at ``layer``: [*rows.shape, D]."""
        rows = torch.as_tensor(rows).long().cpu()
        return self.features[layer][rows.reshape(-1)].float().view(*rows.shape, -1)

    @property
    def mapped_layers(self) -> tuple[str, ...]:
        """The layers whose features are memory-mapped from a cache file (scans read the file)."""
        return tuple(self._files)

    def check_layer(self, layer: str) -> None:
        """:class:`ConfigError` naming ``knn.layers`` for a layer the store does not hold."""
        if layer not in self.features:
            raise ConfigError(
                f"layer {layer!r} is not in the reference store (it has {', '.join(self.layers)}); add it to knn.layers"
            )

    def prepare_queries(self, layer: str, queries: Tensor) -> Tensor:
        """Queries at ``layer`` as float32 [B, D] CPU rows, checked against the pool's width."""
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

    def chunk_rows(self, layer: str) -> int:
        """Rows per chunk of a scan at ``layer``: about 32 MiB of float32."""
        return max(1024, _CHUNK_BYTES // (4 * self.features[layer].shape[1]))

    def scan(self, layer: str, rows: Tensor | None = None) -> Iterator[tuple[int, Tensor]]:
        """``(position, features)`` chunks of ``rows`` (default: the whole pool), in order
        (:func:`~ask.knn.features.scan_rows`: a cached whole pool is read from its file)."""
        return scan_rows(self.features[layer], self._files.get(layer), rows, self.chunk_rows(layer))

    def gather(self, layer: str, rows: Tensor) -> Tensor:
        """Features of many sorted ``rows`` (:func:`~ask.knn.features.gather_rows`)."""
        return gather_rows(self.features[layer], self._files.get(layer), rows, self.chunk_rows(layer))

    # ------------------------------------------------------------------ search

    @contextmanager
    def shared_searches(self, depth: int = SHARED_DEPTH) -> Iterator[None]:
        """Inside the block, a search of queries already searched is answered from memory, with
        the same results (:meth:`ask.knn.search.PoolIndexes.shared` says why and when)."""
        with self.indexes.shared(depth):
            yield

    def search(self, layer: str, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` pool points most similar to each query (exact unless ``index="ivf"``).

        ``queries``: [B, D] (or [B, ...], flattened) features at ``layer``. Returns
        ``(similarities [B, k], pool rows [B, k] int64)``, most similar first, on the queries'
        device. Not differentiable: recompute similarities from the rows where a gradient is needed.
        """
        self.check_layer(layer)
        n = len(self)
        if k < 1:
            raise ConfigError(f"knn.k={k} must be >= 1")
        if k > n:
            raise ConfigError(
                f"knn.k={k} but the reference pool has only {n} points; lower knn.k or raise knn.pool_per_class"
            )
        q = self.prepare_queries(layer, queries)
        rows = self.indexes.nearest(layer, None, q, k, queries.device, self.indexes.digest(q))
        sims, rows = self.indexes.rerank(layer, q, torch.from_numpy(rows))
        return sims.to(queries.device), rows.to(queries.device)

    def search_per_class(self, layer: str, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """For every class c, the ``k`` pool points of class c most similar to each query.

        Returns ``(similarities [B, C, k], global pool rows [B, C, k] int64)``, most similar first
        within each class, on the queries' device. One faiss index per class, built on first use;
        with ``index="ivf"`` a class gets an IVF index only when ``nprobe`` probes scan at most a
        quarter of its about 4 sqrt(n_c) cells (:func:`ask.knn.indexes.uses_ivf`; about 5,000
        points for nprobe=32), so ImageNet's 1,300-image classes stay exact and cheap.
        """
        self.check_layer(layer)
        if k < 1:
            raise ConfigError(f"knn.k={k} must be >= 1")
        counts = self.class_counts()
        smallest = int(torch.argmin(counts))
        if k > int(counts[smallest]):
            raise ConfigError(
                f"knn.k={k} but class {smallest} has only {int(counts[smallest])} reference points; "
                "lower knn.k or raise knn.pool_per_class"
            )
        q = self.prepare_queries(layer, queries)
        b = q.shape[0]
        sims = torch.empty(b, self.num_classes, k, dtype=torch.float32)
        rows = torch.empty(b, self.num_classes, k, dtype=torch.int64)
        digest = self.indexes.digest(q)
        for c in range(self.num_classes):
            local = torch.from_numpy(self.indexes.nearest(layer, c, q, k, queries.device, digest))
            sims[:, c], rows[:, c] = self.indexes.rerank(layer, q, self._class_rows[c][local])
        return sims.to(queries.device), rows.to(queries.device)

    # ------------------------------------------------------------------ index report

    def index_report(self, k: int = 5, layers: Sequence[str] | None = None,
                     n_queries: int = RECALL_QUERIES) -> dict:
        """Plain-data description of the search: index kind per layer and, for IVF, its recall@k.

        Recall protocol: ``n_queries`` pool rows drawn with a fixed seed are the queries (the
        build has no held-out points); the IVF index and an exact scan each return k + 1
        neighbours, the query's own row is dropped from both, and recall@k is the mean overlap
        of the two k-sets. A query's own cell is always probed, so this is slightly optimistic
        next to held-out queries (scripts/bench_store.py measures those). Builds the whole-pool
        index of each layer (default: all) if needed; cached per (layer, k).
        """
        return self.indexes.report(k, self.layers if layers is None else tuple(layers), n_queries)

    def measure_recall(self, layer: str, k: int, queries: Tensor | None = None,
                       n_queries: int = RECALL_QUERIES, seed: int = RECALL_SEED) -> dict:
        """Recall@k of the whole-pool index at ``layer`` against an exact scan of the pool.

        With ``queries`` ([Q, D] features, best held out from the pool) both searches return k
        neighbours; without, ``n_queries`` seeded pool rows are used with their own row excluded
        (see :meth:`index_report`). Returns ``recall_at_k``, ``k``, ``queries`` and ``protocol``.
        """
        return self.indexes.recall(layer, k, queries, n_queries, seed)
