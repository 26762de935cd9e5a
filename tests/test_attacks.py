"""Attacks: the ball, the shared ascent loop, the ASK loss against direct formulas, PGD and ASK-Atk."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ask.attacks import (
    ATTACKS,
    ASKAttack,
    Attack,
    PGDAttack,
    ThreatModel,
    ascent_step,
    ask_loss,
    available_attacks,
    build_attack,
    multi_layer_ask_loss,
    pgd_maximise,
    project,
    random_init,
)
from ask.errors import ConfigError, DataError

# --------------------------------------------------------------------------------- fixtures


class TinyNet(nn.Module):
    """Bias-free ReLU net with named layers (all-zero images give all-zero features)."""

    def __init__(self, num_classes: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8 * 2 * 2, num_classes, bias=False)
        nn.init.normal_(self.head.weight, std=3.0)  # logits far from uniform, so CE reacts to eps
        self.num_classes = num_classes

    def forward_features(self, x, layers, with_logits=False):
        layers = [layers] if isinstance(layers, str) else list(layers)
        out = {}
        h1 = F.relu(self.conv1(x))
        out["block1"] = h1
        h2 = F.avg_pool2d(F.relu(self.bn(self.conv2(h1))), 4)
        out["block2"] = h2
        if with_logits:
            layers.append("logits")
        out["logits"] = self.head(h2.flatten(1))
        return {name: out[name] for name in layers}

    def forward(self, x):
        return self.forward_features(x, ["logits"])["logits"]


def direct_sim(a: torch.Tensor, b: torch.Tensor, metric: str) -> float:
    if metric == "cosine":
        na, nb = a.norm(), b.norm()
        if na == 0 or nb == 0:
            return 0.0
        return float(a @ b / (na * nb))
    return -float((a - b).norm())


class BruteStore:
    """Stand-in ReferenceStore: exact per-class search by brute force."""

    def __init__(self, features: dict, labels: torch.Tensor, num_classes: int, metric: str) -> None:
        self.features = {k: v.detach().float().cpu() for k, v in features.items()}
        self.labels = labels.cpu().long()
        self.num_classes = num_classes
        self.metric = metric
        self.calls = 0

    def search_per_class(self, layer, queries, k):
        self.calls += 1
        pool = self.features[layer]
        q = queries.detach().flatten(1).cpu().float()
        b = q.shape[0]
        sims = torch.empty(b, self.num_classes, k)
        idx = torch.empty(b, self.num_classes, k, dtype=torch.long)
        for i in range(b):
            for c in range(self.num_classes):
                rows = torch.nonzero(self.labels == c).flatten()
                s = torch.tensor([direct_sim(q[i], pool[r], self.metric) for r in rows])
                top = torch.topk(s, k)
                sims[i, c], idx[i, c] = top.values, rows[top.indices]
        return sims, idx


def make_setup(metric: str = "cosine", num_classes: int = 3, per_class: int = 6, batch: int = 6):
    gen = torch.Generator().manual_seed(1)
    model = TinyNet(num_classes).eval()
    pool_x = torch.rand(num_classes * per_class, 3, 8, 8, generator=gen)
    pool_y = torch.arange(num_classes).repeat_interleave(per_class)
    with torch.no_grad():
        feats = model.forward_features(pool_x, ["block1", "block2"])
    store = BruteStore({k: v.flatten(1) for k, v in feats.items()}, pool_y, num_classes, metric)
    x = torch.rand(batch, 3, 8, 8, generator=gen)
    y = torch.arange(batch) % num_classes
    return model, store, x, y


# -------------------------------------------------------------------------- the ASK loss


def direct_ask_loss(feats, refs, labels, metric, temperature, kind, self_feats=None):
    """Loop-by-loop formula of SPEC's ASK loss, float64, no tricks."""
    batch, num_classes, k, _ = refs.shape
    out = []
    for b in range(batch):
        y = int(labels[b])
        s = [[direct_sim(feats[b], refs[b, c, j], metric) for j in range(k)] for c in range(num_classes)]
        s_self = None if self_feats is None else direct_sim(feats[b], self_feats[b], metric)
        if kind == "instance":
            total = sum(math.exp(v / temperature) for row in s for v in row)
            own = sum(math.exp(v / temperature) for v in s[y])
            if s_self is not None:
                total += math.exp(s_self / temperature)
                own += math.exp(s_self / temperature)
            out.append(-math.log(own / total + 1e-12))
        else:
            z = []
            for c in range(num_classes):
                members = list(s[c]) + ([s_self] if (s_self is not None and c == y) else [])
                z.append(sum(members) / (len(members) * temperature))
            lse = math.log(sum(math.exp(v) for v in z))
            out.append(lse - z[y])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("kind", ["instance", "class"])
