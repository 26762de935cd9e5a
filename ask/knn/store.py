"""The reference pool: labelled points with their features precomputed at each layer, and
nearest-neighbour search over them with faiss.

Features are computed once per (model, pool, layers, dtype) and cached on disk; every later lookup
is a faiss search, never a recomputation of the pool's features (the paper code's main cost).

Scale: features are written chunk by chunk into preallocated ``.npy`` files (see
:mod:`ask.knn.features`) and read back as memory maps, so a pool of millions of points never sits
in RAM as a whole; ``feature_dtype="float16"`` halves disk and memory. ``store.features[layer]``
is a CPU tensor over that map (float32 or float16): gather the rows you need, then ``.float()``.

Search is exact by default (``IndexFlatIP`` on L2-normalised vectors for cosine, ``IndexFlatL2``
for l2): approximate neighbours would change the robustness numbers. ``index="ivf"`` trades
exactness for speed on large pools (:mod:`ask.knn.indexes`); its recall against exact search is
measured by :meth:`ReferenceStore.index_report`. The similarities returned are recomputed in
torch for the k rows found (same guarded formulas as :mod:`ask.knn.similarity`), because faiss's
L2 path expands |a|² + |b|² - 2 a·b and loses precision for near-identical points; the k results
are then re-sorted by these exact values.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ask.constants import INDEX_KINDS
from ask.errors import ConfigError, ModelError, require_named_layers
from ask.knn.faiss_build import faiss, gpu_index_problem
from ask.knn.features import (
    CACHE_FORMAT,
    FEATURE_DTYPES,
    FeatureFile,
    FeatureWriter,
    feature_file_info,
    read_cache,
    read_rows,
)
from ask.knn.indexes import build_index, ivf_nlist, recall_at_k, set_nprobe, uses_ivf
from ask.knn.similarity import check_metric, l2_normalize, rowwise_similarity
from ask.utils.diskarrays import remove_tree
from ask.utils.runtime import to_device

log = logging.getLogger(__name__)

__all__ = ["CACHE_FORMAT", "ReferenceStore", "check_index_settings", "store_cache_key", "tensor_digest"]

# GPU faiss's k-selection handles at most this many neighbours; larger k falls back to the CPU.
_GPU_MAX_K = 2048
# Rows per chunk when scanning the pool (index fill, exact scans): about 32 MiB of float32.
_CHUNK_BYTES = 32 << 20
RECALL_QUERIES = 1000
# faiss-cpu's flat search takes a batch of fewer than 32 queries one query at a time, each a
# full pass over the pool: on a 20,000 x 4,096 pool (faiss 1.15.1, one core) 28 queries took
# 1.2 s and 32 took 0.19 s. From 8 queries on, zero rows pad such a batch to 32 (their answers
# are dropped); fewer are cheaper one by one.
_FAISS_BATCHED_QUERIES = 32
_PAD_QUERIES_FROM = 8
# Neighbours each search fetches inside ReferenceStore.shared_searches(): enough for every
# attack's per-class search at its default settings (at most 15), about free for a flat index.
SHARED_DEPTH = 32
RECALL_SEED = 0

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


def check_index_settings(index: str, nlist: int | None, nprobe: int, feature_dtype: str = "float32") -> None:
    """:class:`ConfigError` for an unknown index kind or dtype, or a non-positive nlist / nprobe."""
    if index not in INDEX_KINDS:
        raise ConfigError(f"knn.index={index!r} is not one of {', '.join(INDEX_KINDS)}")
    if nlist is not None and (isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 1):
        raise ConfigError(f"knn.nlist={nlist!r} must be a positive integer or null (about 4 sqrt(N))")
    if isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1:
        raise ConfigError(f"knn.nprobe={nprobe!r} must be a positive integer, e.g. 32")
    if feature_dtype not in FEATURE_DTYPES:
        raise ConfigError(f"knn.feature_dtype={feature_dtype!r} is not one of {', '.join(FEATURE_DTYPES)}")


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


def _as_feature_tensor(f: Any) -> Tensor:
    """A [N, D] CPU tensor without copying a memmap; float16 stays float16, the rest float32."""
    if isinstance(f, np.ndarray):
        if f.dtype not in (np.float16, np.float32):
            f = f.astype(np.float32)
        t = torch.from_numpy(f)
    else:
        t = f.detach().to("cpu")
        if t.dtype != torch.float16:
            t = t.to(torch.float32)
    t = t.reshape(t.shape[0], -1)
    return t if t.is_contiguous() else t.contiguous()


class ReferenceStore:
    """Labelled pool points with flattened features per layer (all on the CPU).

    Attributes: ``layers``, ``metric``, ``num_classes``, ``labels`` (int64 [N]), ``features``
    (layer -> float32 or float16 [N, D], possibly a read-only-on-disk memory map: gather rows,
    then ``.float()``), ``pool_indices`` (int64 [N], rows of the split the pool came from),
    ``feature_dtype``, the index settings ``index`` / ``nlist`` / ``nprobe``, ``from_cache``
    (whether :meth:`build` loaded the features from its cache directory), and ``cache_path`` /
    ``cache_key``: the cache directory the features live in and its key, or None for a store
    held in memory (parts fitted on the pool are cached there, see :mod:`ask.knn.fitted`).
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
        use_gpu_index: bool = True,
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 32,
    ) -> None:
        check_metric(metric)
        check_index_settings(index, nlist, nprobe)
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
            f = _as_feature_tensor(raw)
            if f.shape[0] != n:
                raise ValueError(f"layer {layer!r} has {f.shape[0]} feature rows for {n} labels")
            self.features[layer] = f
            if info is not None and f.data_ptr() == raw.ctypes.data:
                self._files[layer] = info  # scans read the file, not the map (see _iter_rows)
        dtypes = {str(f.dtype).removeprefix("torch.") for f in self.features.values()}
        self.feature_dtype = "float16" if "float16" in dtypes else "float32"
        self.use_gpu_index = use_gpu_index
        self.index_kind = index
        self.nlist = nlist
        self.nprobe = int(nprobe)
        self.from_cache = False
        self.cache_path: Path | None = None
        self.cache_key: dict | None = None
        # One stable sort instead of a comparison per class: ImageNet has 1,000 classes.
        order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        self._class_rows = list(torch.split(order, counts))
        self._indexes: dict[tuple, Any] = {}
        self._index_info: dict[tuple, dict] = {}
        self._recall: dict[tuple[str, int], dict] = {}
        self._gpu_resources: Any = None
        # Raw faiss answers by (layer, class, queries' digest) while shared_searches() is open.
        self._shared: dict[tuple, np.ndarray] | None = None
        self._shared_depth = 0

    # ------------------------------------------------------------------ construction

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
        feature_dtype: str = "float32",
        cache_path: str | Path | None = None,
        cache_key: dict | None = None,
        use_gpu_index: bool = True,
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 32,
    ) -> ReferenceStore:
        """A store from ``(features by layer [B, ...], labels [B])`` chunks of any source, in order.

        ``n`` is the total number of rows (the arrays are preallocated). With ``cache_path`` the
        features go straight to a new cache directory there (replacing any old one once complete)
        and are memory-mapped back; without it they fill preallocated arrays in RAM. Either way
        no chunk is kept after it is written, so peak memory is one chunk plus the output.
        """
        check_metric(metric)
        check_index_settings(index, nlist, nprobe, feature_dtype)
        layers = tuple(layers)
        if n < 1:
            raise ConfigError("the reference pool is empty; raise knn.pool_per_class or check the training split")
        if cache_path is not None and cache_key is None:
            raise ValueError("cache_path needs a cache_key (see store_cache_key) so a stale cache is never reused")
        pool = np.arange(n, dtype=np.int64) if pool_indices is None else _int64_numpy(pool_indices)
        writer = FeatureWriter(n, layers, feature_dtype, cache_path)
        try:
            for features, labels in chunks:
                writer.write(features, labels)
            meta = {"key": _plain(cache_key), "metric": metric}
            arrays = writer.finish(pool, meta)
        except BaseException:
            writer.abort()
            raise
        store = cls(
            layers, metric, num_classes, torch.from_numpy(writer.labels), arrays, torch.from_numpy(pool),
            use_gpu_index=use_gpu_index, index=index, nlist=nlist, nprobe=nprobe,
        )
        if cache_path is not None:
            store.cache_path, store.cache_key = Path(cache_path).expanduser(), _plain(cache_key)
        return store

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
        feature_dtype: str = "float32",
        use_gpu_index: bool = True,
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 32,
    ) -> ReferenceStore | None:
        """The store cached at ``cache_path``, or None (with a warning if a cache was there but
        is stale, partial or unreadable; such a cache is never used).

        Usable only if its key, layers, metric, dtype and size match, and (when given) its labels
        and pool indices equal ``labels`` / ``pool_indices``. Features stay on disk, memory-mapped.
        """
        path = Path(cache_path).expanduser()
        if not path.exists() and not path.is_symlink():
            return None
        layers = tuple(layers)
        n = None if labels is None else int(torch.as_tensor(labels).numel())
        expect = {
            "key": _plain(cache_key), "layers": list(layers), "metric": metric,
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
        if labels is not None and not np.array_equal(cached_labels, _int64_numpy(labels)):
            reason = "its pool labels differ"
        elif pool_indices is not None and not np.array_equal(cached_pool, _int64_numpy(pool_indices)):
            reason = "its pool indices differ"
        else:
            reason = None
        if reason is not None:
            log.warning("ignoring reference-feature cache %s: %s; recomputing the features", path, reason)
            return None
        store = cls(
            layers, metric, num_classes, torch.from_numpy(cached_labels), dict(zip(layers, arrays, strict=True)),
            torch.from_numpy(cached_pool), use_gpu_index=use_gpu_index, index=index, nlist=nlist, nprobe=nprobe,
        )
        store.from_cache = True
        store.cache_path, store.cache_key = path, _plain(cache_key)
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
        use_gpu_index: bool = True,
        feature_dtype: str = "float32",
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 32,
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
        check_index_settings(index, nlist, nprobe, feature_dtype)
        layers = tuple(layers)
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
            raise ConfigError("the reference pool is empty; raise knn.pool_per_class or check the training split")
        if pool_indices is None:
            pool_indices = torch.arange(n)
        pool_indices = torch.as_tensor(pool_indices).detach().to("cpu", torch.int64).reshape(-1)
        if cache_path is not None and cache_key is None:
            raise ValueError(
                "cache_path needs a cache_key (see store_cache_key) so a stale cache is never reused"
            )
        settings = dict(use_gpu_index=use_gpu_index, index=index, nlist=nlist, nprobe=nprobe)
        if cache_path is not None:
            cache_path = Path(cache_path).expanduser()
            store = cls.load(cache_path, cache_key, layers, metric, num_classes, labels=labels,
                             pool_indices=pool_indices, feature_dtype=feature_dtype, **settings)
            if store is not None:
                log.info("loaded reference features for %d points from %s", n, cache_path)
                return store
            if cache_path.exists() or cache_path.is_symlink():
                remove_tree(cache_path)  # stale: freeing its space before the rebuild matters at scale

        device = torch.device(device) if device is not None else _model_device(model)
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        try:
            def build_into(path: Path | None) -> ReferenceStore:
                chunks = _model_chunks(model, images, labels, layers, batch_size, device, progress)
                return cls.from_chunks(chunks, n, layers, metric, num_classes, pool_indices=pool_indices,
                                       feature_dtype=feature_dtype, cache_path=path, cache_key=cache_key,
                                       **settings)
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
                 n, ", ".join(layers), time.perf_counter() - start, feature_dtype)
        return store

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

    def rows(self, layer: str, rows: Tensor) -> Tensor:
        """float32 features of pool ``rows`` (any shape) at ``layer``: [*rows.shape, D]."""
        rows = torch.as_tensor(rows).long().cpu()
        return self.features[layer][rows.reshape(-1)].float().view(*rows.shape, -1)

    # ------------------------------------------------------------------ search

    @contextmanager
    def shared_searches(self, depth: int = SHARED_DEPTH) -> Iterator[None]:
        """Inside the block, a search of queries already searched is answered from memory.

        An evaluation batch looks the same points up many times: every attack searches the clean
        points (ASK-Atk's references, the DkNN and minimum-norm attacks' guides and radius,
        feature adversaries' guide, Adv-kNN's vote) and the kNN victims (knn, dknn, dknn_vote)
        share a layer, so each attack's output was searched three times. In the block each faiss
        search fetches ``max(k, depth)`` neighbours (what an exact flat search costs does not
        depend on k) and is kept by (layer, class, the queries' bytes); a later :meth:`search` or
        :meth:`search_per_class` of the very same queries with k no larger takes the first k
        of them in faiss's order, which is what a search for k returns, so the results do not
        change. (The one exception would be two pool points with exactly equal faiss scores at
        the k-th place, i.e. duplicate pool features, where faiss may list either first.) With
        ``index="ivf"`` only a search for the same k is reused, since a deeper IVF search can
        fall back to exact search where the shallower one does not. Memory: rows of pool
        indices only, freed when the block ends.
        """
        if self._shared is not None:  # nested: the outer block already shares
            yield
            return
        self._shared, self._shared_depth = {}, int(depth)
        try:
            yield
        finally:
            self._shared, self._shared_depth = None, 0

    def search(self, layer: str, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """The ``k`` pool points most similar to each query (exact unless ``index="ivf"``).

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
        rows = self._raw_search(index, layer, None, q, k, self._digest(q))
        sims, rows = self._exact_sorted(layer, q, torch.from_numpy(rows))
        return sims.to(queries.device), rows.to(queries.device)

    def search_per_class(self, layer: str, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """For every class c, the ``k`` pool points of class c most similar to each query.

        Returns ``(similarities [B, C, k], global pool rows [B, C, k] int64)``, most similar first
        within each class, on the queries' device. One faiss index per class, built on first use;
        with ``index="ivf"`` a class gets an IVF index only when ``nprobe`` probes scan at most a
        quarter of its about 4 sqrt(n_c) cells (:func:`ask.knn.indexes.uses_ivf`; about 5,000
        points for nprobe=32), so ImageNet's 1,300-image classes stay exact and cheap.
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
        digest = self._digest(q)
        for c in range(self.num_classes):
            index = self._index(layer, c, queries.device, k)
            local = torch.from_numpy(self._raw_search(index, layer, c, q, k, digest))
            sims[:, c], rows[:, c] = self._exact_sorted(layer, q, self._class_rows[c][local])
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
        layers = self.layers if layers is None else tuple(layers)
        report: dict[str, Any] = {
            "index": self.index_kind, "feature_dtype": self.feature_dtype, "n": len(self),
            "nlist": self.nlist, "nprobe": self.nprobe, "layers": {},
        }
        counts = self.class_counts().tolist()
        for layer in layers:
            self._check_layer(layer)
            if (layer, None) not in self._index_info:  # not built yet: an index on a GPU already says it all
                self._index(layer, None, torch.device("cpu"), k)
            entry = dict(self._index_info[(layer, None)])
            entry["per_class_ivf"] = sum(uses_ivf(self.index_kind, c, None, self.nprobe) for c in counts)
            if entry["kind"] == "ivf":
                entry.update(self.measure_recall(layer, k, n_queries=n_queries))
            report["layers"][layer] = entry
        return report

    def measure_recall(self, layer: str, k: int, queries: Tensor | None = None,
                       n_queries: int = RECALL_QUERIES, seed: int = RECALL_SEED) -> dict:
        """Recall@k of the whole-pool index at ``layer`` against an exact scan of the pool.

        With ``queries`` ([Q, D] features, best held out from the pool) both searches return k
        neighbours; without, ``n_queries`` seeded pool rows are used with their own row excluded
        (see :meth:`index_report`). Returns ``recall_at_k``, ``k``, ``queries`` and ``protocol``.
        """
        self._check_layer(layer)
        if (layer, k) in self._recall and queries is None:
            return self._recall[(layer, k)]
        n = len(self)
        index = self._index(layer, None, torch.device("cpu"), k)
        if queries is None:
            m = min(n_queries, n)
            picked = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values
            q = self.rows(layer, picked)
            kk = min(k + 1, n)
            _, approx = index.search(self._faiss_queries(q), kk)
            exact = self._exact_topk(layer, q, kk)
            approx, exact = _drop_own_row(approx, picked, k), _drop_own_row(exact, picked, k)
            protocol = "pool rows (seeded), own row excluded"
        else:
            q = self._prepare_queries(layer, queries)
            m = q.shape[0]
            _, approx = index.search(self._faiss_queries(q), k)
            exact = self._exact_topk(layer, q, k)
            protocol = "given queries"
        result = {"recall_at_k": recall_at_k(approx, exact), "k": int(k), "queries": int(m), "protocol": protocol}
        log.info("index at layer %s: recall@%d = %.4f against exact search (%d queries, %s)",
                 layer, k, result["recall_at_k"], m, protocol)
        if queries is None:
            self._recall[(layer, k)] = result
        return result

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

    def _prepared(self, f: Tensor) -> np.ndarray:
        f = f.float()
        if self.metric == "cosine":
            f = l2_normalize(f)  # same guard as the similarity: zero rows stay zero
        return np.ascontiguousarray(f.numpy(), dtype=np.float32)

    def _chunk_rows(self, layer: str) -> int:
        return max(1024, _CHUNK_BYTES // (4 * self.features[layer].shape[1]))

    def _iter_rows(self, layer: str, rows: Tensor | None) -> Iterator[tuple[int, Tensor]]:
        """``(position, features)`` chunks of ``rows`` (default: the whole pool), in order.

        A whole-pool scan of a cached store reads the file with plain I/O: pages touched through
        the memory map would stay in this process's resident set, doubling the apparent memory of
        an index build.
        """
        step = self._chunk_rows(layer)
        total = len(self) if rows is None else rows.numel()
        info = self._files.get(layer) if rows is None else None
        for lo in range(0, total, step):
            hi = min(total, lo + step)
            if info is not None:
                yield lo, torch.from_numpy(read_rows(info, lo, hi))
            elif rows is None:
                yield lo, self.features[layer][lo:hi]
            else:
                yield lo, self.features[layer][rows[lo:hi]]

    def _gather(self, layer: str, rows: Tensor) -> Tensor:
        """Features of many sorted ``rows`` (e.g. a training sample of 1 % of the pool).

        Through the memory map each scattered row would fault in a 64 KiB neighbourhood that then
        stays resident: a 64k-row sample mapped 1 GB. Reading the file chunk by chunk and keeping
        the wanted rows costs one sequential pass instead.
        """
        info = self._files.get(layer)
        if info is None or rows.numel() < 4096:
            return self.features[layer][rows]
        parts = []
        for lo, f in self._iter_rows(layer, None):
            hi = lo + f.shape[0]
            inside = rows[(rows >= lo) & (rows < hi)]
            if inside.numel():
                parts.append(f[inside - lo].clone())
        return torch.cat(parts)

    def _index(self, layer: str, cls: int | None, query_device: torch.device, k: int) -> Any:
        """The index over ``layer`` (all points, or class ``cls`` only) for queries on ``query_device``.

        A GPU index is built on the host and cloned to the GPU, and the host copy is dropped: the
        GPU index holds its own vectors, and keeping both would hold a large pool twice. A CPU
        search after that copies the GPU index back (the same IVF cells, no k-means) and keeps it.
        """
        _configure_faiss_threads()
        gpu = self._gpu_device(query_device) if k <= _GPU_MAX_K else None
        index = self._indexes.get((layer, cls, gpu))
        if index is not None:
            return index
        host = self._indexes.pop((layer, cls, None), None)
        if host is None:
            on_a_gpu = next((found for (lay, c, _), found in self._indexes.items() if (lay, c) == (layer, cls)), None)
            host = self._build_cpu_index(layer, cls) if on_a_gpu is None else faiss.index_gpu_to_cpu(on_a_gpu)
        if gpu is None:
            self._indexes[(layer, cls, None)] = host
            return host
        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu, host)
        if self._index_info[(layer, cls)]["kind"] == "ivf":
            set_nprobe(index, self.nprobe)
        self._indexes[(layer, cls, gpu)] = index
        return index

    def _build_cpu_index(self, layer: str, cls: int | None) -> Any:
        rows = None if cls is None else self._class_rows[cls]
        n = len(self) if rows is None else rows.numel()
        # A user's nlist is sized for the whole pool; a class index uses the default for its size.
        nlist = self.nlist if cls is None else None
        start = time.perf_counter()

        def chunks() -> Iterator[np.ndarray]:
            for _, f in self._iter_rows(layer, rows):
                yield self._prepared(f)

        def sample(m: int) -> np.ndarray:
            picked = torch.randperm(n, generator=torch.Generator().manual_seed(RECALL_SEED + 1))[:m].sort().values
            return self._prepared(self._gather(layer, picked if rows is None else rows[picked]))

        index = build_index(self.index_kind, self.features[layer].shape[1], self.metric, self.feature_dtype, n,
                            chunks, sample, nlist=nlist, nprobe=self.nprobe)
        ivf = uses_ivf(self.index_kind, n, nlist, self.nprobe)
        info = {"kind": "ivf" if ivf else "flat", "faiss": type(index).__name__,
                "build_s": round(time.perf_counter() - start, 3)}
        if ivf:
            info.update(nlist=ivf_nlist(n, nlist), nprobe=self.nprobe)
        self._index_info[(layer, cls)] = info
        if cls is None:
            log.info("built a %s index over %d points at layer %s in %.1f s", info["faiss"], n, layer, info["build_s"])
        return index

    def _gpu_device(self, query_device: torch.device) -> int | None:
        if not self.use_gpu_index or query_device.type != "cuda":
            return None
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            return None
        device = query_device.index if query_device.index is not None else torch.cuda.current_device()
        return None if gpu_index_problem(device) else device

    def _faiss_queries(self, q: Tensor) -> np.ndarray:
        qn = l2_normalize(q.float()) if self.metric == "cosine" else q.float()
        return np.ascontiguousarray(qn.numpy(), dtype=np.float32)

    def _digest(self, q: Tensor) -> str | None:
        """The prepared queries' identity for :meth:`shared_searches` (None outside the block)."""
        if self._shared is None:
            return None
        return f"{tuple(q.shape)}:" + hashlib.sha1(q.numpy().data).hexdigest()

    def _raw_search(self, index: Any, layer: str, cls: int | None, q: Tensor, k: int,
                    digest: str | None = None) -> np.ndarray:
        """Positions (within the class for ``cls``) of the k nearest, most similar first."""
        if self._shared is None or digest is None:
            return self._faiss_search(index, layer, cls, q, k)
        key = (layer, cls, digest)
        exact = self._index_info[(layer, cls)]["kind"] != "ivf"
        found = self._shared.get(key)
        if found is not None and (found.shape[1] >= k if exact else found.shape[1] == k):
            return found[:, :k]
        size = len(self) if cls is None else self._class_rows[cls].numel()
        depth = min(max(k, self._shared_depth), size) if exact else k
        found = self._faiss_search(index, layer, cls, q, depth)
        self._shared[key] = found
        return found[:, :k]

    def _faiss_search(self, index: Any, layer: str, cls: int | None, q: Tensor, k: int) -> np.ndarray:
        queries = self._faiss_queries(q)
        n = queries.shape[0]
        if _PAD_QUERIES_FROM <= n < _FAISS_BATCHED_QUERIES and isinstance(index, faiss.IndexFlat):
            padding = np.zeros((_FAISS_BATCHED_QUERIES - n, queries.shape[1]), dtype=np.float32)
            queries = np.concatenate([queries, padding])
        _, rows = index.search(queries, k)
        rows = rows[:n]
        missing = (rows < 0).any(axis=1)  # faiss pads with -1 when it finds fewer than k points
        if missing.any():
            if self._index_info[(layer, cls)]["kind"] != "ivf":
                raise RuntimeError("faiss returned fewer neighbours than requested")
            # The probed IVF cells held fewer than k points: answer those queries exactly.
            subset = None if cls is None else self._class_rows[cls]
            rows[missing] = self._exact_topk(layer, q[torch.from_numpy(missing)], k, subset)
        return rows.astype(np.int64, copy=False)

    def _exact_topk(self, layer: str, q: Tensor, k: int, rows: Tensor | None = None) -> np.ndarray:
        """Exact top-k positions (within ``rows``, default the whole pool) by a chunked scan."""
        qn = torch.from_numpy(self._faiss_queries(q))
        q_sq = (qn * qn).sum(1, keepdim=True)
        best_s = torch.full((qn.shape[0], k), -float("inf"))
        best_r = torch.full((qn.shape[0], k), -1, dtype=torch.int64)
        for lo, f in self._iter_rows(layer, rows):
            x = torch.from_numpy(self._prepared(f))
            s = qn @ x.T
            if self.metric == "l2":  # minus the squared distance: same order as the similarity
                s = 2 * s - q_sq - (x * x).sum(1).unsqueeze(0)
            top_s, top_i = torch.topk(s, min(k, s.shape[1]), dim=1)
            merged_s = torch.cat([best_s, top_s], 1)
            merged_r = torch.cat([best_r, top_i + lo], 1)
            best_s, pick = torch.topk(merged_s, k, dim=1)
            best_r = merged_r.gather(1, pick)
        return best_r.numpy()

    def _exact_sorted(self, layer: str, q: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        sims = rowwise_similarity(q, self.features[layer][rows].float(), self.metric).float()
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices
        return sims.gather(1, order), rows.gather(1, order)


def _drop_own_row(found: np.ndarray, own: Tensor, k: int) -> np.ndarray:
    """Remove each query's own pool row from its k + 1 neighbours (else the last one)."""
    found = np.asarray(found)
    own = own.numpy().reshape(-1, 1)
    drop = found == own
    drop[~drop.any(axis=1), -1] = True
    drop &= np.cumsum(drop, axis=1) == 1  # only the first match if a row appears twice
    return found[~drop].reshape(found.shape[0], -1)[:, :k]


def _int64_numpy(x: Any) -> np.ndarray:
    return torch.as_tensor(x).detach().to("cpu", torch.int64).reshape(-1).numpy()


def _plain(key: Any) -> Any:
    """The key as it reads back from JSON (tuples become lists), so == compares like with like."""
    return None if key is None else json.loads(json.dumps(key, sort_keys=True))


def _model_chunks(
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
                x = _to_float_images(to_device(images[lo : lo + batch_size], device))
                out = model.forward_features(x, list(layers))
                feats = {layer: out[layer].reshape(x.shape[0], -1).float().cpu() for layer in layers}
            bar.update(x.shape[0])
            yield feats, labels[lo : lo + x.shape[0]]
