"""The installed faiss build: imported from whichever package provides it, and its GPU index trusted
only after a self-test in a child process.

faiss comes as ``faiss-cpu`` (the ``cpu`` extra) or a GPU build (``faiss-gpu-cu12``, the ``gpu``
extra, or conda's ``faiss-gpu``), all providing the one module ``faiss``. Two of them installed
side by side overwrite each other's files, which breaks the GPU resources in ways that show only
at search time; that is said once, with the fix.

A GPU build without kernels for the GPU at hand (PyPI's ``faiss-gpu-cu12`` stops at compute
capability 8.9, so Hopper and newer have none) does not raise: a faiss assertion aborts the whole
process from C++, past any Python ``try``. So before the first GPU index, a child process builds
one, searches it and compares the answer with the CPU's; if the child dies, hangs or disagrees,
searches stay on faiss's CPU index and one line says why and what to install.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import re
import signal
import subprocess
import sys

from ask.errors import DependencyError

# faiss's loader logs at INFO which CPU build it tried and why one failed: four lines in every run's
# output (before a one-line error too) that say nothing about the run. Its warnings still show.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

try:
    import faiss
except ImportError:
    raise DependencyError(
        "faiss is not installed; install ask with one of its faiss extras: pip install 'ask-knn[cpu]' "
        "(faiss-cpu) or 'ask-knn[gpu]' (faiss-gpu-cu12; README, 'GPU')"
    ) from None

log = logging.getLogger(__name__)

__all__ = ["faiss", "faiss_distributions", "gpu_index_problem", "probe_problem"]

# A faiss GPU build's first kernel launch can JIT-compile PTX for a newer GPU: minutes, not hours.
PROBE_TIMEOUT_S = 300

# Builds the same kind of index the store clones to the GPU (flat inner product), searches it, and
# compares with the CPU's answer: a build without kernels for this GPU aborts or answers wrongly.
GPU_SELF_TEST = """
import sys
import numpy as np
import faiss
device = int(sys.argv[1])
rng = np.random.default_rng(0)
pool = rng.standard_normal((2048, 64)).astype("float32")
queries = rng.standard_normal((32, 64)).astype("float32")
cpu = faiss.IndexFlatIP(64)
cpu.add(pool)
gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), device, cpu)
_, expected = cpu.search(queries, 8)
_, found = gpu.search(queries, 8)
if not np.array_equal(expected, found):
    print("its neighbours differ from the CPU index's", file=sys.stderr)
    sys.exit(3)
"""

_FIX = ("install a faiss GPU build with kernels for this GPU (README, 'GPU'), or set knn.use_gpu=false "
        "to silence this")


def faiss_distributions() -> list[str]:
    """The installed packages that provide the ``faiss`` module (faiss-cpu, faiss-gpu-cu12, ...)."""
    names = {(dist.metadata["Name"] or "").lower() for dist in importlib.metadata.distributions()}
    return sorted(name for name in names if re.fullmatch(r"faiss(-cpu|-gpu.*)", name))


def _cuda_major_of(distribution: str) -> int | None:
    """The CUDA major version a pip faiss GPU build is for, from its name (faiss-gpu-cu12 -> 12)."""
    found = re.search(r"-cu(\d+)$", distribution)
    return int(found.group(1)) if found else None


def probe_problem(code: str, device: int, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Run ``code`` (with the device number as its argument) in a child Python; None when it exits 0,
    else what went wrong, in words."""
    try:
        done = subprocess.run([sys.executable, "-c", code, str(device)], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"its self-test did not finish within {timeout_s:g} s"
    if done.returncode == 0:
        return None
    last = next((line.strip() for line in reversed(done.stderr.splitlines()) if line.strip()), "")
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        cause = f"its self-test was killed by {name}"
    else:
        cause = f"its self-test failed (exit status {done.returncode})"
    detail = last if len(last) <= 200 else last[:197] + "..."
    return f"{cause}: {detail}" if detail else cause


@functools.cache
def gpu_index_problem(device: int) -> str | None:
    """Why faiss's GPU index must not be used on CUDA device ``device``, or None when it passed its
    self-test. Tested once per process and device; the problem is logged once."""
    installed = faiss_distributions()
    if len(installed) > 1:
        log.warning("several faiss builds are installed (%s) and overwrite each other's files; keep one: "
                    "pip uninstall -y %s, then pip install the one you want", ", ".join(installed),
                    " ".join(installed))
    import torch

    torch_major = int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None
    for distribution in installed:
        faiss_major = _cuda_major_of(distribution)
        if faiss_major is not None and torch_major is not None and faiss_major != torch_major:
            log.warning("%s is built for CUDA %d and torch for CUDA %d: both runtimes load side by side, "
                        "which needs a driver for CUDA %d; a torch build for CUDA %d avoids it (README, 'GPU')",
                        distribution, faiss_major, torch_major, max(faiss_major, torch_major), faiss_major)
    problem = probe_problem(GPU_SELF_TEST, device)
    if problem is not None:
        log.warning("faiss's GPU index is not usable on cuda:%d (%s); kNN searches use faiss's CPU index "
                    "instead; %s", device, problem, _FIX)
    return problem
