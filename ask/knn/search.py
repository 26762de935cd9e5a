"""The faiss indexes of one reference store: built on first use per (layer, class, device), searched,
re-ranked by exact similarity, and measured for recall against an exact scan.

Search is exact by default (``IndexFlatIP`` on L2-normalised vectors for cosine, ``IndexFlatL2``
for l2): approximate neighbours would change the robustness numbers. ``kind="ivf"`` trades
exactness for speed on large pools (:mod:`ask.knn.indexes`); :meth:`PoolIndexes.report` measures
its recall. The similarities returned are recomputed in torch for the k rows found (same guarded
formulas as :mod:`ask.knn.similarity`), because faiss's L2 path expands |a|² + |b|² - 2 a·b and
loses precision for near-identical points; the k results are then re-sorted by these exact values.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ask.knn.faiss_build import faiss, gpu_index_problem
from ask.knn.indexes import IndexSettings, build_index, ivf_nlist, recall_at_k, set_nprobe, uses_ivf
from ask.knn.similarity import l2_normalize, rowwise_similarity

log = logging.getLogger(__name__)

__all__ = ["RECALL_QUERIES", "RECALL_SEED", "SHARED_DEPTH", "PoolIndexes"]

# GPU faiss's k-selection handles at most this many neighbours; larger k falls back to the CPU.
GPU_MAX_K = 2048
RECALL_QUERIES = 1000
RECALL_SEED = 0
# faiss-cpu's flat search takes a batch of fewer than 32 queries one query at a time, each a
# full pass over the pool: on a 20,000 x 4,096 pool (faiss 1.15.1, one core) 28 queries took
# 1.2 s and 32 took 0.19 s. From 8 queries on, zero rows pad such a batch to 32 (their answers
# are dropped); fewer are cheaper one by one.
FAISS_BATCHED_QUERIES = 32
PAD_QUERIES_FROM = 8
# Neighbours each search fetches inside shared searches: enough for every attack's per-class
# search at its default settings (at most 15), about free for a flat index.
SHARED_DEPTH = 32

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


class Pool(Protocol):
    """What the indexes read from their store (:class:`ask.knn.store.ReferenceStore`)."""

    metric: str
    features: dict[str, Tensor]

    def __len__(self) -> int: ...
    def class_counts(self) -> Tensor: ...
    def class_rows(self, cls: int) -> Tensor: ...
    def check_layer(self, layer: str) -> None: ...
    def prepare_queries(self, layer: str, queries: Tensor) -> Tensor: ...
    def rows(self, layer: str, rows: Tensor) -> Tensor: ...
    def scan(self, layer: str, rows: Tensor | None = None) -> Iterator[tuple[int, Tensor]]: ...
    def gather(self, layer: str, rows: Tensor) -> Tensor: ...


class PoolIndexes:
    """The indexes over ``store``'s features, keyed by (layer, class or None for the whole pool,
    GPU device or None for the host). ``cached`` is a read-only view of them."""

    def __init__(self, store: Pool, settings: IndexSettings) -> None:
        self.store = store
        self.settings = settings
        self._indexes: dict[tuple, Any] = {}
        self._info: dict[tuple, dict] = {}
        self._recall: dict[tuple[str, int], dict] = {}
        self._gpu_resources: Any = None
        # Raw faiss answers by (layer, class, queries' digest) while shared() is open.
        self._shared: dict[tuple, np.ndarray] | None = None
        self._shared_depth = 0

    @property
    def cached(self) -> Mapping[tuple, Any]:
        return MappingProxyType(self._indexes)

    @property
    def sharing(self) -> bool:
        """Whether a :meth:`shared` block is open."""
        return self._shared is not None

    def info(self, layer: str, cls: int | None = None) -> dict:
        """What was built at (layer, cls): ``kind`` (flat or ivf), ``faiss`` class, ``build_s``, IVF cells."""
        return dict(self._info[(layer, cls)])

    # ------------------------------------------------------------------ lifecycle

    def index_for(self, layer: str, cls: int | None, query_device: torch.device, k: int) -> Any:
        """The index over ``layer`` (all points, or class ``cls`` only) for queries on ``query_device``.

        A GPU index is built on the host and cloned to the GPU, and the host copy is dropped: the
        GPU index holds its own vectors, and keeping both would hold a large pool twice. A CPU
        search after that copies the GPU index back (the same IVF cells, no k-means) and keeps it.
        """
        _configure_faiss_threads()
        gpu = self.gpu_device(query_device) if k <= GPU_MAX_K else None
        index = self._indexes.get((layer, cls, gpu))
        if index is not None:
            return index
        host = self._indexes.pop((layer, cls, None), None)
        if host is None:
            on_a_gpu = next((found for (lay, c, _), found in self._indexes.items() if (lay, c) == (layer, cls)), None)
            host = self.build_cpu_index(layer, cls) if on_a_gpu is None else faiss.index_gpu_to_cpu(on_a_gpu)
        if gpu is None:
            self._indexes[(layer, cls, None)] = host
            return host
        if self._gpu_resources is None:
            self._gpu_resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(self._gpu_resources, gpu, host)
        if self._info[(layer, cls)]["kind"] == "ivf":
            set_nprobe(index, self.settings.nprobe)
        self._indexes[(layer, cls, gpu)] = index
        return index

    def build_cpu_index(self, layer: str, cls: int | None) -> Any:
        store = self.store
        rows = None if cls is None else store.class_rows(cls)
        n = len(store) if rows is None else rows.numel()
        settings = self.settings if cls is None else self.settings.for_class()
        start = time.perf_counter()

        def chunks() -> Iterator[np.ndarray]:
            for _, f in store.scan(layer, rows):
                yield self.prepared(f)

        def sample(m: int) -> np.ndarray:
            picked = torch.randperm(n, generator=torch.Generator().manual_seed(RECALL_SEED + 1))[:m].sort().values
            return self.prepared(store.gather(layer, picked if rows is None else rows[picked]))

        index = build_index(settings, store.features[layer].shape[1], store.metric, n, chunks, sample)
        ivf = uses_ivf(settings, n)
        info = {"kind": "ivf" if ivf else "flat", "faiss": type(index).__name__,
                "build_s": round(time.perf_counter() - start, 3)}
        if ivf:
            info.update(nlist=ivf_nlist(n, settings.nlist), nprobe=settings.nprobe)
        self._info[(layer, cls)] = info
        if cls is None:
            log.info("built a %s index over %d points at layer %s in %.1f s", info["faiss"], n, layer, info["build_s"])
        return index

    def gpu_device(self, query_device: torch.device) -> int | None:
        """The CUDA device whose faiss index serves queries on ``query_device``, or None for the host."""
        if not self.settings.use_gpu or query_device.type != "cuda":
            return None
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
            return None
        device = query_device.index if query_device.index is not None else torch.cuda.current_device()
        return None if gpu_index_problem(device) else device

    # ------------------------------------------------------------------ search

    def prepared(self, f: Tensor) -> np.ndarray:
        """Pool rows as faiss takes them: float32, L2-normalised for cosine (zero rows stay zero)."""
        f = f.float()
        if self.store.metric == "cosine":
            f = l2_normalize(f)
        return np.ascontiguousarray(f.numpy(), dtype=np.float32)

    def faiss_queries(self, q: Tensor) -> np.ndarray:
        """Queries as faiss takes them (the same preparation as the pool's rows)."""
        qn = l2_normalize(q.float()) if self.store.metric == "cosine" else q.float()
        return np.ascontiguousarray(qn.numpy(), dtype=np.float32)

    @contextmanager
    def shared(self, depth: int = SHARED_DEPTH) -> Iterator[None]:
        """Inside the block, a search of queries already searched is answered from memory.

        An evaluation batch looks the same points up many times: every attack searches the clean
        points (ASK-Atk's references, the DkNN and minimum-norm attacks' guides and radius,
        feature adversaries' guide, Adv-kNN's vote) and the kNN victims (knn, dknn, dknn_vote)
        share a layer, so each attack's output was searched three times. In the block each faiss
        search fetches ``max(k, depth)`` neighbours (what an exact flat search costs does not
        depend on k) and is kept by (layer, class, the queries' bytes); a later
        :meth:`ReferenceStore.search` or :meth:`ReferenceStore.search_per_class` of the very same
        queries with k no larger takes the first k of them in faiss's order, which is what a
        search for k returns, so the results do not change. (The one exception would be two pool points with exactly equal faiss scores at
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

    def digest(self, q: Tensor) -> str | None:
        """The prepared queries' identity for :meth:`shared` (None outside the block)."""
        if self._shared is None:
            return None
        return f"{tuple(q.shape)}:" + hashlib.sha1(q.numpy().data).hexdigest()

    def nearest(self, layer: str, cls: int | None, q: Tensor, k: int, query_device: torch.device,
                digest: str | None = None) -> np.ndarray:
        """Positions (within the class for ``cls``) of the k nearest, most similar first."""
        index = self.index_for(layer, cls, query_device, k)
        if self._shared is None or digest is None:
            return self.faiss_search(index, layer, cls, q, k)
        key = (layer, cls, digest)
        exact = self._info[(layer, cls)]["kind"] != "ivf"
        found = self._shared.get(key)
        if found is not None and (found.shape[1] >= k if exact else found.shape[1] == k):
            return found[:, :k]
        size = len(self.store) if cls is None else self.store.class_rows(cls).numel()
        depth = min(max(k, self._shared_depth), size) if exact else k
        found = self.faiss_search(index, layer, cls, q, depth)
        self._shared[key] = found
        return found[:, :k]

    def faiss_search(self, index: Any, layer: str, cls: int | None, q: Tensor, k: int) -> np.ndarray:
        queries = self.faiss_queries(q)
        n = queries.shape[0]
        if PAD_QUERIES_FROM <= n < FAISS_BATCHED_QUERIES and isinstance(index, faiss.IndexFlat):
            padding = np.zeros((FAISS_BATCHED_QUERIES - n, queries.shape[1]), dtype=np.float32)
            queries = np.concatenate([queries, padding])
        _, rows = index.search(queries, k)
        rows = rows[:n]
        missing = (rows < 0).any(axis=1)  # faiss pads with -1 when it finds fewer than k points
        if missing.any():
            if self._info[(layer, cls)]["kind"] != "ivf":
                raise RuntimeError("faiss returned fewer neighbours than requested")
            # The probed IVF cells held fewer than k points: answer those queries exactly.
            subset = None if cls is None else self.store.class_rows(cls)
            rows[missing] = self.exact_topk(layer, q[torch.from_numpy(missing)], k, subset)
        return rows.astype(np.int64, copy=False)

    def exact_topk(self, layer: str, q: Tensor, k: int, rows: Tensor | None = None) -> np.ndarray:
        """Exact top-k positions (within ``rows``, default the whole pool) by a chunked scan."""
        qn = torch.from_numpy(self.faiss_queries(q))
        q_sq = (qn * qn).sum(1, keepdim=True)
        best_s = torch.full((qn.shape[0], k), -float("inf"))
        best_r = torch.full((qn.shape[0], k), -1, dtype=torch.int64)
        for lo, f in self.store.scan(layer, rows):
            x = torch.from_numpy(self.prepared(f))
            s = qn @ x.T
            if self.store.metric == "l2":  # minus the squared distance: same order as the similarity
                s = 2 * s - q_sq - (x * x).sum(1).unsqueeze(0)
            top_s, top_i = torch.topk(s, min(k, s.shape[1]), dim=1)
            merged_s = torch.cat([best_s, top_s], 1)
            merged_r = torch.cat([best_r, top_i + lo], 1)
            best_s, pick = torch.topk(merged_s, k, dim=1)
            best_r = merged_r.gather(1, pick)
        return best_r.numpy()

    def rerank(self, layer: str, q: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(similarities, rows)`` of pool ``rows`` [B, k], recomputed exactly and sorted, most similar first."""
        sims = rowwise_similarity(q, self.store.features[layer][rows].float(), self.store.metric).float()
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices
        return sims.gather(1, order), rows.gather(1, order)

    # ------------------------------------------------------------------ recall

    def report(self, k: int, layers: Sequence[str], n_queries: int) -> dict:
        """:meth:`ReferenceStore.index_report`."""
        store, settings = self.store, self.settings
        report: dict[str, Any] = {
            "index": settings.kind, "feature_dtype": settings.feature_dtype, "n": len(store),
            "nlist": settings.nlist, "nprobe": settings.nprobe, "layers": {},
        }
        per_class = settings.for_class()
        counts = store.class_counts().tolist()
        for layer in layers:
            store.check_layer(layer)
            if (layer, None) not in self._info:  # not built yet: an index on a GPU already says it all
                self.index_for(layer, None, torch.device("cpu"), k)
            entry = self.info(layer)
            entry["per_class_ivf"] = sum(uses_ivf(per_class, c) for c in counts)
            if entry["kind"] == "ivf":
                entry.update(self.recall(layer, k, n_queries=n_queries))
            report["layers"][layer] = entry
        return report

    def recall(self, layer: str, k: int, queries: Tensor | None = None,
               n_queries: int = RECALL_QUERIES, seed: int = RECALL_SEED) -> dict:
        """:meth:`ReferenceStore.measure_recall`."""
        store = self.store
        store.check_layer(layer)
        if (layer, k) in self._recall and queries is None:
            return self._recall[(layer, k)]
        n = len(store)
        index = self.index_for(layer, None, torch.device("cpu"), k)
        if queries is None:
            m = min(n_queries, n)
            picked = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values
            q = store.rows(layer, picked)
            kk = min(k + 1, n)
            _, approx = index.search(self.faiss_queries(q), kk)
            exact = self.exact_topk(layer, q, kk)
            approx, exact = _drop_own_row(approx, picked, k), _drop_own_row(exact, picked, k)
            protocol = "pool rows (seeded), own row excluded"
        else:
            q = store.prepare_queries(layer, queries)
            m = q.shape[0]
            _, approx = index.search(self.faiss_queries(q), k)
            exact = self.exact_topk(layer, q, k)
            protocol = "given queries"
        result = {"recall_at_k": recall_at_k(approx, exact), "k": int(k), "queries": int(m), "protocol": protocol}
        log.info("index at layer %s: recall@%d = %.4f against exact search (%d queries, %s)",
                 layer, k, result["recall_at_k"], m, protocol)
        if queries is None:
            self._recall[(layer, k)] = result
        return result


def _drop_own_row(found: np.ndarray, own: Tensor, k: int) -> np.ndarray:
    """Remove each query's own pool row from its k + 1 neighbours (else the last one)."""
    found = np.asarray(found)
    own = own.numpy().reshape(-1, 1)
    drop = found == own
    drop[~drop.any(axis=1), -1] = True
    drop &= np.cumsum(drop, axis=1) == 1  # only the first match if a row appears twice
    return found[~drop].reshape(found.shape[0], -1)[:, :k]
