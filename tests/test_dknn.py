"""Deep kNN victims: conformal p-values on a hand-computed example, brute-force nonconformity,
the summed-vote variant and its tie rule."""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction

import pytest
import torch
from torch import Tensor, nn

from ask.errors import ConfigError
from ask.knn import DkNNClassifier, DkNNVoteClassifier, KNNClassifier, ReferenceStore

MISSING = (
    "victim 'dknn' needs a calibration split; set dataset.calib_per_class=N (e.g. 100) "
    "or use eval.victims=[dknn_vote]"
)


class SplitFeatureModel(nn.Module):
    """Stand-in for ask.models.FeatureModel: layer i is a fixed linear map of slice i of the input.

    With ``maps=None`` every layer is its slice itself, so pool and query features are written by
    hand as inputs.
    """

    def __init__(self, widths: Sequence[int], maps: Sequence[Tensor] | None = None) -> None:
        super().__init__()
        self.widths = list(widths)
        self.names = [f"l{i}" for i in range(len(widths))]
        self.maps = nn.ParameterList(
            [nn.Parameter(m.clone(), requires_grad=False) for m in maps] if maps is not None else []
        )
        self.forward_calls = 0
        self.modes: list[bool] = []

    def forward_features(self, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
        self.forward_calls += 1
        self.modes.append(self.training)
        out, lo = {}, 0
        for i, (name, width) in enumerate(zip(self.names, self.widths, strict=True)):
            part = x[:, lo : lo + width]
            out[name] = part @ self.maps[i] if len(self.maps) else part
            lo += width
        return {layer: out[layer] for layer in layers}


# ---------------------------------------------------------------------------- hand-computed example
#
# Two layers ("l0", "l1"), each a line: pool row i sits at position P0[i] on layer l0 and P1[i] on
# layer l1 (second coordinate 0), l2 metric, k = 3, nine pool points, three per class.
# A query at position m + 0.1 has the neighbours m, m+1, m-1 (nearest first), 1 <= m <= 7.
LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 2]
P0 = [0, 1, 2, 3, 4, 5, 6, 7, 8]  # labels by position on l0: 0 0 0 1 1 1 2 2 2
P1 = [3, 4, 8, 5, 6, 7, 0, 1, 2]  # labels by position on l1: 2 2 2 0 0 1 1 1 0
# Votes (class 0, 1, 2) of the window around m:
#   m:   1        2        3        4        5        6        7
#  l0: (3,0,0)  (2,1,0)  (1,2,0)  (0,3,0)  (0,2,1)  (0,1,2)  (0,0,3)
#  l1: (0,0,3)  (1,0,2)  (2,0,1)  (2,1,0)  (1,2,0)  (0,3,0)  (1,2,0)
# alpha(x, j) = 6 - (summed votes for j).
#
# Calibration (m0, m1, label) -> summed votes -> alpha(x_i, y_i):
CALIBRATION = [
    (1, 4, 0),  # (5,1,0) -> 1
    (2, 3, 0),  # (4,1,1) -> 2
    (4, 5, 1),  # (1,5,0) -> 1
    (5, 6, 1),  # (0,5,1) -> 1
    (7, 1, 2),  # (0,0,6) -> 0
    (6, 2, 2),  # (1,1,4) -> 2
    (3, 4, 2),  # (3,3,0) -> 6
    (5, 1, 1),  # (0,2,4) -> 4
]
A_SORTED = [0, 1, 1, 1, 2, 2, 4, 6]  # no 3 and no 5: alpha 3 and 4 share p = 2/8, 5 and 6 share 1/8
# |{a in A : a >= alpha}| / 8 for alpha = 0..6
P_OF_ALPHA = [Fraction(n, 8) for n in (8, 7, 4, 2, 2, 1, 1)]

# Queries (m0, m1) -> summed votes, alpha, prediction and why.
QUERIES = [
    ((1, 4), (1, 5, 6), 0),  # votes (5,1,0): clear winner
    ((2, 5), (3, 3, 6), 1),  # votes (3,3,0): tie in p and alpha; l1's nearest (position 5) is class 1
    ((5, 2), (5, 4, 3), 2),  # votes (1,2,3): p of classes 1 and 2 tie at 2/8; smaller alpha wins
    ((3, 2), (4, 4, 4), 2),  # votes (2,2,2): all tie; l1's nearest (position 2) is class 2
    ((7, 5), (5, 4, 3), 2),  # as the third, but l1's nearest (position 5) is class 1, the loser
]


