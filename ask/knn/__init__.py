"""Reference pools (chunked on disk), exact or IVF faiss search and kNN victims on deep features."""

from ask.knn.cache import store_cache_key, tensor_digest
from ask.knn.dknn import DkNNClassifier, DkNNVoteClassifier
from ask.knn.indexes import IndexSettings
from ask.knn.similarity import (
    METRICS,
    flatten_features,
    l2_normalize,
    pairwise_similarity,
    rowwise_similarity,
    safe_norm,
    unit_dots,
)
from ask.knn.store import EXACT_SEARCH, ReferenceStore
from ask.knn.victims import KNNClassifier, vote

__all__ = [
    "EXACT_SEARCH",
    "METRICS",
    "IndexSettings",
    "KNNClassifier",
    "ReferenceStore",
    "flatten_features",
    "l2_normalize",
    "pairwise_similarity",
    "rowwise_similarity",
    "safe_norm",
    "store_cache_key",
    "tensor_digest",
    "unit_dots",
    "vote",
    "DkNNClassifier",
    "DkNNVoteClassifier",
]
