"""The kNN baseline attacks (DkNN, Adv-kNN, feature adversaries, minimum-norm) on cases with a known answer.

The stand-in "model" is the identity on a 2-pixel image (features = pixels), so the kNN lives in
the input space and the correct adversarial move is visible: a clean point of class 0 sits near
the boundary between two clusters and must be pushed across it, inside the ball and [0, 1].
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ask.attacks import ThreatModel, build_attack
from ask.attacks.advknn import AdvKNNAttack
from ask.attacks.dknn_attack import DkNNAttack
from ask.attacks.feature import FeatureAttack
from ask.attacks.minnorm import MinNormAttack
from ask.attacks.support import adam_minimise
from ask.errors import ConfigError
from ask.knn import IndexSettings, KNNClassifier, ReferenceStore

BASELINES = ["dknn", "advknn", "feature", "minnorm"]
LAYER = "pix"


class PixelModel(nn.Module):
    """forward_features = the flattened pixels (times a fixed scale); logits = a fixed linear map.

    The scale (a parameter with no gradient use) gives the model a device and lets a test check
    that no parameter gradient is written.
    """

    def __init__(self, num_classes: int = 2, dim: int = 2) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.head = nn.Linear(dim, num_classes)

    def forward_features(self, x, layers, with_logits=False):
        layers = [layers] if isinstance(layers, str) else list(layers)
        feats = x.flatten(1) * self.scale
        out = {LAYER: feats, "twice": 2 * feats}
        return {name: out[name] for name in layers}

    def forward(self, x):
        return self.head(x.flatten(1))


def two_clusters(metric: str = "l2", per_class: int = 30, seed: int = 0):
    """Class 0 around (0.25, 0.5), class 1 around (0.75, 0.5), on 1x1x2 'images'."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.tensor([[0.25, 0.5], [0.75, 0.5]])
    pts = torch.cat([centres[c] + 0.06 * torch.randn(per_class, 2, generator=gen) for c in range(2)])
    pts = pts.clamp(0, 1)
    labels = torch.arange(2).repeat_interleave(per_class)
    store = ReferenceStore([LAYER, "twice"], metric, 2, labels, {LAYER: pts, "twice": 2 * pts},
                           settings=IndexSettings(use_gpu=False))
    return store, pts, labels


def boundary_points() -> tuple[torch.Tensor, torch.Tensor]:
    """Class-0 points a little left of the midpoint, as 1x1x2 images."""
    x = torch.tensor([[0.42, 0.50], [0.40, 0.45], [0.43, 0.56], [0.38, 0.52]]).view(-1, 1, 1, 2)
    return x, torch.zeros(4, dtype=torch.long)


def make(name: str, threat: ThreatModel, store, model=None, **hyper):
    model = PixelModel() if model is None else model
    defaults = {
        "dknn": dict(m=10, a=1.0, lr=0.2, k=5),
        "advknn": dict(k=5, fit_steps=100, fit_lr=0.1),
        "feature": dict(),
        "minnorm": dict(m=10, c=0.1, lr=0.2, k=5),
    }[name]
    layers = hyper.pop("layers", [LAYER])
    defaults.update(hyper)
    return build_attack(name, model, threat, store=store, layers=layers,
                        generator=torch.Generator().manual_seed(0), **defaults)


def knn_labels(store, x, k: int = 5) -> torch.Tensor:
    return KNNClassifier(PixelModel(), store, LAYER, k).predict(x)


# ------------------------------------------------------------------------ every baseline


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_baseline_crosses_the_boundary_inside_the_ball(name, norm):
    store, _, _ = two_clusters()
    x, y = boundary_points()
    assert bool((knn_labels(store, x) == 0).all())  # clean points are correct
    eps = 0.25 if norm == "linf" else 0.35
    threat = ThreatModel(eps=eps, norm=norm, steps=30, step_size=eps / 8)
    model = PixelModel()
    attack = make(name, threat, store, model=model)
    x_adv = attack(x, y)
    assert bool((knn_labels(store, x_adv) == 1).all()), name
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert not x_adv.requires_grad
    assert all(p.grad is None for p in model.parameters())  # input gradients only


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_is_stopped_by_a_small_ball_and_returns_input_at_eps_zero(name):
    store, _, _ = two_clusters()
    x, y = boundary_points()
    out = make(name, ThreatModel(eps=0.0, steps=10), store)(x, y)
    assert torch.equal(out, x)
    # The nearest class-1 pool point is > 0.1 beyond the midpoint: a 0.02 ball cannot flip the vote.
    out = make(name, ThreatModel(eps=0.02, steps=10, step_size=0.005), store)(x, y)
    assert float((out - x).abs().max()) <= 0.02 + 1e-6
    assert bool((knn_labels(store, out) == 0).all())


