"""Reference pools at scale: chunked on-disk features, float16, IVF recall, cache safety, memory."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from ask.attacks.support import gather_pool
from ask.config.schema import KnnConfig
from ask.errors import ConfigError
from ask.knn import IndexSettings, ReferenceStore, store_cache_key
from ask.knn.synthetic import LAYER, SyntheticPool
from ask.utils.diskarrays import verify_dir
from tests.conftest import kill_when_it_prints, npy_data_offset, zero_in_place

REPO = Path(__file__).resolve().parents[1]


class LinearFeatures(nn.Module):
    """Images -> fixed random projection: a model with ``forward_features`` for ``build``."""

    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, d)
        self.calls = 0

    def forward_features(self, x: Tensor, layers: list[str]) -> dict[str, Tensor]:
        self.calls += x.shape[0]
        h = self.proj(x.flatten(1))
        return {"a": h, "b": torch.relu(h)[:, : h.shape[1] // 2]}


def _images(n: int = 300, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 5


def _pool_store(pool: SyntheticPool, chunk: int = 4096, cache_path: Path | None = None, cache_key: dict | None = None,
                **settings) -> ReferenceStore:
    return ReferenceStore.from_chunks(pool.chunks(chunk), pool.n, [LAYER], "cosine", pool.classes,
                                      cache_path=cache_path, cache_key=cache_key, settings=IndexSettings(**settings))


# ------------------------------------------------------------------ chunked = in memory


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_chunked_cache_gives_the_in_memory_neighbours(tmp_path, metric) -> None:
    model = LinearFeatures()
    images, labels = _images()
    key = store_cache_key("ck", ["a", "b"], metric, torch.arange(300), images.shape[1:])
    on_disk = ReferenceStore.build(model, images, labels, ["a", "b"], metric, 5, batch_size=7, progress=False,
                                   cache_path=tmp_path / "cache", cache_key=key)
    with torch.no_grad():
        direct = model.forward_features(images.float() / 255, ["a", "b"])
    in_memory = ReferenceStore(["a", "b"], metric, 5, labels, direct)
    assert isinstance(on_disk.features["a"], Tensor) and on_disk.mapped_layers  # memory-mapped, not loaded
    reloaded = ReferenceStore.build(model, images, labels, ["a", "b"], metric, 5, batch_size=7, progress=False,
                                    cache_path=tmp_path / "cache", cache_key=key)
    assert reloaded.from_cache and model.calls == 600  # the build and the direct call, not the reload
    queries = torch.randn(20, 24, generator=torch.Generator().manual_seed(1))
    for store in (on_disk, reloaded):
        torch.testing.assert_close(store.features["a"], direct["a"])
        s_ref, r_ref = in_memory.search("a", queries, 5)
        s, r = store.search("a", queries, 5)
        assert torch.equal(r, r_ref)
        torch.testing.assert_close(s, s_ref)
        s_ref, r_ref = in_memory.search_per_class("a", queries, 3)
        s, r = store.search_per_class("a", queries, 3)
        assert torch.equal(r, r_ref)
        torch.testing.assert_close(s, s_ref)
    # the exact chunked scan (recall's ground truth) agrees with faiss's flat search
    small_chunks = ReferenceStore(["a"], metric, 5, labels, {"a": direct["a"]})
    small_chunks.chunk_rows = lambda layer: 64  # several chunks: exercises the running top-k merge
    assert np.array_equal(small_chunks.indexes.exact_topk("a", queries, 5), in_memory.search("a", queries, 5)[1].numpy())


def test_float16_store_agrees_with_float32(tmp_path) -> None:
    pool = SyntheticPool(6000, 64, 20, seed=3)
    f32 = _pool_store(pool, cache_path=tmp_path / "f32", cache_key={"p": 1})
    f16 = _pool_store(pool, cache_path=tmp_path / "f16", cache_key={"p": 1}, feature_dtype="float16")
    assert f16.features[LAYER].dtype == torch.float16 and f16.feature_dtype == "float16"
    size = {name: (tmp_path / name / "features-0.npy").stat().st_size for name in ("f32", "f16")}
    assert size["f16"] < 0.51 * size["f32"]
    queries = torch.from_numpy(pool.queries(300))
    s32, r32 = f32.search(LAYER, queries, 5)
    s16, r16 = f16.search(LAYER, queries, 5)
    same = np.mean([len(set(a.tolist()) & set(b.tolist())) / 5 for a, b in zip(r32, r16, strict=True)])
    assert same >= 0.97, same
    torch.testing.assert_close(s16, s32, atol=2e-3, rtol=0)
    # consumers gather rows and get float32 back
    picked = gather_pool(f16, LAYER, r16[:4], like=torch.zeros(1))
    assert picked.dtype == torch.float32 and picked.shape == (4, 5, 64)
    assert f16.rows(LAYER, r16[:2]).dtype == torch.float32
    _, per_class = f16.search_per_class(LAYER, queries[:10], 3)
    assert per_class.shape == (10, 20, 3)


# ------------------------------------------------------------------ IVF


def test_ivf_recall_is_measured_and_nprobe_matters() -> None:
    clustered = SyntheticPool(20000, 32, 10, seed=0)
    uniform = SyntheticPool(20000, 32, 10, seed=0, clustered=False)
    recall = {}
    for name, pool in (("clustered", clustered), ("uniform", uniform)):
        queries = torch.from_numpy(pool.queries(200))
        for nprobe in (1, 4):
            store = _pool_store(pool, kind="ivf", nlist=64, nprobe=nprobe)
            recall[name, nprobe] = store.measure_recall(LAYER, 5, queries=queries)["recall_at_k"]
            report = store.index_report(k=5, n_queries=200)
            entry = report["layers"][LAYER]
            assert entry["kind"] == "ivf" and (entry["nlist"], entry["nprobe"]) == (64, nprobe)
            assert entry["protocol"].startswith("pool rows") and 0 < entry["recall_at_k"] <= 1
            assert report["index"] == "ivf" and report["n"] == 20000
            if name == "clustered" and nprobe == 4:
                assert entry["recall_at_k"] >= 0.9
                # searches go through the IVF index and stay sorted by exact similarity
                sims, rows = store.search(LAYER, queries, 5)
                assert (sims[:, :-1] >= sims[:, 1:]).all() and rows.min() >= 0
    assert recall["clustered", 4] >= 0.9, recall
    assert recall["clustered", 1] <= recall["clustered", 4] - 0.15, recall  # fails if nprobe were ignored
    assert recall["uniform", 4] <= recall["clustered", 4] - 0.3, recall


def test_ivf_falls_back_to_flat_where_it_would_scan_everything() -> None:
    pool = SyntheticPool(3000, 16, 6, seed=1)
    store = _pool_store(pool, kind="ivf", nprobe=32)  # 3000 points: at most 76 cells < 4 x 32
    entry = store.index_report(k=5)["layers"][LAYER]
    assert entry["kind"] == "flat" and "recall_at_k" not in entry and entry["per_class_ivf"] == 0
    flat = _pool_store(pool)
    queries = torch.from_numpy(pool.queries(50))
    assert torch.equal(store.search(LAYER, queries, 5)[1], flat.search(LAYER, queries, 5)[1])


def test_ivf_pads_missing_neighbours_with_exact_ones(monkeypatch) -> None:
    # 64 cells for 2,600 points of 2 dims: some cells hold fewer than k=40 points at nprobe=1
    pool = SyntheticPool(2600, 2, 2, seed=2, clustered=False)
    store = _pool_store(pool, kind="ivf", nlist=64, nprobe=1)
    padded = []
    exact = store.indexes.exact_topk
    monkeypatch.setattr(store.indexes, "exact_topk", lambda *a, **kw: padded.append(len(a[1])) or exact(*a, **kw))
    queries = torch.from_numpy(pool.queries(300))
    _, rows = store.search(LAYER, queries, 40)
    assert padded and 0 < padded[0] < 300  # only the short queries were answered exactly
    assert rows.min() >= 0 and all(len(set(r.tolist())) == 40 for r in rows)


# ------------------------------------------------------------------ cache safety


def test_stale_cache_is_rebuilt_not_reused(tmp_path, caplog) -> None:
    model = LinearFeatures()
    images, labels = _images()
    path = tmp_path / "features" / "pool"
    key = store_cache_key("ck1", ["a"], "cosine", torch.arange(300), images.shape[1:])
    kwargs = dict(progress=False, cache_path=path, batch_size=64)
    ReferenceStore.build(model, images, labels, ["a"], "cosine", 5, cache_key=key, **kwargs)
    assert model.calls == 300
    other = store_cache_key("ck2", ["a"], "cosine", torch.arange(300), images.shape[1:])
    with caplog.at_level(logging.WARNING, logger="ask.knn.cache"):
        rebuilt = ReferenceStore.build(model, images, labels, ["a"], "cosine", 5, cache_key=other, **kwargs)
    assert not rebuilt.from_cache and model.calls == 600 and "stale key" in caplog.text
    assert json.loads((path / "meta.json").read_text())["key"] == other
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ask.knn.cache"):  # another dtype is another cache
        f16 = ReferenceStore.build(model, images, labels, ["a"], "cosine", 5, cache_key=other,
                                   settings=IndexSettings(feature_dtype="float16"), **kwargs)
    assert not f16.from_cache and model.calls == 900 and "feature_dtype" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ask.knn.cache"):  # other labels: same key, other pool
        moved = ReferenceStore.build(model, images, labels.flip(0), ["a"], "cosine", 5, cache_key=other,
                                     settings=IndexSettings(feature_dtype="float16"), **kwargs)
    assert not moved.from_cache and model.calls == 1200 and "labels differ" in caplog.text
    assert [p.name for p in path.parent.iterdir()] == ["pool"]  # no temporaries or old copies left


def test_a_cache_changed_in_place_is_rebuilt_with_a_warning(tmp_path, caplog) -> None:
    model = LinearFeatures()
    images, labels = _images()
    path = tmp_path / "features" / "pool"
    key = store_cache_key("ck", ["a", "b"], "cosine", torch.arange(300), images.shape[1:])
    kwargs = dict(cache_key=key, progress=False, cache_path=path, batch_size=64)
    fresh = ReferenceStore.build(model, images, labels, ["a", "b"], "cosine", 5, **kwargs)
    expected = {layer: fresh.features[layer].clone() for layer in ("a", "b")}
    queries = expected["b"][:20] + 0.01
    neighbours = fresh.search("b", queries, 5)[1]
    del fresh
    assert ReferenceStore.build(model, images, labels, ["a", "b"], "cosine", 5, **kwargs).from_cache
    assert model.calls == 300

    features = path / "features-1.npy"  # layer b's rows: same size, same header, zeros
    zero_in_place(features, npy_data_offset(features))
    with caplog.at_level(logging.WARNING, logger="ask.knn.cache"):
        rebuilt = ReferenceStore.build(model, images, labels, ["a", "b"], "cosine", 5, **kwargs)
    assert (f"ignoring reference-feature cache {path}: its features-1.npy does not match the checksum recorded "
            "when it was written (changed or corrupted since); recomputing the features") in caplog.text
    assert not rebuilt.from_cache and model.calls == 600
    for layer in ("a", "b"):
        assert torch.equal(rebuilt.features[layer], expected[layer])
    assert torch.equal(rebuilt.search("b", queries, 5)[1], neighbours)
    assert ReferenceStore.build(model, images, labels, ["a", "b"], "cosine", 5, **kwargs).from_cache

    (path / "checksums.json").unlink()  # what a cache written without checksums looks like
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ask.knn.cache"):
        assert not ReferenceStore.build(model, images, labels, ["a", "b"], "cosine", 5, **kwargs).from_cache
    assert "its checksums.json is missing or unreadable" in caplog.text


def test_caches_above_the_content_limit_are_checked_by_size_and_time(tmp_path) -> None:
    pool = SyntheticPool(1000, 8, 4, seed=0)
    path = tmp_path / "pool"
    _pool_store(pool, cache_path=path, cache_key={"p": 1})
    features = path / "features-0.npy"
    assert verify_dir(path) is None and verify_dir(path, content_limit=0) is None
    written = features.stat()
    zero_in_place(features, npy_data_offset(features))
    assert "features-0.npy does not match the checksum" in verify_dir(path)
    assert "features-0.npy does not match the modification time" in verify_dir(path, content_limit=0)
    # Too large to read on every load, a file whose size and time were put back passes: the documented limit.
    os.utime(features, ns=(written.st_atime_ns, written.st_mtime_ns))
    assert verify_dir(path, content_limit=0) is None
    with open(features, "ab") as handle:
        handle.write(b"\0")
    assert f"features-0.npy has {written.st_size + 1} bytes, not the {written.st_size} written" in verify_dir(
        path, content_limit=0)


def test_partial_cache_is_never_read(tmp_path, caplog) -> None:
    pool = SyntheticPool(5000, 8, 4, seed=0)
    path = tmp_path / "pool"

    def dying_chunks():
        for i, chunk in enumerate(pool.chunks(1000)):
            if i == 3:
                raise KeyboardInterrupt  # the build is interrupted after three chunks
            yield chunk

    with pytest.raises(KeyboardInterrupt):
        ReferenceStore.from_chunks(dying_chunks(), 5000, [LAYER], "cosine", 4, cache_path=path, cache_key={"p": 1})
    assert list(tmp_path.iterdir()) == []  # neither a cache nor a temporary directory

    # A build killed with SIGKILL cannot clean up: its temporary directory stays, the cache never appears.
    script = textwrap.dedent(f"""
        import time
        from ask.knn.store import ReferenceStore
        from ask.knn.synthetic import SyntheticPool, LAYER
        pool = SyntheticPool(5000, 8, 4, seed=0)
        def slow():
            for i, chunk in enumerate(pool.chunks(1000)):
                if i == 2:
                    print("writing", flush=True)
                    time.sleep(60)
                yield chunk
        ReferenceStore.from_chunks(slow(), 5000, [LAYER], "cosine", 4, cache_path={str(path)!r}, cache_key={{"p": 1}})
    """)
    kill_when_it_prints(script, "writing")
    leftovers = list(tmp_path.iterdir())
    assert not path.exists() and len(leftovers) == 1 and leftovers[0].name.startswith(".pool.tmp-")
    assert ReferenceStore.load(path, {"p": 1}, [LAYER], "cosine", 4) is None

    # A directory at the cache path without its meta.json (e.g. copied half-way) is unreadable.
    path.mkdir()
    (path / "features-0.npy").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="ask.knn.cache"):
        assert ReferenceStore.load(path, {"p": 1}, [LAYER], "cosine", 4) is None
    assert "unreadable" in caplog.text
    path.rename(tmp_path / "junk")

    store = _pool_store(pool, chunk=1000, cache_path=path, cache_key={"p": 1})
    assert store.features[LAYER].shape == (5000, 8)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["junk", "pool"]  # the dead build's temporary directory was removed
    assert ReferenceStore.load(path, {"p": 1}, [LAYER], "cosine", 4).from_cache


# ------------------------------------------------------------------ memory


_MEMORY_WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from ask.knn.store import ReferenceStore
    from ask.knn.synthetic import SyntheticPool, LAYER

    from ask.utils.memory import status_mib as hwm

    n, d, mode, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    pool = SyntheticPool(n, d, 100)
    before = hwm()
    if mode == "chunked":
        store = ReferenceStore.from_chunks(pool.chunks(8192), n, [LAYER], "cosine", 100,
                                           cache_path=path, cache_key={"m": 1})
    else:  # what a whole-array build does: keep every batch, then concatenate
        parts = list(pool.chunks(8192))
        features = np.concatenate([f[LAYER] for f, _ in parts])
        labels = np.concatenate([y for _, y in parts])
        del parts
        store = ReferenceStore([LAYER], "cosine", 100, labels, {LAYER: features})
    assert len(store) == n
    print(hwm() - before)
""")


