"""Reference-store scale benchmark: chunked build, flat and IVF indexes, on a synthetic pool.

    python scripts/bench_store.py                              # 1,000,000 x 512, float32 and float16
    python scripts/bench_store.py --points 2000000 --dtype float16
    python scripts/bench_store.py --points 200000 --quick      # a smoke run in well under a minute

The pool is :class:`ask.knn.synthetic.SyntheticPool` (seeded clustered Gaussians with a low
intrinsic dimension, like deep features, so an IVF index's recall means something), generated
chunk by chunk and never held whole. Every measurement runs in a fresh subprocess so that peak
resident sizes (``VmHWM`` from ``/proc/self/status``) do not mix:

* build: :meth:`ReferenceStore.from_chunks` into a cache directory: wall time (generation of the
  synthetic data excluded and reported apart), bytes on disk, and the peak RSS above the
  process's peak before the build (imports, the pool's class centres).
* flat: load the cache, build the exact index, answer ``--queries`` held-out queries with k=5
  (``store.search``: faiss, then the exact re-rank); the answers are the ground truth for IVF.
* ivf: the same with ``index="ivf"``, plus recall@k on the held-out queries against the flat
  answers and the store's own :meth:`ReferenceStore.index_report` recall on pool rows.

Memory bound (checked; exit status 1 if exceeded): the build's peak RSS above its pre-build peak
stays below ``--bound-mib`` (default 256 MiB) at any N up to a few million: it holds one chunk
(plus generation temporaries), the int64 labels and pool indices (16 B per point) and nothing
else. A naive build (all features in one float32 array) needs N x D x 4 bytes: 3.8 GiB at
2,000,000 x 512, twice that while concatenating per-batch outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ask.utils.memory import status_mib

_MIB = 1 << 20


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ workers
def worker_build(a: argparse.Namespace) -> dict[str, Any]:
    from ask.knn import IndexSettings, ReferenceStore
    from ask.knn.synthetic import LAYER, SyntheticPool

    pool = SyntheticPool(a.points, a.dim, a.classes, seed=a.seed)
    before = status_mib("VmHWM")
    cache = Path(a.scratch) / f"cache-{a.dtype}"
    gen_s = 0.0

    def timed_chunks():
        nonlocal gen_s
        it = pool.chunks(a.chunk)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            gen_s += time.perf_counter() - t
            yield item

    start = time.perf_counter()
    store = ReferenceStore.from_chunks(timed_chunks(), a.points, [LAYER], "cosine", a.classes,
                                       cache_path=cache, cache_key={"bench": a.seed},
                                       settings=IndexSettings(feature_dtype=a.dtype))
    total = time.perf_counter() - start
    peak = status_mib("VmHWM")
    assert len(store) == a.points
    return {"build_s": total - gen_s, "generate_s": gen_s, "disk_bytes": _dir_bytes(cache),
            "pre_build_peak_mib": before, "build_peak_mib": peak, "build_peak_delta_mib": peak - before}


def _load(a: argparse.Namespace, index: str) -> Any:
    from ask.knn import IndexSettings, ReferenceStore
    from ask.knn.synthetic import LAYER

    store = ReferenceStore.load(Path(a.scratch) / f"cache-{a.dtype}", {"bench": a.seed}, [LAYER], "cosine",
                                a.classes, settings=IndexSettings(kind=index, nlist=a.nlist, nprobe=a.nprobe,
                                                                  feature_dtype=a.dtype))
    if store is None:
        raise RuntimeError("the build step's cache could not be loaded")
    return store


def worker_index(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from ask.knn.indexes import recall_at_k
    from ask.knn.synthetic import LAYER, SyntheticPool

    torch.set_num_threads(a.threads)
    queries = torch.from_numpy(SyntheticPool(a.points, a.dim, a.classes, seed=a.seed).queries(a.queries))
    store = _load(a, a.index)
    before = status_mib("VmHWM")
    rss_before = status_mib("VmRSS")
    t = time.perf_counter()
    store.search(LAYER, queries[:1], a.k)  # builds the index
    index_s = time.perf_counter() - t
    index_rss = status_mib("VmRSS") - rss_before
    t = time.perf_counter()
    _, rows = store.search(LAYER, queries, a.k)
    search_s = time.perf_counter() - t
    out = {"index_s": index_s, "index_rss_mib": index_rss, "search_qps": len(queries) / search_s,
           "peak_delta_mib": status_mib("VmHWM") - before, "info": store.indexes.info(LAYER)}
    truth = Path(a.scratch) / f"exact-{a.dtype}.npy"
    if a.index == "flat":
        np.save(truth, rows.numpy())
    else:
        exact = np.load(truth)
        out["recall_heldout"] = recall_at_k(rows.numpy(), exact)
        if out["info"]["kind"] == "ivf":  # how recall moves with nprobe, on the same index
            from ask.knn.indexes import set_nprobe

            index = store.indexes.cached[(LAYER, None, None)]
            for nprobe in a.nprobe_sweep:
                set_nprobe(index, nprobe)
                _, found = index.search(store.indexes.faiss_queries(queries), a.k)
                out[f"recall_heldout_nprobe{nprobe}"] = recall_at_k(found, exact)
            set_nprobe(index, a.nprobe)
        if a.report_queries:
            t = time.perf_counter()
            report = store.index_report(k=a.k, n_queries=a.report_queries)["layers"][LAYER]
            out["recall_pool_rows"] = report.get("recall_at_k")
            out["report_s"] = time.perf_counter() - t
    return out


WORKERS = {"build": worker_build, "index": worker_index}


# ------------------------------------------------------------------------------ driver
def _run_worker(args: argparse.Namespace, step: str, **extra: Any) -> dict[str, Any]:
    argv = [sys.executable, __file__, "--worker", step]
    for name, value in {**vars(args), **extra}.items():
        if name in ("worker", "dtype", "json", "keep", "skip_ivf", "quick", "bound_mib"):
            continue
        if isinstance(value, list):
            argv += [f"--{name.replace('_', '-')}", *map(str, value)]
        elif value is not None:
            argv += [f"--{name.replace('_', '-')}", str(value)]
    argv += ["--dtype", extra.get("dtype", args.dtype[0])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dtype", nargs="+", default=["float32", "float16"], choices=["float32", "float16"])
    parser.add_argument("--chunk", type=int, default=16384, help="rows per generated chunk")
    parser.add_argument("--nlist", type=int, default=None, help="IVF cells (default: about 4 sqrt(N))")
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries for throughput and recall")
    parser.add_argument("--report-queries", type=int, default=200,
                        help="pool-row queries of store.index_report (0: skip)")
    parser.add_argument("--nprobe-sweep", type=int, nargs="*", default=[1, 8],
                        help="also report IVF held-out recall at these nprobe")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bound-mib", type=float, default=256.0, help="build peak-RSS bound above the pre-build peak")
    parser.add_argument("--skip-ivf", action="store_true")
    parser.add_argument("--quick", action="store_true", help="200,000 x 128 unless given")
    parser.add_argument("--scratch", default=None, help="directory for the caches (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--index", default="flat", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        args.dtype = args.dtype[0]
        print(json.dumps(WORKERS[args.worker](args)))
        return 0

    if args.quick and "--points" not in sys.argv:
        args.points, args.dim = 200_000, 128
    import tempfile

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_store-"))
    scratch.mkdir(parents=True, exist_ok=True)
    args.scratch = str(scratch)
    millions = args.points / 1e6
    rows, results, failed = [], [], False
    try:
        for dtype in args.dtype:
            build = _run_worker(args, "build", dtype=dtype)
            flat = _run_worker(args, "index", dtype=dtype, index="flat")
            ivf = None if args.skip_ivf else _run_worker(args, "index", dtype=dtype, index="ivf")
            shutil.rmtree(scratch / f"cache-{dtype}", ignore_errors=True)
            ok = build["build_peak_delta_mib"] <= args.bound_mib
            failed |= not ok
            results.append({"dtype": dtype, "build": build, "flat": flat, "ivf": ivf, "bound_ok": ok})
            ivf_cells = "" if ivf is None else f"{ivf['info'].get('nlist', '-')}/{ivf['info'].get('nprobe', '-')}"
            rows.append([
                f"{args.points:,} x {args.dim}", dtype,
                f"{build['build_s'] / millions:.1f}", f"{build['generate_s'] / millions:.1f}",
                f"{build['disk_bytes'] / _MIB / millions:.0f}",
                f"{build['build_peak_delta_mib']:.0f} ({'ok' if ok else 'OVER'})",
                f"{flat['index_s'] / millions:.1f}", f"{flat['index_rss_mib'] / millions:.0f}",
                f"{flat['search_qps']:.0f}",
                "-" if ivf is None else f"{ivf['index_s'] / millions:.1f}",
                "-" if ivf is None else f"{ivf['index_rss_mib'] / millions:.0f}",
                "-" if ivf is None else f"{ivf['search_qps']:.0f}",
                ivf_cells or "-",
                "-" if ivf is None else f"{ivf['recall_heldout']:.3f}",
                "-" if ivf is None or ivf.get("recall_pool_rows") is None else f"{ivf['recall_pool_rows']:.3f}",
                "-" if ivf is None else ", ".join(
                    f"{p}: {ivf[f'recall_heldout_nprobe{p}']:.3f}" for p in args.nprobe_sweep
                    if f"recall_heldout_nprobe{p}" in ivf) or "-",
            ])
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    header = ["pool", "dtype", "build s/M", "synth gen s/M", "disk MiB/M", "build peak RSS +MiB",
              "flat index s/M", "flat index MiB/M", f"flat q/s (k={args.k})", "ivf index s/M",
              "ivf index MiB/M", "ivf q/s", "nlist/nprobe", f"ivf recall@{args.k} held-out",
              f"ivf recall@{args.k} pool rows", "held-out recall at nprobe"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    naive = args.points * args.dim * 4 / _MIB
    print(f"\nbound: build peak RSS <= {args.bound_mib:.0f} MiB above the pre-build peak; a naive float32 build "
          f"holds {naive:,.0f} MiB of features ({2 * naive:,.0f} MiB while concatenating). threads={args.threads}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    if failed:
        print("FAILED: the chunked build exceeded the memory bound", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
