"""Reference pools (chunked on disk), exact or IVF faiss search and kNN victims on deep features."""

from ask.knn.dknn import DkNNClassifier, DkNNVoteClassifier
from ask.knn.similarity import METRICS, l2_normalize, pairwise_similarity, rowwise_similarity, safe_norm
from ask.knn.store import ReferenceStore, check_index_settings, store_cache_key, tensor_digest
from ask.knn.victims import KNNClassifier, vote

__all__ = [
    "METRICS",
    "KNNClassifier",
    "ReferenceStore",
    "check_index_settings",
    "l2_normalize",
    "pairwise_similarity",
    "rowwise_similarity",
    "safe_norm",
    "store_cache_key",
    "tensor_digest",
    "vote",
    "DkNNClassifier",
    "DkNNVoteClassifier",
]
