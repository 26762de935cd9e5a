"""faiss indexes over a reference pool: exact ``flat`` (the default) or approximate ``ivf``.

Both are filled chunk by chunk, so the pool's float32 features never exist twice in memory (the
index holds its own copy; a chunk is the only extra). Cosine similarity is an inner product of
L2-normalised vectors; ``l2`` uses the squared Euclidean distance.

``ivf`` is an inverted file over ``nlist`` k-means cells, of which ``nprobe`` are scanned per
query: ``IndexIVFFlat``, or ``IndexIVFScalarQuantizer`` with fp16 codes for a float16 store (the
codes are then exactly the stored values, at half the memory). Its neighbours can differ from the
exact ones, so a store using it measures its recall (:func:`recall_at_k`) against exact search.

:class:`IndexSettings` is the one object that carries these choices (kind, nlist, nprobe, the
stored dtype, GPU use) from the config to the store and its indexes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from ask.constants import FEATURE_DTYPES, INDEX_KINDS
from ask.errors import ConfigError
from ask.knn.faiss_build import faiss

# faiss warns below this many training points per k-means cell (the clustering is then poor).
MIN_POINTS_PER_LIST = 39
# Training sample size per cell: above faiss's minimum, far below its 256 default cap, because
# k-means costs sample x nlist x D per iteration and dominates the build on a CPU.
TRAIN_POINTS_PER_LIST = 64


@dataclass(frozen=True)
class IndexSettings:
    """How a reference store keeps and searches its features (``knn.index``, ``knn.nlist``, ...).

    ``kind``: ``flat`` (exact) or ``ivf`` (approximate); ``nlist``: IVF cells of the whole-pool
    index (None: about 4 sqrt(N)); ``nprobe``: cells scanned per query; ``feature_dtype``: how the
    features are stored (a store built from arrays reports the arrays' dtype); ``use_gpu``: clone
    indexes to the GPU of CUDA queries when faiss can. Bad values are :class:`ConfigError`.
    """

    kind: str = "flat"
    nlist: int | None = None
    nprobe: int = 32
    feature_dtype: str = "float32"
    use_gpu: bool = True

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"knn.index={self.kind!r} is not one of {', '.join(INDEX_KINDS)}")
        nlist = self.nlist
        if nlist is not None and (isinstance(nlist, bool) or not isinstance(nlist, int) or nlist < 1):
            raise ConfigError(f"knn.nlist={nlist!r} must be a positive integer or null (about 4 sqrt(N))")
        if isinstance(self.nprobe, bool) or not isinstance(self.nprobe, int) or self.nprobe < 1:
            raise ConfigError(f"knn.nprobe={self.nprobe!r} must be a positive integer, e.g. 32")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(
                f"knn.feature_dtype={self.feature_dtype!r} is not one of {', '.join(FEATURE_DTYPES)}"
            )

    def for_class(self) -> IndexSettings:
        """The settings of a one-class index: a user's nlist is sized for the whole pool, so a
        class gets the default for its own size."""
        return replace(self, nlist=None)


def ivf_nlist(n: int, nlist: int | None) -> int:
    """Cells for an IVF index over ``n`` points: ``nlist`` or about 4 sqrt(n), at most n / 39."""
    wanted = nlist if nlist is not None else max(1, round(4 * math.sqrt(n)))
    return max(1, min(int(wanted), n // MIN_POINTS_PER_LIST))


# IVF only pays when a query scans a small part of the pool; below this many cells per probed
# cell an exact flat index costs about the same and is exact.
MIN_CELLS_PER_PROBE = 4


def uses_ivf(settings: IndexSettings, n: int) -> bool:
    """Whether an index over ``n`` points is IVF: only when asked and when ``nprobe`` probes
    scan at most a quarter of its cells (so with nprobe=32, pools or classes of >= ~5,000 points)."""
    return settings.kind == "ivf" and ivf_nlist(n, settings.nlist) >= MIN_CELLS_PER_PROBE * settings.nprobe


def new_index(kind: str, d: int, metric: str, feature_dtype: str, nlist: int) -> faiss.Index:
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2
    if kind == "flat":
        return faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    quantizer = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    if feature_dtype == "float16":
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16, faiss_metric)
    else:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss_metric)
    index.cp.seed = 1234  # faiss's k-means seed, explicit so the cells never depend on a default
    return index


def build_index(
    settings: IndexSettings,
    d: int,
    metric: str,
    n: int,
    chunks: Callable[[], Iterator[np.ndarray]],
    sample: Callable[[int], np.ndarray],
) -> faiss.Index:
    """An index over the ``n`` rows that ``chunks()`` yields (float32, already normalised for cosine).

    ``sample(m)`` returns ``m`` seeded rows (same preparation) to train the IVF cells on. ``kind``
    ``"ivf"`` falls back to flat where :func:`uses_ivf` says IVF would not skip anything.
    """
    ivf = uses_ivf(settings, n)
    cells = ivf_nlist(n, settings.nlist) if ivf else 0
    index = new_index("ivf" if ivf else "flat", d, metric, settings.feature_dtype, cells)
    if ivf:
        index.train(np.ascontiguousarray(sample(min(n, TRAIN_POINTS_PER_LIST * cells)), dtype=np.float32))
        index.nprobe = int(settings.nprobe)
        _add_presized(index, chunks, n)
    else:
        for chunk in chunks():
            index.add(np.ascontiguousarray(chunk, dtype=np.float32))
    if index.ntotal != n:
        raise RuntimeError(f"the index holds {index.ntotal} vectors, expected {n}")
    return index


def _add_presized(index: faiss.Index, chunks: Callable[[], Iterator[np.ndarray]], n: int) -> None:
    """Fill an IVF index in two passes: assign every vector to its cell, size each inverted list
    once, then add with the precomputed cells.

    Added chunk by chunk, each list grows by repeated reallocation and the freed buffers stay in
    the heap: the index then holds twice its size in RAM (measured: 2.3 GB for 1 GB of codes).
    """
    cells = np.empty(n, dtype=np.int64)
    lo = 0
    for chunk in chunks():
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        cells[lo : lo + len(chunk)] = index.quantizer.assign(chunk, 1).ravel()
        lo += len(chunk)
    if lo != n:
        raise RuntimeError(f"the pool yielded {lo} vectors, expected {n}")
    lists = index.invlists
    if hasattr(lists, "resize"):  # ArrayInvertedLists: shrinking keeps the capacity just reserved
        for cell, count in enumerate(np.bincount(cells, minlength=index.nlist).tolist()):
            if count:
                lists.resize(cell, count)
                lists.resize(cell, 0)
    lo = 0
    for chunk in chunks():
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        part = np.ascontiguousarray(cells[lo : lo + len(chunk)])
        index.add_core(len(chunk), faiss.swig_ptr(chunk), None, faiss.swig_ptr(part))
        lo += len(chunk)


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set ``nprobe`` on a CPU or GPU IVF index (a GPU clone does not always carry it over)."""
    if hasattr(faiss, "GpuParameterSpace") and type(index).__name__.startswith("Gpu"):
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", int(nprobe))
    else:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact k neighbours that the approximate search also found."""
    approx = np.asarray(approx)
    exact = np.asarray(exact)
    if approx.shape != exact.shape or exact.ndim != 2 or exact.size == 0:
        raise ValueError(f"recall needs two [Q, k] arrays of one shape; got {approx.shape} and {exact.shape}")
    hits = sum(len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact, strict=True))
    return hits / exact.size

