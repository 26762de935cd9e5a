"""Console scripts (``ask-train``, ``ask-attack``, ``ask-report``).

Every console script imports this package first, before anything imports torch, so this is where
``CUBLAS_WORKSPACE_CONFIG`` is set (unless the user set it): cuBLAS reads it once, when the
process's first GEMM creates its handle, so ``deterministic=true`` cannot take effect if the
variable only appears later, in :func:`ask.utils.runtime.seed_everything` (which still sets it,
for library callers that never pass through here).
"""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
