"""Names and choices that several packages must agree on (schema, attacks, kNN store, evaluation, reports), stated once.

Torch-free, so the schema (read before any heavy import) and the numeric code share one source.
"""

NORMS = ("linf", "l2")  # threat-model norms
METRICS = ("cosine", "l2")  # kNN similarity: cosine, or minus the Euclidean distance
VICTIMS = ("dnn", "knn", "dknn", "dknn_vote")
ASK_KINDS = ("instance", "class")  # the ASK loss: per reference, or per class (the authors')
INDEX_KINDS = ("flat", "ivf")  # faiss index: exact, or inverted file (approximate)
FEATURE_DTYPES = ("float32", "float16")  # how reference features are stored
AMP_SETTINGS = ("auto", "bf16", "off")  # train.amp / eval.amp; what each means: ask.utils.precision

#: The ``attack`` of the per-victim worst-case rows that evaluation writes and reports read
#: (no registered attack has this name).
ANY_ATTACK = "any"