@pytest.mark.parametrize("name", BASELINES)
def test_baseline_cosine_store_and_two_layers(name):
    # With cosine, features are directions: class 0 points along (1, 0.2), class 1 along (0.2, 1).
    gen = torch.Generator().manual_seed(3)
    a = torch.tensor([0.9, 0.2]) + 0.05 * torch.randn(20, 2, generator=gen)
    b = torch.tensor([0.2, 0.9]) + 0.05 * torch.randn(20, 2, generator=gen)
    pts = torch.cat([a, b]).clamp(0.01, 1)
    labels = torch.arange(2).repeat_interleave(20)
    store = ReferenceStore([LAYER, "twice"], "cosine", 2, labels, {LAYER: pts, "twice": 2 * pts},
                           settings=IndexSettings(use_gpu=False))
    x = torch.tensor([[0.6, 0.45], [0.55, 0.4]]).view(-1, 1, 1, 2)
    y = torch.zeros(2, dtype=torch.long)
    assert bool((knn_labels(store, x) == 0).all())
    threat = ThreatModel(eps=0.3, steps=30, step_size=0.04)
    # In 2-D, cosine distances to the k-th neighbour are tiny next to those across classes, so
    # the DkNN sigmoid needs a gentle slope here (high-dimensional features are far less extreme).
    extra = {"a": 0.05} if name == "dknn" else {}
    attack = make(name, threat, store, layers=[LAYER, "twice"], **extra)  # multi-layer sums too
    x_adv = attack(x, y)
    assert bool((knn_labels(store, x_adv) == 1).all())
    assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6


# -------------------------------------------------------------------------------- DkNN


def test_dknn_guides_pick_the_nearest_other_class_and_its_nearest_points():
    # Three classes: the clean point (class 0) is close to class 2 and far from class 1.
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.2, 0.2], [0.9, 0.9], [0.2, 0.6]])
    pts = torch.cat([centres[c] + 0.03 * torch.randn(12, 2, generator=gen) for c in range(3)]).clamp(0, 1)
    labels = torch.arange(3).repeat_interleave(12)
    store = ReferenceStore([LAYER], "l2", 3, labels, {LAYER: pts}, settings=IndexSettings(use_gpu=False))
    attack = DkNNAttack(PixelModel(3), ThreatModel(eps=0.1), store=store, layers=[LAYER], m=4, k=3)
    x = torch.tensor([[0.2, 0.35], [0.6, 0.75]]).view(-1, 1, 1, 2)
    y = torch.tensor([0, 2])
    targets, rows = attack.guides(x, y)
    assert targets.tolist() == [2, 1]
    for i, t in enumerate(targets.tolist()):
        cls_rows = torch.nonzero(labels == t).flatten()
        d = (pts[cls_rows] - x[i].flatten()).norm(dim=1)
        want = cls_rows[d.argsort()[:4]]
        assert sorted(rows[i].tolist()) == sorted(want.tolist())
    # eta: the mean distance from a pool point to its 3rd nearest *other* pool point, brute force.
    dist = torch.cdist(pts, pts)
    dist.fill_diagonal_(math.inf)
    want_eta = float(dist.sort(dim=1).values[:, 2].mean())
    assert attack.thresholds()[LAYER] == pytest.approx(want_eta, rel=1e-4)