def _line(positions: Sequence[int]) -> Tensor:
    return torch.tensor([[float(p), 0.0] for p in positions])


def _hand_store() -> ReferenceStore:
    return ReferenceStore(["l0", "l1"], "l2", 3, torch.tensor(LABELS), {"l0": _line(P0), "l1": _line(P1)})


def _hand_inputs(windows: Sequence[tuple[int, int]]) -> Tensor:
    return torch.tensor([[m0 + 0.1, 0.0, m1 + 0.1, 0.0] for m0, m1 in windows])


def _hand_dknn(batch_size: int = 256) -> tuple[DkNNClassifier, SplitFeatureModel]:
    model = SplitFeatureModel([2, 2])
    calib_x = _hand_inputs([(m0, m1) for m0, m1, _ in CALIBRATION])
    calib_y = torch.tensor([y for _, _, y in CALIBRATION])
    dknn = DkNNClassifier(model, _hand_store(), ["l0", "l1"], 3, calib_x, calib_y, batch_size=batch_size)
    return dknn, model


def test_hand_example_p_values_prediction_credibility_confidence() -> None:
    dknn, _ = _hand_dknn()
    assert dknn.calibration_scores.tolist() == A_SORTED
    x = _hand_inputs([q for q, _, _ in QUERIES])
    alpha = [list(a) for _, a, _ in QUERIES]
    assert dknn.nonconformity(x).tolist() == alpha

    expected_p = [[P_OF_ALPHA[a] for a in row] for row in alpha]
    p = dknn.p_values(x)
    assert p.dtype == torch.float32
    torch.testing.assert_close(
        p, torch.tensor([[float(f) for f in row] for row in expected_p]), rtol=0, atol=0
    )

    pred, credibility, confidence = dknn.predict_with_confidence(x)
    assert pred.tolist() == [y for _, _, y in QUERIES]
    # credibility = largest p; confidence = 1 - second largest p (exact fractions)
    cred = [max(row) for row in expected_p]
    conf = [1 - sorted(row)[-2] for row in expected_p]
    assert cred == [Fraction(7, 8)] + [Fraction(2, 8)] * 4
    assert conf == [Fraction(7, 8)] + [Fraction(6, 8)] * 4
    torch.testing.assert_close(credibility, torch.tensor([float(f) for f in cred]), rtol=0, atol=0)
    torch.testing.assert_close(confidence, torch.tensor([float(f) for f in conf]), rtol=0, atol=0)
    assert torch.equal(dknn.predict(x), pred)
    # A plain argmax of the p-values would pick class 0 for the second and class 1 for the third
    # and fifth queries: the tie rule is doing the work.
    assert p.argmax(1).tolist() == [0, 0, 1, 0, 1]


def test_hand_example_vote_variant() -> None:
    vote = DkNNVoteClassifier(SplitFeatureModel([2, 2]), _hand_store(), ["l0", "l1"], 3)
    x = _hand_inputs([q for q, _, _ in QUERIES])
    scores = vote.predict_scores(x)
    votes = [[6 - a for a in alpha] for _, alpha, _ in QUERIES]
    torch.testing.assert_close(scores, torch.tensor(votes, dtype=torch.float32) / 6)
    assert vote.predict(x).tolist() == [y for _, _, y in QUERIES]
    # Listing the layers the other way round makes l0 the deepest: its nearest neighbour then
    # decides the ties (position 2 on l0 is class 0, position 3 is class 1).
    flipped = DkNNVoteClassifier(SplitFeatureModel([2, 2]), _hand_store(), ["l1", "l0"], 3)
    assert flipped.predict(x).tolist() == [0, 0, 2, 1, 2]


def test_calibration_batches_and_model_state() -> None:
    dknn, model = _hand_dknn(batch_size=3)
    assert dknn.calibration_scores.tolist() == A_SORTED
    assert model.forward_calls == 3  # 8 calibration points in batches of 3: one pass per batch
    model.train()
    model.forward_calls, model.modes = 0, []
    dknn.predict_with_confidence(_hand_inputs([(1, 4), (2, 5)]))
    assert model.forward_calls == 1  # one forward pass serves both layers
    assert model.modes == [False] and model.training  # eval inside, training flag restored


