"""Reference store, exact search, similarities and the kNN vote, checked against brute force."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from ask.errors import ConfigError, ModelError
from ask.knn import (
    KNNClassifier,
    ReferenceStore,
    flatten_features,
    pairwise_similarity,
    rowwise_similarity,
    safe_norm,
    store_cache_key,
    tensor_digest,
    unit_dots,
    vote,
)

METRICS = ("cosine", "l2")


class TinyFeatureModel(nn.Module):
    """Stand-in for ask.models.FeatureModel: fixed random conv -> ReLU -> pool -> linear."""

    def __init__(self, num_classes: int = 4, channels: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(channels, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, num_classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.num_classes = num_classes
        self.calls = 0  # images seen by forward_features, to prove a cache hit computes nothing

    def check_layers(self, layers: Sequence[str]) -> None:
        unknown = [layer for layer in layers if layer not in ("block1", "logits")]
        if unknown:
            raise ModelError(f"unknown layers {unknown}")

    def forward_features(
        self, x: Tensor, layers: Sequence[str], with_logits: bool = False
    ) -> dict[str, Tensor]:
        self.calls += x.shape[0]
        h = nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        logits = self.fc(h.flatten(1))
        out = {"block1": h, "logits": logits}
        selected = {layer: out[layer] for layer in layers}
        if with_logits:
            selected["logits"] = logits
        return selected

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x, ["logits"])["logits"]


def brute_similarity(a: Tensor, b: Tensor, metric: str) -> Tensor:
    """Direct float64 formulas: cosine as a·b/(|a||b|), l2 as minus the norm of the difference."""
    a, b = a.double(), b.double()
    if metric == "cosine":
        return (a @ b.T) / (a.norm(dim=1, keepdim=True) * b.norm(dim=1).unsqueeze(0))
    return -(a[:, None, :] - b[None, :, :]).norm(dim=-1)


def random_store(metric: str, n: int = 300, d: int = 16, classes: int = 4, seed: int = 0) -> ReferenceStore:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n, d, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    return ReferenceStore(["f"], metric, classes, labels, {"f": feats}, torch.arange(n) * 3)


# ---------------------------------------------------------------------------- similarities


@pytest.mark.parametrize("metric", METRICS)
def test_similarities_match_direct_formulas(metric: str) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 12, generator=g), torch.randn(20, 12, generator=g)
    expected = brute_similarity(a, b, metric).float()
    torch.testing.assert_close(pairwise_similarity(a, b, metric), expected, atol=1e-5, rtol=1e-5)
    refs = torch.randn(7, 5, 12, generator=g)
    rows = rowwise_similarity(a, refs, metric)
    for i in range(7):
        torch.testing.assert_close(
            rows[i], brute_similarity(a[i : i + 1], refs[i], metric)[0].float(), atol=1e-5, rtol=1e-5
        )


def test_cosine_is_scale_invariant_and_l2_sign() -> None:
    a = torch.tensor([[3.0, 4.0]])
    b = torch.tensor([[6.0, 8.0], [0.0, 1.0], [3.0, 4.0]])
    torch.testing.assert_close(pairwise_similarity(a, b, "cosine"), torch.tensor([[1.0, 0.8, 1.0]]))
    # |(3,4)-(6,8)| = 5, |(3,4)-(0,1)| = sqrt(18); the guarded sqrt at distance 0 is ~0, not NaN
    torch.testing.assert_close(
        pairwise_similarity(a, b, "l2"), torch.tensor([[-5.0, -(18**0.5), 0.0]]), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("metric", METRICS)
def test_zero_vectors_give_finite_values_and_gradients(metric: str) -> None:
    a = torch.zeros(3, 8, requires_grad=True)  # all-zero features, as after ReLU + pooling
    b = torch.cat([torch.zeros(1, 8), torch.randn(4, 8)]).requires_grad_(True)
    refs = torch.stack([torch.zeros(2, 8), torch.randn(2, 8), torch.zeros(2, 8)]).requires_grad_(True)
    pair = pairwise_similarity(a, b, metric)
    row = rowwise_similarity(a, refs, metric)
    assert torch.isfinite(pair).all() and torch.isfinite(row).all()
    if metric == "cosine":
        assert torch.equal(pair, torch.zeros_like(pair)) and torch.equal(row, torch.zeros_like(row))
    else:
        torch.testing.assert_close(pair[:, 1:], -b[1:].detach().norm(dim=1).expand(3, 4))
        assert pair[:, 0].abs().max() < 1e-6  # distance 0 between two zero vectors
    (pair.sum() + row.sum()).backward()
    for t in (a, b, refs):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    # the same point as query and reference: distance 0 must not poison the gradient either
    x = torch.randn(2, 8, requires_grad=True)
    rowwise_similarity(x, x.detach().unsqueeze(1), metric).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("shared", [False, True], ids=["per-example", "shared"])
def test_unit_dots_equals_autograd_through_safe_norm(shared: bool) -> None:
    """The hand-written backward against autograd's, in float64, with a zero row and one under the guard."""
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    a[1] = 0.0
    a[2] = 1e-10  # |a| below the guard: the norm is the constant guard, as in safe_norm
    b = torch.randn(*(() if shared else (5,)), 4, 7, generator=gen, dtype=torch.float64)
    weights = torch.randn(5, 4, generator=gen, dtype=torch.float64)

    def value_and_grads(fn):
        a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        out = fn(a_, b_)
        return (out, *torch.autograd.grad((out * weights).sum(), (a_, b_)))

    def direct(a_, b_):
        dots = a_ @ b_.T if shared else torch.einsum("bd,bcd->bc", a_, b_)
        return dots / safe_norm(a_, dim=1, keepdim=True)

    for got, want in zip(value_and_grads(unit_dots), value_and_grads(direct), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(unit_dots, (a[[0, 3, 4]].clone().requires_grad_(True),
                                                (b if shared else b[[0, 3, 4]]).clone().requires_grad_(True)))


def test_unit_dots_refuses_a_second_derivative_and_bad_shapes() -> None:
    a = torch.randn(3, 4, requires_grad=True)
    (grad,) = torch.autograd.grad(unit_dots(a, torch.randn(2, 4)).square().sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|twice"):
        grad.sum().backward()
    with pytest.raises(ValueError, match="unit_dots needs"):
        unit_dots(a, torch.randn(2, 3, 4))  # per-example rows for 2 examples, not 3


@pytest.mark.parametrize("channels_last", [False, True])
def test_flatten_features_keeps_the_values_and_the_gradient_layout(channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    features = torch.randn(3, 4, 5, 6, generator=gen)
    if channels_last:
        features = features.contiguous(memory_format=torch.channels_last)
    weights = torch.randn(3, 120, generator=gen)
    got_in, plain_in = features.clone().requires_grad_(True), features.clone().requires_grad_(True)
    got, plain = flatten_features(got_in), plain_in.flatten(1)
    assert torch.equal(got, plain)  # C, H, W order whatever the layout
    (grad,) = torch.autograd.grad((got * weights).sum(), got_in)
    (want,) = torch.autograd.grad((plain * weights).sum(), plain_in)
    assert torch.equal(grad, want)
    # the gradient comes back in the layout of the features it flows into
    assert grad.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if channels_last:  # where plain flatten does not
        assert not want.is_contiguous(memory_format=torch.channels_last)


def test_unknown_metric_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="knn.metric"):
        pairwise_similarity(torch.ones(1, 2), torch.ones(1, 2), "dot")
    with pytest.raises(ConfigError):
        ReferenceStore(["f"], "manhattan", 2, torch.zeros(2), {"f": torch.ones(2, 3)})


# ---------------------------------------------------------------------------- search


def _assert_topk_matches(
    sims: Tensor, rows: Tensor, queries: Tensor, base: Tensor, base_rows: Tensor, metric: str, k: int
) -> None:
    """faiss top-k against a float64 brute force over ``base`` (whose global rows are ``base_rows``)."""
    full = brute_similarity(queries, base, metric)  # [B, n]
    top = full.topk(k, dim=1)
    torch.testing.assert_close(sims.double(), top.values, atol=1e-5, rtol=1e-5)
    # similarities of the rows returned, recomputed by brute force, are the ones reported
    pos = {int(r): i for i, r in enumerate(base_rows)}
    local = torch.tensor([[pos[int(r)] for r in row] for row in rows])
    torch.testing.assert_close(full.gather(1, local), sims.double(), atol=1e-5, rtol=1e-5)
    assert (sims[:, :-1] >= sims[:, 1:]).all(), "not sorted most similar first"
    # same index sets wherever the k-th and (k+1)-th similarity are not (numerically) tied
    ordered = full.sort(dim=1, descending=True).values
    for i in range(queries.shape[0]):
        if k < full.shape[1] and ordered[i, k - 1] - ordered[i, k] < 1e-5:
            continue
        assert set(local[i].tolist()) == set(top.indices[i].tolist())


@pytest.mark.parametrize("metric", METRICS)
def test_search_equals_brute_force(metric: str) -> None:
    store = random_store(metric)
    queries = torch.randn(25, 16, generator=torch.Generator().manual_seed(5))
    sims, rows = store.search("f", queries, 7)
    assert sims.shape == rows.shape == (25, 7) and rows.dtype == torch.int64
    _assert_topk_matches(sims, rows, queries, store.features["f"], torch.arange(len(store)), metric, 7)
    # a pool point as its own query comes back first, at similarity 1 (cosine) or distance 0 (l2)
    s0, r0 = store.search("f", store.features["f"][[4, 9]], 1)
    assert r0[:, 0].tolist() == [4, 9]
    torch.testing.assert_close(
        s0[:, 0], torch.full((2,), 1.0 if metric == "cosine" else 0.0), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("metric", METRICS)
def test_search_per_class_equals_brute_force(metric: str) -> None:
    store = random_store(metric)
    queries = torch.randn(10, 16, generator=torch.Generator().manual_seed(6))
    sims, rows = store.search_per_class("f", queries, 5)
    assert sims.shape == rows.shape == (10, 4, 5)
    for c in range(4):
        assert (store.labels[rows[:, c]] == c).all()
        members = torch.nonzero(store.labels == c).flatten()
        _assert_topk_matches(
            sims[:, c], rows[:, c], queries, store.features["f"][members], members, metric, 5
        )
    # indexes are built once and reused
    n_indexes = len(store.indexes.cached)
    store.search_per_class("f", queries[:2], 3)
    assert len(store.indexes.cached) == n_indexes == 4


@pytest.mark.parametrize("metric", METRICS)
def test_shared_searches_give_the_same_neighbours_with_one_faiss_search(metric: str, monkeypatch) -> None:
    store = random_store(metric, n=400)
    calls: list[int] = []
    faiss_search = store.indexes.faiss_search

    def counted(index, layer, cls, q, k):
        calls.append(k)
        return faiss_search(index, layer, cls, q, k)

    # 25 queries take faiss's BLAS path, 5 its direct one.
    for n_queries in (25, 5):
        queries = torch.randn(n_queries, 16, generator=torch.Generator().manual_seed(n_queries))
        other = torch.randn(n_queries, 16, generator=torch.Generator().manual_seed(99))
        ks = (1, 5, 12, 16, 20)  # 20 is deeper than the block's depth of 16
        alone = {k: store.search("f", queries, k) for k in ks}
        alone_per_class = {k: store.search_per_class("f", queries, k) for k in ks}
        alone_other = store.search("f", other, 5)
        monkeypatch.setattr(store.indexes, "faiss_search", counted)
        calls.clear()
        with store.shared_searches(depth=16):
            for k in ks:
                for got, want in ((store.search("f", queries, k), alone[k]),
                                  (store.search_per_class("f", queries, k), alone_per_class[k])):
                    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), k
            got = store.search("f", other, 5)  # other queries are not answered with the first ones'
            assert torch.equal(got[1], alone_other[1])
        # Whole pool: depth 16 once, then 20; per class (4 indexes): the same; the other queries once.
        assert calls == [16, 16, 16, 16, 16, 20, 20, 20, 20, 20, 16]
        monkeypatch.undo()
        # After the block nothing is remembered.
        assert not store.indexes.sharing and torch.equal(store.search("f", queries, 5)[1], alone[5][1])


def test_zero_features_in_pool_and_queries_are_searchable() -> None:
    feats = torch.randn(20, 6, generator=torch.Generator().manual_seed(2)).relu()
    feats[3] = 0.0
    store = ReferenceStore(["f"], "cosine", 2, torch.arange(20) % 2, {"f": feats})
    sims, rows = store.search("f", torch.zeros(2, 6), 4)
    assert torch.isfinite(sims).all() and torch.equal(sims, torch.zeros_like(sims))
    sims, rows = store.search("f", feats[:1], 20)
    assert rows[0, 0] == 0 and sims[0, -1] == 0.0 and 3 in rows[0].tolist()


def test_k_too_large_is_a_config_error() -> None:
    labels = torch.tensor([0] * 6 + [1] * 4 + [2] * 4 + [3] * 2)
    store = ReferenceStore(["f"], "l2", 4, labels, {"f": torch.randn(16, 3)})
    q = torch.randn(2, 3)
    with pytest.raises(ConfigError) as err:
        store.search_per_class("f", q, 5)
    assert (
        str(err.value)
        == "knn.k=5 but class 3 has only 2 reference points; lower knn.k or raise knn.pool_per_class"
    )
    with pytest.raises(ConfigError, match=r"knn.k=17 but the reference pool has only 16 points"):
        store.search("f", q, 17)
    assert store.search_per_class("f", q, 2)[1].shape == (2, 4, 2)
    with pytest.raises(ConfigError, match="not in the reference store"):
        store.search("block9", q, 1)
    with pytest.raises(ModelError, match="has 3"):
        store.search("f", torch.randn(2, 4), 1)


# ---------------------------------------------------------------------------- vote


def test_vote_majority_and_ties_to_the_nearest() -> None:
    labels = torch.tensor(
        [
            [2, 1, 1, 0, 2],  # tie 2 vs 1 at two votes; 2 is nearest -> 2
            [1, 2, 2, 1, 0],  # tie 1 vs 2; 1 is nearest -> 1
            [0, 3, 3, 3, 1],  # clear majority 3 despite nearest being 0
            [3, 0, 1, 2, 3],  # 3 has two votes -> 3
            [3, 1, 0, 2, 1],  # 1 has two votes; the nearest (3) has one -> 1
            [2, 0, 1, 3, 0],  # 0 has two -> 0
        ]
    )
    pred, frac = vote(labels, num_classes=5)
    assert pred.tolist() == [2, 1, 3, 3, 1, 0]
    expected = torch.tensor(
        [
            [0.2, 0.4, 0.4, 0.0, 0.0],
            [0.2, 0.4, 0.4, 0.0, 0.0],
            [0.2, 0.2, 0.0, 0.6, 0.0],
            [0.2, 0.2, 0.2, 0.4, 0.0],
            [0.2, 0.4, 0.2, 0.2, 0.0],
            [0.4, 0.2, 0.2, 0.2, 0.0],
        ]
    )
    torch.testing.assert_close(frac, expected)
    # all k distinct: every class tied at one vote, the nearest wins
    assert vote(torch.tensor([[3, 0, 1]]), 4)[0].tolist() == [3]
    assert vote(torch.tensor([[1]]), 2)[0].tolist() == [1]


# ---------------------------------------------------------------------------- build and cache


def _images(n: int = 40, seed: int = 3) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 4


def test_build_matches_direct_features_and_restores_training_flag() -> None:
    model = TinyFeatureModel()
    model.train()
    images, labels = _images()
    store = ReferenceStore.build(
        model, images, labels, ["block1", "logits"], "cosine", 4, batch_size=7, progress=False
    )
    assert model.training and not store.from_cache
    with torch.no_grad():
        direct = model.forward_features(images.float() / 255, ["block1", "logits"])
    torch.testing.assert_close(store.features["block1"], direct["block1"].flatten(1))
    torch.testing.assert_close(store.features["logits"], direct["logits"])
    assert store.features["block1"].shape == (40, 96) and store.features["block1"].dtype == torch.float32
    assert torch.equal(store.pool_indices, torch.arange(40)) and store.labels.dtype == torch.int64
    # float input in [0, 1] gives the same features as uint8
    store_f = ReferenceStore.build(
        model, images.float() / 255, labels, ["block1"], "cosine", 4, progress=False
    )
    torch.testing.assert_close(store_f.features["block1"], store.features["block1"])
    with pytest.raises(ModelError):
        ReferenceStore.build(model, images, labels, ["block7"], "cosine", 4, progress=False)


def test_cache_round_trip_and_invalidation(tmp_path, caplog) -> None:
    model = TinyFeatureModel()
    images, labels = _images()
    pool = torch.arange(40) + 100
    path = tmp_path / "sub" / "store.pt"
    key = store_cache_key("abc123", ["block1"], "l2", pool, images.shape[1:])
    kwargs = dict(pool_indices=pool, cache_path=path, progress=False, batch_size=16)

    first = ReferenceStore.build(model, images, labels, ["block1"], "l2", 4, cache_key=key, **kwargs)
    assert not first.from_cache and path.exists() and model.calls == 40

    second = ReferenceStore.build(model, images, labels, ["block1"], "l2", 4, cache_key=key, **kwargs)
    assert second.from_cache and model.calls == 40  # nothing recomputed
    assert torch.equal(second.features["block1"], first.features["block1"])
    assert torch.equal(second.pool_indices, pool) and torch.equal(second.labels, labels)

    other = store_cache_key("def456", ["block1"], "l2", pool, images.shape[1:])
    assert other != key
    with caplog.at_level(logging.WARNING, logger="ask.knn.cache"):
        third = ReferenceStore.build(model, images, labels, ["block1"], "l2", 4, cache_key=other, **kwargs)
    assert not third.from_cache and model.calls == 80
    assert "another model" in caplog.text

    # the cache now holds the new key; truncating its feature file forces a rebuild with a warning
    feature_file = path / "features-0.npy"
    data = feature_file.read_bytes()
    feature_file.write_bytes(data[: len(data) // 2])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ask.knn.cache"):
        fourth = ReferenceStore.build(model, images, labels, ["block1"], "l2", 4, cache_key=other, **kwargs)
    assert not fourth.from_cache and model.calls == 120
    assert f"its features-0.npy has {len(data) // 2} bytes, not the {len(data)} written" in caplog.text
    torch.testing.assert_close(fourth.features["block1"], first.features["block1"])
    # and the rebuilt file is good again
    assert ReferenceStore.build(
        model, images, labels, ["block1"], "l2", 4, cache_key=other, **kwargs
    ).from_cache


def test_cache_key_and_digest() -> None:
    pool = torch.arange(10)
    key = store_cache_key(
        "ck", ("a", "b"), "cosine", pool, torch.Size([3, 8, 8]), extra={"dataset": "digits"}
    )
    assert key == store_cache_key(
        "ck", ["a", "b"], "cosine", pool.clone(), [3, 8, 8], extra={"dataset": "digits"}
    )
    assert key != store_cache_key(
        "ck", ["a", "b"], "cosine", pool.flip(0), [3, 8, 8], extra={"dataset": "digits"}
    )
    assert key["image_shape"] == [3, 8, 8] and isinstance(key["pool"], str)
    assert tensor_digest(torch.tensor([1, 2])) != tensor_digest(torch.tensor([1, 2], dtype=torch.int32))
    assert tensor_digest(torch.tensor([1.0, 2.0])) == tensor_digest(torch.tensor([1.0, 2.0]))
    assert tensor_digest(torch.tensor([1.0, 2.0])) != tensor_digest(torch.tensor([1.0, 2.5]))


# ---------------------------------------------------------------------------- classifier


class ClusterModel(nn.Module):
    """Identity features: the images themselves are the (well-separated) features."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def check_layers(self, layers: Sequence[str]) -> None:
        pass

    def forward_features(
        self, x: Tensor, layers: Sequence[str], with_logits: bool = False
    ) -> dict[str, Tensor]:
        return {layer: x * self.scale for layer in layers}


@pytest.mark.parametrize("metric", METRICS)
def test_knn_classifier_on_separated_clusters(metric: str) -> None:
    g = torch.Generator().manual_seed(4)
    centres = torch.eye(3, 12) * 0.6 + 0.2  # three directions, distinct for cosine and l2

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n) % 3
        x = (centres[y] + 0.03 * torch.randn(n, 12, generator=g)).clamp(0, 1)
        return x.reshape(n, 1, 3, 4), y

    pool_x, pool_y = sample(60)
    model = ClusterModel()
    store = ReferenceStore.build(model, pool_x, pool_y, ["feat"], metric, 3, progress=False)
    knn = KNNClassifier(model, store, "feat", k=5)
    test_x, test_y = sample(30)
    assert torch.equal(knn.predict(test_x), test_y)
    scores = knn.predict_scores(test_x)
    assert scores.shape == (30, 3)
    torch.testing.assert_close(scores.sum(1), torch.ones(30))
    assert (scores.gather(1, test_y[:, None]) == 1.0).all()  # every neighbour from the right cluster
    with pytest.raises(ConfigError, match="knn.k=61"):
        KNNClassifier(model, store, "feat", k=61)