def test_dknn_loss_decreases_and_keep_best_returns_lowest_loss():
    store, pts, _ = two_clusters()
    x, y = boundary_points()
    threat = ThreatModel(eps=0.25, steps=15, random_start=False)
    # lr=1: Adam overshoots, so the last iterate is not the lowest-loss one for every point.
    attack = make("dknn", threat, store, keep_best=True, lr=1.0)
    x_adv = attack(x, y)
    trace = attack.last_result.objective  # minus the loss
    assert trace.shape == (16, 4)
    assert float(trace[-1].mean()) > float(trace[0].mean())
    best = trace.max(dim=0)
    assert bool((best.indices < 15).any())
    # The returned point's loss, by brute force: the mean sigmoid of its distance to the m guide
    # points over eta (a = 1), equals the best value of the trace.
    _, rows = attack.guides(x, y)
    distance = (pts[rows] - x_adv.flatten(1)[:, None, :]).norm(dim=2)
    loss = torch.sigmoid(distance / attack.thresholds()[LAYER] - 1.0).mean(dim=1)
    torch.testing.assert_close(-loss, best.values, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ Adv-kNN


def test_advknn_head_agrees_with_the_leave_one_out_vote():
    store, pts, labels = two_clusters(per_class=40)
    attack = make("advknn", ThreatModel(eps=0.1), store)
    head = attack.heads()[LAYER]
    rows = torch.arange(len(labels))
    loo = attack.votes(LAYER, pts, exclude=rows)
    # Leave-one-out by brute force: the 5 nearest other points.
    dist = torch.cdist(pts, pts)
    dist.fill_diagonal_(math.inf)
    nearest = dist.argsort(dim=1)[:, :5]
    want = torch.stack([torch.bincount(labels[r], minlength=2) for r in nearest]).float() / 5
    torch.testing.assert_close(loo, want)
    with torch.no_grad():
        agree = (head(pts).argmax(1) == loo.argmax(1)).float().mean()
    assert float(agree) > 0.9
    assert attack.fit_agreement[LAYER] > 0.9


def test_advknn_fit_equals_the_plain_full_batch_loop():
    # The fit standardises the pool once; a loop that runs the whole head at every step, as the
    # method reads, must end at the very same weights.
    import torch.nn.functional as F

    from ask.attacks.advknn import VoteHead
    from ask.knn.similarity import l2_normalize

    store, pts, labels = two_clusters(metric="cosine", per_class=40)
    attack = make("advknn", ThreatModel(eps=0.1), store, fit_steps=25, weight_decay=0.01)
    fitted = attack.heads()[LAYER]

    rows = torch.arange(len(labels))
    target = attack.votes(LAYER, pts, exclude=rows)
    basis = l2_normalize(pts)
    std = basis.std(dim=0)
    head = VoteHead(basis.mean(dim=0), torch.where(std > 1e-8, std, torch.ones_like(std)), 2, True)
    optimiser = torch.optim.Adam(head.linear.parameters(), lr=0.1)
    for _ in range(25):
        optimiser.zero_grad()
        loss = F.kl_div(head(pts), target, reduction="batchmean") + 0.01 * head.linear.weight.pow(2).sum()
        loss.backward()
        optimiser.step()
    assert torch.equal(fitted.linear.weight, head.linear.weight.detach())
    assert torch.equal(fitted.linear.bias, head.linear.bias.detach())
    assert float(fitted.linear.weight.abs().max()) > 0.1  # the loop did move the weights


def test_fitted_parts_use_only_the_pool():
    # The fit happens before any evaluated point is seen, and attacking different points leaves
    # it unchanged: the heads and thresholds are functions of the store alone.
    store, _, _ = two_clusters()
    threat = ThreatModel(eps=0.2, steps=3)
    x, y = boundary_points()
    other = torch.rand(5, 1, 1, 2, generator=torch.Generator().manual_seed(7))

    adv_a, adv_b = make("advknn", threat, store), make("advknn", threat, store)
    fitted = {k: v.clone() for k, v in adv_a.heads()[LAYER].state_dict().items()}  # no points yet
    adv_a(x, y)
    adv_b(other, torch.ones(5, dtype=torch.long))
    for key, value in fitted.items():
        torch.testing.assert_close(adv_a.heads()[LAYER].state_dict()[key], value)
        torch.testing.assert_close(adv_b.heads()[LAYER].state_dict()[key], value)

    dknn_a, dknn_b = make("dknn", threat, store), make("dknn", threat, store)
    eta = dict(dknn_a.thresholds())
    dknn_a(x, y)
    dknn_b(other, torch.ones(5, dtype=torch.long))
    assert dknn_a.thresholds() == eta == dknn_b.thresholds()


# ------------------------------------------------------------------------ feature / minnorm


def test_feature_guide_is_the_nearest_other_class_pool_point():
    store, pts, labels = two_clusters()
    x, y = boundary_points()
    attack = make("feature", ThreatModel(eps=0.1), store)
    rows = attack.guides(x, y)
    cls1 = torch.nonzero(labels == 1).flatten()
    want = cls1[torch.cdist(x.flatten(1), pts[cls1]).argmin(dim=1)]
    assert rows.tolist() == want.tolist()
    # The attack moves each point towards its guide.
    x_adv = make("feature", ThreatModel(eps=0.1, steps=10, step_size=0.02), store)(x, y)
    before = (x.flatten(1) - pts[want]).norm(dim=1)
    after = (x_adv.flatten(1) - pts[want]).norm(dim=1)
    assert bool((after < before - 0.05).all())


def test_minnorm_returns_a_small_successful_perturbation():
    store, _, _ = two_clusters()
    x, y = boundary_points()
    threat = ThreatModel(eps=0.3, norm="l2", steps=40)
    attack = make("minnorm", threat, store, c=1.0)
    x_adv = attack(x, y)
    assert bool((knn_labels(store, x_adv) == 1).all())
    # Smaller than the full ball: the norm penalty and the smallest-success rule both bite.
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) < 0.3 - 0.02
    guide_rows, signs, radius2 = attack.setup(x, y)
    assert guide_rows.shape == (4, 10) and int((signs < 0).sum()) == 20
    # Same-class guides first (class 0 rows), then the other class.
    assert bool((store.labels[guide_rows[:, :5]] == 0).all() and (store.labels[guide_rows[:, 5:]] == 1).all())


