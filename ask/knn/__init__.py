"""Reference pools, exact faiss search and kNN victims on deep features."""

from ask.knn.dknn import DkNNClassifier, DkNNVoteClassifier
from ask.knn.similarity import METRICS, l2_normalize, pairwise_similarity, rowwise_similarity, safe_norm
from ask.knn.store import ReferenceStore, store_cache_key, tensor_digest
from ask.knn.victims import KNNClassifier, vote

__all__ = [
    "METRICS",
    "KNNClassifier",
    "ReferenceStore",
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