def test_uint8_calibration_images_are_scaled() -> None:
    g = torch.Generator().manual_seed(3)
    model = SplitFeatureModel([3, 2])
    pool = torch.rand(40, 5, generator=g)
    store = ReferenceStore.build(model, pool, torch.arange(40) % 4, ["l0", "l1"], "cosine", 4, progress=False)
    calib = torch.randint(0, 256, (12, 5), dtype=torch.uint8, generator=g)
    labels = torch.arange(12) % 4
    as_uint8 = DkNNClassifier(model, store, ["l0", "l1"], 5, calib, labels)
    as_float = DkNNClassifier(model, store, ["l0", "l1"], 5, calib.float() / 255, labels)
    assert torch.equal(as_uint8.calibration_scores, as_float.calibration_scores)


# ---------------------------------------------------------------------------- brute force


def _brute_neighbor_labels(
    feats: list[Tensor], pool: list[Tensor], labels: Tensor, k: int, metric: str
) -> list[Tensor]:
    """Per layer, labels [B, k] of the k most similar pool points (float64, direct formulas)."""
    out = []
    for q, p in zip(feats, pool, strict=True):
        q, p = q.double(), p.double()
        if metric == "cosine":
            sim = (q / q.norm(dim=1, keepdim=True)) @ (p / p.norm(dim=1, keepdim=True)).T
        else:
            sim = -torch.cdist(q, p)
        out.append(labels[sim.argsort(dim=1, descending=True)[:, :k]])
    return out


def _random_setup(metric: str, classes: int, k: int, widths: Sequence[int], n_pool: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(w, w + 1, generator=g) for w in widths]
    model = SplitFeatureModel(widths, maps)
    layers = model.names
    pool_x = torch.randn(n_pool, sum(widths), generator=g)
    pool_y = torch.randint(0, classes, (n_pool,), generator=g)
    store = ReferenceStore.build(
        model, pool_x, pool_y, layers, metric, classes, batch_size=17, progress=False
    )
    with torch.no_grad():
        pool_feats = [f for f in model.forward_features(pool_x, layers).values()]
    return g, model, layers, store, pool_feats, pool_y


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_nonconformity_and_p_values_match_brute_force(metric: str) -> None:
    classes, k = 5, 4
    g, model, layers, store, pool_feats, pool_y = _random_setup(metric, classes, k, [4, 6, 3], 120, seed=1)
    calib_x = torch.randn(50, 13, generator=g)
    calib_y = torch.randint(0, classes, (50,), generator=g)
    dknn = DkNNClassifier(model, store, layers, k, calib_x, calib_y, batch_size=16)

    def brute_alpha(x: Tensor) -> Tensor:
        with torch.no_grad():
            feats = list(model.forward_features(x, layers).values())
        per_layer = _brute_neighbor_labels(feats, pool_feats, pool_y, k, metric)
        return torch.stack([sum((lab != j).sum(1) for lab in per_layer) for j in range(classes)], dim=1)

    a = brute_alpha(calib_x).gather(1, calib_y[:, None]).squeeze(1)
    assert torch.equal(dknn.calibration_scores, a.sort().values)

    x = torch.randn(30, 13, generator=g)
    alpha = brute_alpha(x)
    assert torch.equal(dknn.nonconformity(x), alpha)
    assert int(alpha.max()) <= len(layers) * k
    expected_p = (a[None, None, :] >= alpha[:, :, None]).double().mean(-1).float()
    torch.testing.assert_close(dknn.p_values(x), expected_p, rtol=0, atol=0)


def test_vote_variant_and_dknn_follow_the_documented_tie_rule() -> None:
    """Summed votes; ties to the first tied class in the deepest layer's list, then shallower ones.

    Many classes and a small k make ties frequent; the DkNN prediction (p, then nonconformity, then
    the vote rule) must agree with the vote variant everywhere.
    """
    classes, k = 7, 2
    g, model, layers, store, pool_feats, pool_y = _random_setup("l2", classes, k, [3, 3, 3], 60, seed=2)
    x = torch.randn(400, 9, generator=g)
    with torch.no_grad():
        feats = list(model.forward_features(x, layers).values())
    per_layer = _brute_neighbor_labels(feats, pool_feats, pool_y, k, "l2")
    counts = torch.stack([sum((lab == j).sum(1) for lab in per_layer) for j in range(classes)], dim=1)
    expected, fallbacks = [], 0
    for i in range(x.shape[0]):
        tied = set((counts[i] == counts[i].max()).nonzero().flatten().tolist())
        order = [c for lab in reversed(per_layer) for c in lab[i].tolist()]
        expected.append(next(c for c in order if c in tied))
        fallbacks += not tied & set(per_layer[-1][i].tolist())
    assert fallbacks > 0  # some ties were decided below the deepest layer

    vote = DkNNVoteClassifier(model, store, layers, k, batch_size=64)
    assert vote.predict(x).tolist() == expected
    torch.testing.assert_close(vote.predict_scores(x), counts.float() / (len(layers) * k))

    calib_x = torch.randn(40, 9, generator=g)
    dknn = DkNNClassifier(model, store, layers, k, calib_x, torch.randint(0, classes, (40,), generator=g))
    assert dknn.predict(x).tolist() == expected