def _peak_delta_mib(mode: str, path: Path, n: int = 400_000, d: int = 64) -> float:
    proc = subprocess.run([sys.executable, "-c", _MEMORY_WORKER, str(n), str(d), mode, str(path)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for VmHWM")
def test_chunked_build_stays_under_a_memory_bound_that_a_whole_array_build_exceeds(tmp_path) -> None:
    features_mib = 400_000 * 64 * 4 / 2**20  # 98 MiB of float32 features
    bound = 48.0  # one 2 MiB chunk, its generation temporaries, 16 B per point of labels and indices
    chunked = _peak_delta_mib("chunked", tmp_path / "pool")
    assert chunked < bound, f"chunked build peaked {chunked:.0f} MiB above its start; bound {bound:.0f}"
    assert (tmp_path / "pool" / "features-0.npy").stat().st_size > features_mib * 2**20
    naive = _peak_delta_mib("naive", tmp_path / "unused")
    assert naive > features_mib > bound, f"a whole-array build peaked only {naive:.0f} MiB"


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize("field, value, fragment", [
    ("index", "hnsw", "knn.index='hnsw'"),
    ("nprobe", 0, "knn.nprobe=0"),
    ("nlist", 0, "knn.nlist=0"),
    ("feature_dtype", "int8", "knn.feature_dtype='int8'"),
])
def test_bad_index_settings_are_config_errors(field, value, fragment) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        KnnConfig(**{field: value})
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        IndexSettings(**{"kind" if field == "index" else field: value})


def test_knn_config_accepts_ivf_and_float16() -> None:
    cfg = KnnConfig(index="ivf", nlist=1024, nprobe=16, feature_dtype="float16")
    assert (cfg.index, cfg.nlist, cfg.nprobe, cfg.feature_dtype) == ("ivf", 1024, 16, "float16")


# ------------------------------------------------------------------ GPU


class _FakeGpuIndex:
    """Stands in for a faiss GPU index on a CPU machine: a separate copy that searches like the original."""

    def __init__(self, index) -> None:
        import faiss

        self.host = faiss.clone_index(index)

    def search(self, queries, k):
        return self.host.search(queries, k)


def test_a_gpu_index_is_not_kept_twice_and_comes_back_without_a_rebuild(monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    pool = SyntheticPool(6000, 16, 2, seed=0)
    store = _pool_store(pool, kind="ivf", nlist=64, nprobe=8)
    indexes = store.indexes
    builds, to_gpu, to_host = [], [], []
    build = indexes.build_cpu_index
    monkeypatch.setattr(indexes, "build_cpu_index", lambda *a: builds.append(a) or build(*a))
    monkeypatch.setattr(indexes, "gpu_device", lambda device: 0 if device.type == "cuda" else None)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, gpu, index: to_gpu.append(index) or _FakeGpuIndex(index),
                        raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda index: to_host.append(index) or faiss.clone_index(index.host),
                        raising=False)
    monkeypatch.setattr("ask.knn.search.set_nprobe", lambda index, nprobe: None)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    queries = torch.from_numpy(pool.queries(50))

    # The recall is measured on the host first, as ask-attack does before any attack.
    report = store.index_report(k=5)
    assert list(indexes.cached) == [(LAYER, None, None)] and len(builds) == 1
    on_gpu = indexes.index_for(LAYER, None, cuda, 5)
    assert isinstance(on_gpu, _FakeGpuIndex) and list(indexes.cached) == [(LAYER, None, 0)]
    # The metrics' second report reuses what it measured: no host copy comes back for it.
    assert store.index_report(k=5) == report and to_host == [] and list(indexes.cached) == [(LAYER, None, 0)]
    for c in range(2):  # per-class indexes: built on the host, cloned, and only the clone kept
        indexes.index_for(LAYER, c, cuda, 5)
    assert sorted(indexes.cached, key=str) == sorted([(LAYER, None, 0), (LAYER, 0, 0), (LAYER, 1, 0)], key=str)
    assert len(builds) == 3 and len(to_gpu) == 3

    # A CPU search afterwards copies the GPU index back instead of training IVF cells again.
    expected = on_gpu.search(indexes.faiss_queries(queries), 5)[1]
    host = indexes.index_for(LAYER, None, cpu, 5)
    assert to_host == [on_gpu] and len(builds) == 3
    assert np.array_equal(host.search(indexes.faiss_queries(queries), 5)[1], expected)




@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_ivf_index_matches_cpu() -> None:
    import faiss

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        pytest.skip("faiss has no GPU support in this build")
    pool = SyntheticPool(20000, 32, 10, seed=0)
    store = _pool_store(pool, kind="ivf", nlist=64, nprobe=4)
    queries = torch.from_numpy(pool.queries(200))
    _, cpu_rows = store.search(LAYER, queries, 5)
    sims, gpu_rows = store.search(LAYER, queries.cuda(), 5)
    assert gpu_rows.is_cuda and sims.is_cuda
    assert type(store.indexes.cached[(LAYER, None, torch.cuda.current_device())]).__name__.startswith("Gpu")
    assert (LAYER, None, None) not in store.indexes.cached  # the host copy went with the clone
    agree = (gpu_rows.cpu() == cpu_rows).float().mean().item()
    assert agree >= 0.95, agree
    start = time.perf_counter()
    store.search_per_class(LAYER, queries.cuda(), 3)
    assert time.perf_counter() - start < 60