class EarlyLiarUnderAutocast(PixelModel):
    """Under autocast, bf16 features; the first ``lies`` of those passes are shifted across the
    boundary (a stand-in for bf16 rounding that claims a success the float32 victim denies)."""

    def __init__(self, lies: int) -> None:
        super().__init__()
        self.lies = lies

    def forward_features(self, x, layers, with_logits=False):
        out = super().forward_features(x, layers)
        if not torch.is_autocast_enabled("cpu"):
            return out
        shift = 0.0
        if self.lies > 0:
            self.lies -= 1
            shift = 0.3
        return {name: (f + shift * torch.tensor([1.0, 0.0]) * (2 if name == "twice" else 1)).to(torch.bfloat16)
                for name, f in out.items()}


def test_minnorm_keeps_only_successes_the_float32_victim_confirms():
    """Under bf16 autocast a success is confirmed on float32 features before it is kept: the early
    false claims (tiny perturbations) are dropped, and every returned point fools the victim."""
    from ask.utils import precision

    store, _, _ = two_clusters()
    x, y = boundary_points()
    threat = ThreatModel(eps=0.3, norm="l2", steps=40)
    model = EarlyLiarUnderAutocast(lies=4)  # the clean pass of setup() and the first three steps
    attack = make("minnorm", threat, store, model=model, c=1.0)
    with precision.autocast(torch.device("cpu"), torch.bfloat16):
        x_adv = attack(x, y)
    assert model.lies == 0
    assert bool((knn_labels(store, x_adv) == 1).all())
    assert float((x_adv - x).flatten(1).norm(dim=1).min()) > 0.05  # not one of the lied-about iterates