def test_single_layer_vote_equals_knn() -> None:
    g, model, layers, store, _, _ = _random_setup("cosine", 6, 5, [4, 4], 80, seed=4)
    x = torch.randn(100, 8, generator=g)
    knn = KNNClassifier(model, store, "l1", 5)
    vote = DkNNVoteClassifier(model, store, ["l1"], 5)
    assert torch.equal(vote.predict(x), knn.predict(x))
    torch.testing.assert_close(vote.predict_scores(x), knn.predict_scores(x))


# ---------------------------------------------------------------------------- clusters and errors


def test_separated_clusters() -> None:
    g = torch.Generator().manual_seed(5)
    classes, dim = 4, 3
    base = torch.eye(classes, dim)
    base[3] = -1.0
    centres = torch.cat([base, base], dim=1) * 20.0  # far apart on both layers' slices
    maps = [torch.randn(dim, dim, generator=g) + 3 * torch.eye(dim) for _ in range(2)]
    model = SplitFeatureModel([dim, dim], maps)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n) % classes
        return centres[y] + 0.3 * torch.randn(n, dim * 2, generator=g), y

    pool_x, pool_y = sample(80)
    store = ReferenceStore.build(model, pool_x, pool_y, model.names, "l2", classes, progress=False)
    x, y = sample(24)
    vote = DkNNVoteClassifier(model, store, model.names, 5)
    assert torch.equal(vote.predict(x), y)
    torch.testing.assert_close(vote.predict_scores(x), nn.functional.one_hot(y, classes).float())

    calib_x, calib_y = sample(20)
    dknn = DkNNClassifier(model, store, model.names, 5, calib_x, calib_y)
    assert dknn.calibration_scores.tolist() == [0] * 20
    pred, credibility, confidence = dknn.predict_with_confidence(x)
    assert torch.equal(pred, y)
    assert torch.equal(credibility, torch.ones(24)) and torch.equal(confidence, torch.ones(24))
    # All neighbours share the true label: alpha = 0 there (p = 1) and L*k = 10 elsewhere, above
    # every calibration score (p = 0).
    assert torch.equal(dknn.p_values(x), nn.functional.one_hot(y, classes).float())


def test_missing_calibration_is_a_config_error() -> None:
    model = SplitFeatureModel([2, 2])
    store = _hand_store()
    x = _hand_inputs([(1, 1)])
    for images, labels in (
        (None, None),
        (x, None),
        (None, torch.tensor([0])),
        (x[:0], torch.tensor([], dtype=torch.int64)),
    ):
        with pytest.raises(ConfigError) as info:
            DkNNClassifier(model, store, ["l0", "l1"], 3, images, labels)
        assert str(info.value) == MISSING


def test_bad_arguments() -> None:
    model = SplitFeatureModel([2, 2])
    store = _hand_store()
    x = _hand_inputs([(1, 1), (2, 2)])
    with pytest.raises(ConfigError, match="not in the reference store"):
        DkNNVoteClassifier(model, store, ["l0", "block9"], 3)
    with pytest.raises(ConfigError, match="more than once"):
        DkNNVoteClassifier(model, store, ["l0", "l0"], 3)
    with pytest.raises(ConfigError, match="empty"):
        DkNNVoteClassifier(model, store, [], 3)
    with pytest.raises(ConfigError, match="knn.k=10"):
        DkNNClassifier(model, store, ["l0"], 10, x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="calibration labels"):
        DkNNClassifier(model, store, ["l0"], 3, x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 calibration images but 3 labels"):
        DkNNClassifier(model, store, ["l0"], 3, x, torch.tensor([0, 1, 2]))