@pytest.mark.parametrize("with_self", [False, True])
def test_ask_loss_matches_direct_formula(metric, kind, with_self):
    gen = torch.Generator().manual_seed(0)
    B, C, k, D = 3, 4, 2, 5
    feats = torch.randn(B, D, generator=gen, dtype=torch.float64)
    refs = torch.randn(B, C, k, D, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 3, 2])
    self_feats = torch.randn(B, D, generator=gen, dtype=torch.float64) if with_self else None
    temperature = 0.5 if metric == "cosine" else 2.0
    got = ask_loss(feats, refs, labels, metric=metric, temperature=temperature, kind=kind,
                   self_features=self_feats)
    want = direct_ask_loss(feats, refs, labels, metric, temperature, kind, self_feats)
    assert got.shape == (B,)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_ask_loss_small_temperature_is_stable_and_shared_references_broadcast():
    gen = torch.Generator().manual_seed(3)
    feats = torch.randn(4, 6, generator=gen, requires_grad=True)
    refs = torch.randn(3, 2, 6, generator=gen) * 10  # shared [C, k, D]
    labels = torch.tensor([0, 1, 2, 0])
    loss = ask_loss(feats, refs, labels, metric="l2", temperature=1e-4)
    (grad,) = torch.autograd.grad(loss.sum(), feats)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # -log(p + 1e-12) is capped at -log(1e-12) however far the point is from its own class.
    assert float(loss.detach().max()) <= -math.log(1e-12) + 1e-3
    expanded = refs.unsqueeze(0).expand(4, -1, -1, -1).contiguous()
    for kind in ("instance", "class"):
        torch.testing.assert_close(
            ask_loss(feats, refs, labels, metric="cosine", temperature=0.1, kind=kind),
            ask_loss(feats, expanded, labels, metric="cosine", temperature=0.1, kind=kind),
        )


def test_ask_loss_zero_features_finite_gradient():
    feats = torch.zeros(2, 5, requires_grad=True)
    refs = torch.rand(2, 3, 2, 5)
    refs[0, 1] = 0.0  # zero references too
    loss = ask_loss(feats, refs, torch.tensor([1, 2]), metric="cosine", temperature=0.01,
                    self_features=torch.zeros(2, 5))
    (grad,) = torch.autograd.grad(loss.sum(), feats)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # All similarities are 0, so p_y = |R_y| / |R| exactly.
    torch.testing.assert_close(loss, torch.full((2,), -math.log(3 / 7 + 1e-12)))


def test_multi_layer_is_kappa_weighted_sum():
    gen = torch.Generator().manual_seed(5)
    feats = {"a": torch.randn(3, 2, 2, 2, generator=gen), "b": torch.randn(3, 4, generator=gen)}
    refs = {"a": torch.randn(3, 2, 3, 8, generator=gen), "b": torch.randn(3, 2, 3, 4, generator=gen)}
    y = torch.tensor([0, 1, 1])
    kw = dict(metric="cosine", temperature=0.1)
    got = multi_layer_ask_loss(feats, refs, y, kappa={"a": 0.5, "b": 2.0}, **kw)
    want = 0.5 * ask_loss(feats["a"].flatten(1), refs["a"], y, **kw) + 2.0 * ask_loss(feats["b"], refs["b"], y, **kw)
    torch.testing.assert_close(got, want)


# ------------------------------------------------------------------------------- the ball


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_project_and_random_init_stay_in_ball_and_box(norm):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8, generator=gen)
    x[0] = 0.0
    x[1] = 1.0
    eps = 8 / 255 if norm == "linf" else 0.5
    far = x + 3 * torch.randn(x.shape, generator=gen)
    starts = random_init(x, eps, norm, torch.Generator().manual_seed(1))
    # Same seed, same start.
    torch.testing.assert_close(starts, random_init(x, eps, norm, torch.Generator().manual_seed(1)))
    for x_adv in (project(far, x, eps, norm), starts):
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps + 1e-6
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    # Projection reaches the boundary for far points and leaves inside points alone.
    proj = project(far, x, eps, norm)
    delta = (proj - x).flatten(1)
    if norm == "linf":
        assert float(delta.abs().amax(1).min()) == pytest.approx(eps, abs=1e-6)
    inside = x + 0.5 * (starts - x)
    torch.testing.assert_close(project(inside, x, eps, norm), inside)
    # The random start actually spreads out (not stuck at the centre).
    assert float((starts - x).abs().mean()) > eps / 20