def test_smallest_success_skips_only_lookups_that_could_not_change_it():
    # Against the plain rule (ask about every point at every iterate): the same iterates kept,
    # with fewer questions. Iterates wander in size; "fooled" is a fixed function of the iterate.
    from ask.attacks.minnorm import SmallestSuccess

    gen = torch.Generator().manual_seed(3)
    x_clean = torch.rand(64, 1, 2, 2, generator=gen)
    direction = torch.randn(64, 1, 2, 2, generator=gen)
    iterates = [x_clean + (0.05 * t + 0.1 * torch.rand(64, 1, 1, 1, generator=gen)) * direction for t in range(12)]

    robust = torch.arange(64) % 4 == 0  # a quarter of the points are never fooled

    def fooled_all(x: torch.Tensor) -> torch.Tensor:
        return (torch.sin(40 * x.flatten(1).sum(1)) > 0.3) & ~robust

    plain_best, plain_norm = x_clean.clone(), torch.full((64,), math.inf)
    plain_found = torch.zeros(64, dtype=torch.bool)
    smallest = SmallestSuccess(x_clean)
    for x in iterates:
        size = (x - x_clean).flatten(1).norm(dim=1)
        success = fooled_all(x)
        better = success & (size < plain_norm)
        plain_norm = torch.where(better, size, plain_norm)
        plain_found |= success
        plain_best = torch.where(better.view(-1, 1, 1, 1), x, plain_best)
        smallest.update(x, lambda points, x=x: fooled_all(x)[points])
    fallback = iterates[-1]
    assert torch.equal(smallest.result(fallback), torch.where(plain_found.view(-1, 1, 1, 1), plain_best, fallback))
    assert 0.5 < float(plain_found.float().mean()) <= 0.75
    assert not torch.equal(plain_best[~robust], x_clean[~robust])
    assert smallest.lookups < 0.8 * 64 * len(iterates)


# ----------------------------------------------------------------------- shared machinery


def test_adam_minimise_reaches_a_known_optimum_on_both_balls():
    x = torch.full((2, 1, 2, 2), 0.5)
    target = torch.tensor([[0.9, 0.1, 0.5, 0.55], [0.0, 1.0, 0.6, 0.45]]).view(2, 1, 2, 2)

    def loss_fn(z, _):
        return (z - target).flatten(1).pow(2).sum(1)

    res = adam_minimise(loss_fn, x, torch.zeros(2), ThreatModel(eps=0.2, steps=150), lr=0.1)
    want = target.clamp(0.3, 0.7)  # the L-inf projection of the target
    torch.testing.assert_close(res.adversarial, want, atol=2e-3, rtol=0)
    res = adam_minimise(loss_fn, x, torch.zeros(2), ThreatModel(eps=0.2, norm="l2", steps=150), lr=0.1)
    d = (target - x).flatten(1)
    want = x + (0.2 * d / d.norm(dim=1, keepdim=True)).view_as(x)
    torch.testing.assert_close(res.adversarial, want, atol=5e-3, rtol=0)
    assert not res.zero_grad.any() and not res.nonfinite.any()


def test_build_attack_lists_every_attack_and_checks_hyperparameters():
    store, _, _ = two_clusters()
    with pytest.raises(ConfigError) as err:
        build_attack("nope", PixelModel(), ThreatModel(eps=0.1))
    for name in ["ask", "pgd", *BASELINES]:
        assert name in str(err.value)
    threat = ThreatModel(eps=0.1)
    assert isinstance(make("dknn", threat, store), DkNNAttack)
    assert isinstance(make("advknn", threat, store), AdvKNNAttack)
    assert isinstance(make("feature", threat, store), FeatureAttack)
    assert isinstance(make("minnorm", threat, store), MinNormAttack)
    with pytest.raises(ConfigError, match="reference store"):
        build_attack("dknn", PixelModel(), threat, layers=[LAYER])
    with pytest.raises(ConfigError, match="m=31"):
        make("dknn", threat, store, m=31)
    with pytest.raises(ConfigError, match="block9"):
        build_attack("feature", PixelModel(), threat, store=store, layers=["block9"])
    with pytest.raises(ConfigError, match="smoothing"):
        make("advknn", threat, store, smoothing=0)
    with pytest.raises(ConfigError, match="kl"):
        make("advknn", threat, store, kl="sideways")
    with pytest.raises(ConfigError, match="lr"):
        make("minnorm", threat, store, lr=-1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", BASELINES)
def test_baselines_run_on_the_model_device_and_return_on_the_input_device(name):
    store, _, _ = two_clusters()
    x, y = boundary_points()
    model = PixelModel().cuda()
    attack = make(name, ThreatModel(eps=0.25, steps=30, step_size=0.03), store, model=model)
    x_adv = attack(x, y)  # CPU inputs, CUDA model
    assert x_adv.device == x.device
    assert bool((knn_labels(store, x_adv) == 1).all())
    x_adv_gpu = attack(x.cuda(), y.cuda())
    assert x_adv_gpu.is_cuda
    assert float((x_adv_gpu.cpu() - x).abs().max()) <= 0.25 + 1e-6