def test_ascent_step_guards():
    x = torch.full((2, 1, 2, 2), 0.5)
    grad = torch.tensor([[[[1.0, -2.0], [0.0, float("nan")]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    step = ascent_step(x, grad, 0.1, "linf")
    torch.testing.assert_close(step[0, 0], torch.tensor([[0.6, 0.4], [0.5, 0.5]]))
    torch.testing.assert_close(step[1], x[1])
    step2 = ascent_step(x, torch.nan_to_num(grad), 0.1, "l2")
    assert float((step2[0] - x[0]).norm()) == pytest.approx(0.1, rel=1e-5)
    torch.testing.assert_close(step2[1], x[1])
    # L2: each example moves step_size along its own unit gradient, however large the others are.
    grads = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 300.0, -400.0], [1e-3, 0.0, 0.0, 0.0]]).view(3, 1, 2, 2)
    moved = (ascent_step(torch.full((3, 1, 2, 2), 0.5), grads, 0.1, "l2") - 0.5).flatten(1)
    torch.testing.assert_close(moved, 0.1 * grads.flatten(1) / grads.flatten(1).norm(dim=1, keepdim=True))


def test_threat_model_validation():
    with pytest.raises(ConfigError, match="norm"):
        ThreatModel(eps=0.1, norm="l1")
    with pytest.raises(ConfigError, match="eps"):
        ThreatModel(eps=-0.1)
    with pytest.raises(ConfigError, match="eps"):
        ThreatModel(eps="8/255")
    with pytest.raises(ConfigError, match="steps"):
        ThreatModel(eps=0.1, steps=-1)
    assert ThreatModel(eps=0).is_trivial and ThreatModel(eps=0.1, steps=0).is_trivial


# --------------------------------------------------------------------------------- PGD-CE


def _no_param_grads(model: nn.Module) -> bool:
    return all(p.grad is None for p in model.parameters())


def test_pgd_raises_cross_entropy_and_keeps_contract():
    model, _, x, y = make_setup()
    with torch.no_grad():
        ce_clean = F.cross_entropy(model(x), y, reduction="none")
    model.train()
    model.bn.eval()  # a mixed-mode model must come back exactly as it was
    threat = ThreatModel(eps=8 / 255, steps=10, step_size=2 / 255)
    attack = PGDAttack(model, threat, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the attack must still get gradients
        x_adv = attack(x, y)
    assert model.training and not model.bn.training and model.conv1.training
    assert _no_param_grads(model)
    assert not x_adv.requires_grad
    assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    model.eval()
    with torch.no_grad():
        ce_adv = F.cross_entropy(model(x_adv), y, reduction="none")
        noise = (torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(9)) * 2 - 1) * 8 / 255
        ce_noise = F.cross_entropy(model((x + noise).clamp(0, 1)), y, reduction="none")
    assert bool((ce_adv > ce_clean).all())
    gain = float((ce_adv - ce_clean).mean())
    assert gain > 0.1 and gain > 5 * float((ce_noise - ce_clean).abs().mean())
    trace = attack.last_result.objective
    assert trace.shape == (10, x.shape[0]) and float(trace[-1].mean()) > float(trace[0].mean())


def test_pgd_trivial_budgets_return_clean_images():
    model, _, x, y = make_setup()
    for threat in (ThreatModel(eps=0.0), ThreatModel(eps=0.1, steps=0)):
        out = PGDAttack(model, threat)(x, y)
        assert torch.equal(out, x) and out is not x
    assert _no_param_grads(model)


def test_pgd_keep_best_returns_best_iterate():
    model, _, x, y = make_setup()
    threat = ThreatModel(eps=16 / 255, steps=6, step_size=8 / 255)
    attack = PGDAttack(model, threat, keep_best=True, generator=torch.Generator().manual_seed(2))
    x_adv = attack(x, y)
    trace = attack.last_result.objective
    assert trace.shape == (7, x.shape[0])
    with torch.no_grad():
        ce = F.cross_entropy(model(x_adv), y, reduction="none")
    torch.testing.assert_close(ce, trace.max(0).values, rtol=1e-5, atol=1e-6)


def test_l2_pgd_stays_in_l2_ball():
    model, _, x, y = make_setup()
    threat = ThreatModel(eps=0.5, norm="l2", steps=5, step_size=0.2)
    x_adv = PGDAttack(model, threat, generator=torch.Generator().manual_seed(0))(x, y)
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-5


def test_bad_inputs_are_rejected():
    model, _, x, y = make_setup()
    attack = PGDAttack(model, ThreatModel(eps=0.1, steps=1))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        attack(x * 3, y)
    with pytest.raises(DataError, match="float"):
        attack((x * 255).to(torch.uint8), y)
    with pytest.raises(ValueError, match="labels"):
        attack(x, y[:2])


def test_pgd_maximise_works_without_an_attack_object():
    # The inner loop of a defence uses it directly with its own objective.
    x = torch.full((2, 1, 2, 2), 0.5)
    target = torch.tensor([1.0, 0.0])

    def loss_fn(z, t):
        return (z.flatten(1).mean(1) - 0.5) * (2 * t - 1)  # push up for t=1, down for t=0

    res = pgd_maximise(loss_fn, x, target, ThreatModel(eps=0.1, steps=3, step_size=0.05, random_start=False))
    torch.testing.assert_close(res.adversarial[0], torch.full((1, 2, 2), 0.6))
    torch.testing.assert_close(res.adversarial[1], torch.full((1, 2, 2), 0.4))
    assert not res.zero_grad.any() and not res.nonfinite.any()


# ------------------------------------------------------------------------------ ASK-Atk


@pytest.mark.parametrize("kind", ["class", "instance"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_ask_attack_raises_ask_loss_with_fixed_references(metric, kind):
    model, store, x, y = make_setup(metric)
    threat = ThreatModel(eps=16 / 255, steps=10, step_size=2 / 255)
    temperature = 0.01 if metric == "cosine" else 1.0
    attack = ASKAttack(model, threat, store=store, layers=["block2"], temperature=temperature, k=2, kind=kind,
                       generator=torch.Generator().manual_seed(0))
    refs, clean = attack.references(x)
    # References: the k nearest of each class to the clean features, by brute force.
    pool = store.features["block2"]
    for i in range(x.shape[0]):
        for c in range(store.num_classes):
            rows = torch.nonzero(store.labels == c).flatten()
            s = torch.tensor([direct_sim(clean["block2"][i], pool[r], metric) for r in rows])
            want = pool[rows[torch.topk(s, 2).indices]]
            torch.testing.assert_close(refs["block2"][i, c], want)

    calls_before = store.calls
    x_adv = attack(x, y)
    assert store.calls == calls_before + 1  # references searched once, on the clean input
    assert float((x_adv - x).abs().max()) <= 16 / 255 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    assert _no_param_grads(model)
    trace = attack.last_result.objective
    assert trace.shape == (10, x.shape[0]) and torch.isfinite(trace).all()
    assert float(trace[-1].mean()) > float(trace[0].mean())

    def loss_on(images):
        with torch.no_grad():
            feats = model.forward_features(images, ["block2"])
        return ask_loss(feats["block2"], refs["block2"], y, metric=metric, temperature=temperature, kind=kind)

    assert float(loss_on(x_adv).mean()) > float(loss_on(x).mean())


def test_the_configured_settings_reach_the_attack(cache_dir):
    """A value changed in the composed config changes the loss the wiring's ASK-Atk ascends."""
    from ask.wiring import build_attacks, build_threat_model
    from tests.conftest import compose_run

    model, store, x, y = make_setup("cosine")
    losses = {}
    for temperature in (0.01, 0.5):
        run = compose_run("attack", ["attack=[ask]", "knn.layers=[block2]", "knn.k=2", "attack.steps=1",
                                     "attack.random_start=false", f"attack.methods.ask.temperature={temperature}"],
                          cache_dir)
        (attack,) = build_attacks(run, model, build_threat_model(run), store, torch.device("cpu")).values()
        assert (attack.temperature, attack.k, attack.layers, attack.kind) == (temperature, 2, ["block2"], "class")
        attack(x, y)
        losses[temperature] = attack.last_result.objective[0]  # the loss at the clean start point
        refs, clean = attack.references(x)
        want = ask_loss(clean["block2"], refs["block2"], y, metric="cosine", temperature=temperature, kind="class")
        torch.testing.assert_close(losses[temperature], want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(losses[0.01], losses[0.5])


def authors_ask_attack(model, references, x, y, *, eps, step_size, steps, temperature, generator):
    """A line-by-line transcription of the authors' ASK-Atk (SPEC, "The authors' code").

    Class-wise loss: z_c = mean over the k references of class c of cos(h(x'), r) / T, summed
    cross-entropy; uniform start in the ball clipped to [0, 1]; each step x' <- clip01(x' + a *
    sign(grad)), then the perturbation clipped to [-eps, eps]; model in eval mode.
    """
    model.eval()
    batch, num_classes, k, dim = references.shape
    x_adv = (x + (2 * torch.rand(x.shape, generator=generator) - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv = x_adv.detach().requires_grad_(True)
        feats = model.forward_features(x_adv, ["block2"])["block2"].flatten(1)
        sims = F.cosine_similarity(feats[:, None, None, :], references, dim=-1)  # [B, C, k]
        logits = sims.mean(dim=2) / temperature
        loss = F.cross_entropy(logits, y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = (x_adv.detach() + step_size * grad.sign()).clamp(0, 1)
        x_adv = x + (x_adv - x).clamp(-eps, eps)
    return x_adv.detach()


def test_default_ask_attack_is_the_authors_attack():
    """The default hyperparameters give the authors' attack: the same adversarial images."""
    model, store, x, y = make_setup("cosine", batch=12)
    threat = ThreatModel(eps=8 / 255, steps=20, step_size=2 / 255)
    attack = ASKAttack(model, threat, store=store, layers="block2", generator=torch.Generator().manual_seed(3))
    assert attack.kind == "class" and attack.temperature == 0.01 and attack.k == 5
    refs, _ = attack.references(x)
    ours = attack(x, y)
    theirs = authors_ask_attack(model, refs["block2"], x, y, eps=8 / 255, step_size=2 / 255, steps=20,
                                temperature=0.01, generator=torch.Generator().manual_seed(3))
    assert float((ours - x).abs().max()) > 7 / 255  # the attack moved
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)

    # The instance-wise option is a different attack on the same points.
    instance = build_attack("ask_instance", model, threat, store=store, layers="block2",
                            generator=torch.Generator().manual_seed(3))
    assert instance.kind == "instance"
    assert not torch.allclose(instance(x, y), theirs)


def test_ask_attack_targeted_lowers_target_loss_and_multi_layer_runs():
    model, store, x, y = make_setup("cosine")
    target = (y + 1) % store.num_classes
    threat = ThreatModel(eps=16 / 255, steps=8, step_size=2 / 255)
    kappa = {"block1": 0.5, "block2": 1.0}

    def attack_with(targeted: bool) -> ASKAttack:
        return ASKAttack(model, threat, store=store, layers=list(kappa), kappa=list(kappa.values()),
                         temperature=0.05, k=2, kind="class", include_self=True, targeted=targeted,
                         generator=torch.Generator().manual_seed(0))

    attack = attack_with(targeted=True)
    refs, clean = attack.references(x)

    def target_loss(images: torch.Tensor) -> torch.Tensor:
        """sum_l kappa_l * ASK loss towards the target, by the loop formula (float64)."""
        with torch.no_grad():
            feats = model.forward_features(images, list(kappa))
        return sum(w * direct_ask_loss(feats[layer].flatten(1).double(), refs[layer].double(), target, "cosine",
                                       0.05, "class", clean[layer].double()) for layer, w in kappa.items())

    before = target_loss(x)
    after = target_loss(attack(x, target))
    trace = attack.last_result.objective  # minus the loss
    assert float(trace[-1].mean()) > float(trace[0].mean())
    assert bool((after < before).all()) and float((before - after).mean()) > 0.1 * float(before.mean())
    # The same call untargeted pushes the other way: away from the target class.
    assert bool((target_loss(attack_with(targeted=False)(x, target)) > before).all())
    assert attack.describe()["hyper"]["layers"] == ["block1", "block2"]


@pytest.mark.parametrize("random_start", [False, True])
def test_ask_attack_zero_features_stay_finite(random_start):
    model, store, x, y = make_setup("cosine")
    zeros = torch.zeros_like(x)
    with torch.no_grad():
        assert float(model.forward_features(zeros, ["block1"])["block1"].abs().max()) == 0.0
    threat = ThreatModel(eps=8 / 255, steps=3, step_size=2 / 255, random_start=random_start)
    attack = ASKAttack(model, threat, store=store, layers="block1", k=2, include_self=True,
                       keep_best=True, generator=torch.Generator().manual_seed(0))
    x_adv = attack(zeros, y)
    assert torch.isfinite(x_adv).all()
    assert torch.isfinite(attack.last_result.objective).all()
    assert not attack.last_result.nonfinite.any()
    assert float(x_adv.max()) <= 8 / 255 + 1e-6 and float(x_adv.min()) >= 0


def test_ask_attack_with_the_real_reference_store():
    from ask.knn import IndexSettings, ReferenceStore

    model, brute, x, y = make_setup("cosine")
    store = ReferenceStore(["block2"], "cosine", brute.num_classes, brute.labels,
                           {"block2": brute.features["block2"]}, settings=IndexSettings(use_gpu=False))
    threat = ThreatModel(eps=8 / 255, steps=2)
    real = ASKAttack(model, threat, store=store, layers=["block2"], k=3)
    stand_in = ASKAttack(model, threat, store=brute, layers=["block2"], k=3)
    torch.testing.assert_close(real.references(x)[0]["block2"], stand_in.references(x)[0]["block2"])


def test_ask_attack_configuration_errors():
    model, store, _, _ = make_setup()
    threat = ThreatModel(eps=0.1)
    with pytest.raises(ConfigError, match="reference store"):
        ASKAttack(model, threat, layers=["block2"])
    with pytest.raises(ConfigError, match="block9"):
        ASKAttack(model, threat, store=store, layers=["block9"])
    with pytest.raises(ConfigError, match="kappa"):
        ASKAttack(model, threat, store=store, layers=["block2"], kappa=[1.0, 2.0])
    with pytest.raises(ConfigError, match="k=7"):
        ASKAttack(model, threat, store=store, layers=["block2"], k=7)
    with pytest.raises(ConfigError, match="temperature"):
        ASKAttack(model, threat, store=store, layers=["block2"], temperature=0)
    with pytest.raises(ConfigError, match="chunk_mb=-1 must be a finite number > 0"):
        ASKAttack(model, threat, store=store, layers=["block2"], chunk_mb=-1)


# ------------------------------------------------------------------------------- registry


def test_registry_and_build_attack():
    assert {"ask", "pgd"} <= set(available_attacks())
    assert ATTACKS["ask"] is ASKAttack and ATTACKS["pgd"] is PGDAttack
    model, store, _, _ = make_setup()
    threat = ThreatModel(eps=0.1)
    with pytest.raises(ConfigError) as err:
        build_attack("nope", model, threat)
    assert "nope" in str(err.value) and "ask" in str(err.value) and "pgd" in str(err.value)
    with pytest.raises(ConfigError, match="temprature"):
        build_attack("ask", model, threat, store=store, layers=["block2"], temprature=0.1)
    attack = build_attack("ask", model, threat, store=store, layers=["block2"], k=2)
    assert isinstance(attack, ASKAttack) and isinstance(attack, Attack) and attack.metric == "cosine"
    assert isinstance(build_attack("pgd", model, threat, keep_best=True), PGDAttack)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attacks_run_on_the_model_device_and_return_on_the_input_device():
    from ask.knn.store import ReferenceStore

    model, brute, x, y = make_setup("cosine")
    model = model.cuda()
    store = ReferenceStore(["block2"], "cosine", brute.num_classes, brute.labels,
                           {"block2": brute.features["block2"]})
    threat = ThreatModel(eps=8 / 255, steps=3)
    for attack in (PGDAttack(model, threat), ASKAttack(model, threat, store=store, layers=["block2"], k=2)):
        x_adv = attack(x, y)  # CPU inputs, CUDA model
        assert x_adv.device == x.device
        assert float((x_adv - x).abs().max()) <= 8 / 255 + 1e-6
        x_adv_gpu = attack(x.cuda(), y.cuda())
        assert x_adv_gpu.is_cuda


def test_saturated_ask_loss_keeps_the_exact_gradient_direction() -> None:
    """A confident point (margin ~ -180 at T = 0.002) must still get the right ascent direction.

    The float32 gradient of the loss itself underflows there (slope ~1e-80 < 1e-38); the
    direction the attacks step along must match the float64 loss gradient's direction.
    """
    from ask.attacks.ask_loss import ask_loss, logit_margin, margin_cross_entropy, multi_layer_ask_objective

    torch.manual_seed(0)
    num_classes, k, dim = 4, 3, 16
    refs = torch.randn(1, num_classes, k, dim)
    labels = torch.tensor([2])
    # A feature sitting right on its own class's references: cosine ~1 with them, ~0 with others.
    feats = refs[0, 2].mean(0, keepdim=True) + 0.01 * torch.randn(1, dim)
    for kind in ("instance", "class"):
        exact = feats.double().requires_grad_(True)
        loss64 = ask_loss(exact, refs.double(), labels, metric="cosine", temperature=0.002, kind=kind)
        (grad64,) = torch.autograd.grad(loss64.sum(), exact)
        x = feats.clone().requires_grad_(True)
        loss, direction = multi_layer_ask_objective(
            {"l": x}, {"l": refs}, labels, metric="cosine", temperature=0.002, kind=kind)
        assert torch.allclose(loss.double(), loss64.detach(), atol=1e-11)
        (raw,) = torch.autograd.grad(loss.sum(), x, retain_graph=True)
        assert not raw.any()  # what a plain loss gradient gives here: nothing to step along
        (grad,) = torch.autograd.grad(direction.sum(), x)
        # By hand: cosine_similarity clamps norms below 1e-8, and grad64 is ~1e-15 here.
        a, b = grad.double().flatten(), grad64.flatten()
        cosine = (a / a.norm()) @ (b / b.norm())
        assert cosine > 0.999, (kind, float(cosine))

    logits = torch.tensor([[0.3, 60.0, -0.2, 0.1]], requires_grad=True)
    (grad,) = torch.autograd.grad(logit_margin(logits, torch.tensor([1])).sum(), logits)
    assert grad[0, 1] < 0 and (grad[0, [0, 2, 3]] > 0).all()
    assert torch.allclose(margin_cross_entropy(logits, torch.tensor([1])),
                          torch.nn.functional.cross_entropy(logits, torch.tensor([1]), reduction="none"))


@pytest.mark.parametrize("kind", ["instance", "class"])
def test_references_normalised_once_give_the_same_margin_and_gradient(kind: str) -> None:
    from ask.attacks.ask_loss import ask_margin
    from ask.knn.similarity import l2_normalize

    gen = torch.Generator().manual_seed(3)
    feats = torch.rand(4, 12, generator=gen).requires_grad_(True)
    refs = torch.rand(4, 3, 2, 12, generator=gen) * 5  # far from unit length, so the flag matters
    labels = torch.tensor([0, 2, 1, 2])
    options = dict(metric="cosine", temperature=0.05, kind=kind)
    plain = ask_margin(feats, refs, labels, **options)
    (grad_plain,) = torch.autograd.grad(plain.sum(), feats)
    once = ask_margin(feats, l2_normalize(refs), labels, references_normalized=True, **options)
    (grad_once,) = torch.autograd.grad(once.sum(), feats)
    torch.testing.assert_close(once, plain)
    torch.testing.assert_close(grad_once, grad_plain)
    # The flag trusts the caller: un-normalised references with it on give another (wrong) margin.
    assert not torch.allclose(ask_margin(feats, refs, labels, references_normalized=True, **options), plain)


@pytest.mark.parametrize("shared", [True, False], ids=["shared-refs", "per-example-refs"])
@pytest.mark.parametrize("kind", ["instance", "class"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ask_margin_is_fp32_under_autocast(metric: str, kind: str, shared: bool) -> None:
    """autocast would run the similarity products in bf16, whose rounding on 2,048-d features
    exceeds the spread of the similarities (l2 above all); the margin must not notice autocast."""
    from ask.attacks.ask_loss import ask_margin

    gen = torch.Generator().manual_seed(11)
    feats = torch.rand(4, 2048, generator=gen)
    refs = torch.rand(*(() if shared else (4,)), 3, 5, 2048, generator=gen)
    labels = torch.tensor([0, 2, 1, 2])
    options = dict(metric=metric, temperature=0.01, kind=kind)

    def margin_and_grad(autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = feats.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            margin = ask_margin(x, refs, labels, self_features=feats, **options)
        (grad,) = torch.autograd.grad(margin.sum(), x)
        return margin, grad

    reference, reference_grad = margin_and_grad(autocast=False)
    margin, grad = margin_and_grad(autocast=True)
    assert margin.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(margin, reference, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loop", ["pgd_maximise", "adam_minimise"])
def test_steps_under_autocast_follow_the_fp32_gradient_of_an_fp32_objective(loop: str) -> None:
    """ask-attack runs every attack under the run's autocast; an objective computed in fp32 inside it
    (the ASK margin) must be differentiated in fp32 too. Differentiated under autocast, its products
    ran as bf16 matmuls: the direction moved by ~0.5 % and some sign steps flipped."""
    from ask.attacks.ascent import pgd_maximise
    from ask.attacks.ask_loss import multi_layer_ask_objective, sum_unit_references
    from ask.attacks.support import adam_minimise

    gen = torch.Generator().manual_seed(2)
    images = torch.rand(32, 3, 16, 16, generator=gen)
    labels = torch.randint(0, 10, (32,), generator=gen)
    sums = {"features": sum_unit_references(torch.rand(32, 10, 5, 768, generator=gen))}
    threat = ThreatModel(eps=8 / 255, norm="linf", steps=2, step_size=2 / 255, random_start=False)

    def objective(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return multi_layer_ask_objective({"features": x}, sums, y, metric="cosine", temperature=0.01, kind="class")

    def run(autocast: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if loop == "pgd_maximise":
                return pgd_maximise(objective, images, labels, threat).adversarial
            return adam_minimise(lambda x, y: -objective(x, y)[0], images, labels, threat, lr=0.1).adversarial

    assert torch.equal(run(autocast=True), run(autocast=False))


# ------------------------------------------------- class-wise cosine: summed unit references


def direct_class_cosine_loss(feats, refs, labels, temperature, self_feats=None):
    """SPEC's class-wise loss with one cosine per reference (F.cosine_similarity), differentiable.

    ``refs`` [B, C, k, D] or [C, k, D] (shared); the self reference joins R_y, so |R_y| = k + 1.
    """
    refs = refs.expand(feats.shape[0], *refs.shape) if refs.dim() == 3 else refs
    sims = F.cosine_similarity(feats[:, None, None, :], refs, dim=-1)  # [B, C, k]
    totals = sims.sum(dim=2)
    counts = torch.full_like(totals, refs.shape[2])
    if self_feats is not None:
        onehot = F.one_hot(labels, refs.shape[1]).to(totals.dtype)
        totals = totals + onehot * F.cosine_similarity(feats, self_feats, dim=-1)[:, None]
        counts = counts + onehot
    return F.cross_entropy(totals / (counts * temperature), labels, reduction="none")


def _loss_and_grads(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    loss = fn(*leaves)
    return (loss.detach(), *torch.autograd.grad(loss.sum(), leaves))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_self", [False, True])
@pytest.mark.parametrize("shared", [False, True], ids=["per-example-refs", "shared-refs"])
def test_summed_unit_references_give_the_direct_class_wise_loss_and_gradients(dtype, with_self, shared):
    """z_c from <h/|h|, sum_j r_j/|r_j|> equals the mean of k cosines: values, input gradients and
    (ASK-Def's references carry gradient) reference gradients, as summed once or on the fly."""
    from ask.attacks.ask_loss import ClassSums, sum_unit_references

    gen = torch.Generator().manual_seed(7)
    B, C, k, D = 5, 4, 3, 16
    feats = torch.randn(B, D, generator=gen, dtype=dtype)
    refs = torch.randn(*(() if shared else (B,)), C, k, D, generator=gen, dtype=dtype) * 3
    self_feats = torch.randn(B, D, generator=gen, dtype=dtype) if with_self else None
    labels = torch.tensor([0, 3, 2, 1, 3])
    temperature = 0.1
    want = _loss_and_grads(lambda f, r: direct_class_cosine_loss(f.double(), r.double(), labels, temperature,
                                                                 None if self_feats is None else self_feats.double()),
                           feats, refs)
    options = dict(metric="cosine", temperature=temperature, kind="class", self_features=self_feats)
    on_the_fly = _loss_and_grads(lambda f, r: ask_loss(f, r, labels, **options), feats, refs)
    summed_once = _loss_and_grads(lambda f, r: ask_loss(f, sum_unit_references(r), labels, **options), feats, refs)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for got in (on_the_fly, summed_once):
        assert got[0].dtype == dtype
        for g, w in zip(got, want, strict=True):
            assert float(w.abs().max()) > 1e-3  # gradients that a wrong formula would change
            torch.testing.assert_close(g.double(), w.double(), **tolerance)
    sums = sum_unit_references(refs)
    assert isinstance(sums, ClassSums) and sums.count == k
    assert sums.sums.shape == (*(() if shared else (B,)), C, D)


def test_summed_references_serve_the_class_wise_cosine_loss_only():
    from ask.attacks.ask_loss import sum_unit_references

    sums = sum_unit_references(torch.rand(2, 3, 2, 4))
    for kind, metric in (("instance", "cosine"), ("class", "l2")):
        with pytest.raises(ValueError, match="class-wise cosine"):
            ask_loss(torch.rand(2, 4), sums, torch.tensor([0, 1]), metric=metric, temperature=0.1, kind=kind)


@pytest.mark.parametrize("include_self", [False, True])
def test_multi_layer_objective_on_summed_references_is_the_direct_kappa_sum(include_self):
    """What ASK-Atk's steps compute (summed references from step_references) against the direct
    formula over the [B, C, k, D] references of references(), on two layers, values and gradients."""
    from ask.attacks.ask_loss import ClassSums, multi_layer_ask_objective

    model, store, x, y = make_setup("cosine")
    attack = ASKAttack(model, ThreatModel(eps=8 / 255, steps=1), store=store, layers=["block1", "block2"],
                       kappa=[0.5, 2.0], temperature=0.05, k=2, include_self=include_self)
    refs, clean = attack.references(x)
    summed, clean_again = attack.step_references(x)
    for layer in attack.layers:
        assert isinstance(summed[layer], ClassSums) and summed[layer].count == 2
        torch.testing.assert_close(clean_again[layer], clean[layer], rtol=0, atol=0)
    self_feats = clean if include_self else None
    x_adv = (x + 0.03 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)

    def ours(images):
        feats = model.forward_features(images, attack.layers)
        return multi_layer_ask_objective(feats, summed, y, kappa=attack.kappa, metric="cosine", temperature=0.05,
                                         kind="class", self_features=self_feats)[0]

    def direct(images):
        feats = model.forward_features(images.double(), attack.layers)
        return sum(attack.kappa[layer] * direct_class_cosine_loss(
            feats[layer].flatten(1), refs[layer].double(), y, 0.05,
            None if self_feats is None else self_feats[layer].double()) for layer in attack.layers)

    model.double()
    want = _loss_and_grads(direct, x_adv.double())
    model.float()
    got = _loss_and_grads(ours, x_adv)
    assert float(want[1].abs().max()) > 1e-3
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- ASK-Atk in memory-bounded pieces


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_rowwise_similarity_in_pieces_equals_one_piece(metric):
    from ask.knn.similarity import rowwise_similarity

    gen = torch.Generator().manual_seed(4)
    a = torch.rand(3, 6, generator=gen)
    b = torch.rand(3, 7, 6, generator=gen)
    weights = torch.rand(3, 7, generator=gen)
    results = []
    for max_chunk_bytes in (None, 3 * 6 * 4 * 2):  # two references a piece: four pieces
        x = a.clone().requires_grad_(True)
        sims = rowwise_similarity(x, b, metric, max_chunk_bytes=max_chunk_bytes)
        results.append((sims.detach(), *torch.autograd.grad((sims * weights).sum(), x)))
    for whole, pieces in zip(*results, strict=True):
        torch.testing.assert_close(pieces, whole, rtol=1e-6, atol=1e-7)


def test_references_are_gathered_in_pieces_exactly():
    from ask.attacks.ask import gather_references

    gen = torch.Generator().manual_seed(5)
    pool = torch.randn(30, 8, generator=gen).half()  # a float16 feature cache comes back in float32
    rows = torch.randint(0, 30, (4, 3, 2), generator=gen)
    for unit, summed in ((False, False), (True, False), (True, True)):
        whole = gather_references(pool, rows, device=torch.device("cpu"), unit=unit, summed=summed)
        one_group = gather_references(pool, rows, device=torch.device("cpu"), unit=unit, summed=summed,
                                      chunk_bytes=1)
        assert whole.dtype == torch.float32 and torch.equal(whole, one_group)
    plain = pool[rows].float()
    torch.testing.assert_close(gather_references(pool, rows, device=torch.device("cpu")), plain, rtol=0, atol=0)
    unit_sums = (plain / plain.norm(dim=-1, keepdim=True)).sum(dim=2)
    torch.testing.assert_close(whole, unit_sums)


@pytest.mark.parametrize(("kind", "metric"), [("class", "cosine"), ("instance", "cosine"), ("instance", "l2"),
                                              ("class", "l2")])
def test_ask_attack_in_tiny_pieces_equals_the_attack_in_one_piece(kind, metric):
    """chunk_mb small enough that every (example, class) group is gathered alone and every per-step
    L2 similarity runs one reference at a time: the same adversarial images and loss trace."""
    model, store, x, y = make_setup(metric)
    threat = ThreatModel(eps=16 / 255, steps=4, step_size=2 / 255)
    temperature = 0.05 if metric == "cosine" else 1.0
    results = []
    for chunk_mb in (1024, 1e-6):
        attack = ASKAttack(model, threat, store=store, layers=["block1", "block2"], k=2, kind=kind, metric=metric,
                           temperature=temperature, include_self=True, chunk_mb=chunk_mb,
                           generator=torch.Generator().manual_seed(0))
        assert attack.chunk_bytes == (1 if chunk_mb < 1 else 1024 * 1024 * 1024)
        results.append((attack(x, y), attack.last_result.objective))
    (x_whole, trace_whole), (x_pieces, trace_pieces) = results
    assert float((x_whole - x).abs().max()) > 10 / 255
    torch.testing.assert_close(x_pieces, x_whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(trace_pieces, trace_whole, rtol=1e-5, atol=1e-6)
