"""Defences: AT, ASK-Def and TRADES on real digits data; validation-based model selection."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ask.attacks.ask_loss import ask_margin
from ask.config.schema import TrainConfig, parse_size
from ask.data import ImageSplit, load_dataset, select_points, to_float
from ask.defenses import DEFENSES, build_defense
from ask.defenses.references import ReferenceSampler, group_by_class, mix_references
from ask.defenses.trades import kl_divergence
from ask.errors import ConfigError, DataError
from ask.models import build_model
from ask.models.checkpoint import load_checkpoint
from ask.training.trainer import defense_context, train
from ask.training.validation import selection_score
from tests.conftest import compose_run

TINY = ["dataset.train_per_class=20", "dataset.test_per_class=5", "train.batch_size=32",
        "train.schedule=constant", "model.width=8"]
# Outer (train-mode) forward passes per step: each bumps batch norm's num_batches_tracked once.
OUTER_PASSES = {"none": 1, "at": 1, "ask_def": 2, "trades": 2}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory):
    run = compose_run("train", ["model.width=8"], tmp_path_factory.mktemp("cache"))
    return run, load_dataset(run.dataset, run.cache_dir, seed=0, progress=False)


def _setup(digits, name: str, overrides: list[str] = (), train_split: ImageSplit | None = None):
    run, data = digits
    run = compose_run("train", ["model.width=8", f"defense={name}", *overrides], Path(run.cache_dir))
    torch.manual_seed(0)
    model = build_model(run.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size, mean=data.mean, std=data.std, width=run.model.width)
    context = defense_context(name, {"train_split": train_split or data.train, "knn_layers": list(run.knn.layers)})
    defense = build_defense(name, model, dict(run.defense.params), **context)
    images, labels = to_float(data.train.images[:20]), data.train.labels[:20]
    return defense, model, images, labels


def _bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


def _tracked(model: nn.Module) -> int:
    return int(next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).num_batches_tracked)


# ----------------------------------------------------------------------------- one step each
# On a GPU the step runs under bf16 autocast, as the trainer runs it there, and ASK-Def's reference
# images travel from the CPU split to the model's device.
ON_CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                          reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("name", ["none", "at", "ask_def", "trades"])
def test_one_training_step_changes_the_weights(digits, name: str, device: str) -> None:
    defense, model, images, labels = _setup(digits, name)
    model.to(device).train()
    images, labels = images.to(device), labels.to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    tracked = _tracked(model)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        loss, logits = defense.loss(images, labels)
    assert loss.device.type == device and loss.dim() == 0 and torch.isfinite(loss)
    assert logits.shape == (20, 10)
    # Only the outer passes ran in train mode: an inner attack in train mode would add 10+.
    assert _tracked(model) - tracked == OUTER_PASSES[name]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(k.endswith("weight") for k in changed)


def test_at_loss_is_the_cross_entropy_of_its_pgd_points(digits) -> None:
    defense, model, images, labels = _setup(digits, "at")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    loss, logits = defense.loss(images, labels)
    model.load_state_dict(state)  # the outer pass moved batch norm's running statistics
    torch.manual_seed(1)
    x_adv = defense.adversarial(images, labels)
    assert torch.allclose(loss, F.cross_entropy(model(x_adv), labels))
    delta = (x_adv - images).abs().amax()
    assert 0 < float(delta) <= 4 / 255 + 1e-6  # at.yaml's eps
    with torch.no_grad():
        clean = F.cross_entropy(model(images), labels)
    assert float(loss.detach()) > float(clean)  # PGD raised the loss


@pytest.mark.parametrize("name", ["at", "ask_def", "trades"])
def test_inner_maximisation_leaves_batch_norm_alone(digits, name: str) -> None:
    defense, model, images, labels = _setup(digits, name)
    model.train()
    before = _bn_state(model)
    if name == "ask_def":
        defense.inner(images, labels)
    elif name == "trades":
        defense.adversarial(images)
    else:
        defense.adversarial(images, labels)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    for a, b in zip(before, _bn_state(model), strict=True):
        assert torch.equal(a, b)
    # The outer loss does update them (the check above is not vacuous).
    defense.loss(images, labels)
    assert not torch.equal(before[0], _bn_state(model)[0])


# ----------------------------------------------------------------------------- ASK-Def
def test_ask_def_references_keep_their_labels(digits) -> None:
    """Every reference, clean or PGD copy, carries the class painted into its own pixels."""
    run, data = digits
    num_classes = data.num_classes
    painted = data.train.images.clone()
    painted[:, 0, 0, 0] = (data.train.labels * 255.0 / (num_classes - 1)).round().to(torch.uint8)
    split = ImageSplit(painted, data.train.labels.clone())
    defense, model, images, labels = _setup(digits, "ask_def", ["defense.params.n_ref=3"], train_split=split)

    torch.manual_seed(0)
    points = defense.inner(images, labels)

    def read(x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0, 0, 0] * (num_classes - 1)).round().long()

    assert points.ref_images.shape[0] == 2 * num_classes * 3
    assert torch.equal(read(points.ref_images), points.ref_labels)
    assert torch.equal(torch.bincount(points.ref_labels, minlength=num_classes), torch.full((num_classes,), 6))
    # The second half are the PGD copies of the first, in the same order, inside eps_pgd.
    half = num_classes * 3
    gap = (points.ref_images[half:] - points.ref_images[:half]).abs().flatten(1).amax(1)
    assert bool((gap <= 4 / 255 + 1e-6).all()) and bool((gap > 0).any())
    # The authors' labelling (repeat_interleave) would fail the same check.
    buggy = points.ref_labels[:half].repeat_interleave(2)
    assert not torch.equal(read(points.ref_images), buggy)

    # Grouping reads the labels: class c's block holds exactly the features of images painted c.
    feats = read(points.ref_images).float().unsqueeze(1).repeat(1, 4)
    perm = torch.randperm(len(feats))
    grouped = group_by_class(feats[perm], points.ref_labels[perm], num_classes)
    assert grouped.shape == (num_classes, 6, 4)
    assert torch.equal(grouped[:, :, 0], torch.arange(num_classes).float().unsqueeze(1).expand(-1, 6))
    # And the defence's reference features are the model's features of those images, grouped.
    model.eval()
    with torch.no_grad():
        direct = defense.features(points.ref_images)
    assert torch.allclose(points.references, group_by_class(direct, points.ref_labels, num_classes), atol=1e-5)


def test_mix_references_repeats_the_labels_as_a_block() -> None:
    clean = torch.arange(3.0).view(3, 1, 1, 1)
    images, labels = mix_references(clean, clean + 0.5, torch.tensor([7, 8, 9]))
    assert images.flatten().tolist() == [0.0, 1.0, 2.0, 0.5, 1.5, 2.5]
    assert labels.tolist() == [7, 8, 9, 7, 8, 9]


def test_ask_def_inner_points_stay_in_their_balls(digits) -> None:
    defense, model, images, labels = _setup(digits, "ask_def")
    # The PGD term uses the shared defense.eps; the ASK term the threat model's attack.eps (0.1 on digits).
    assert defense.pgd_threat.eps == pytest.approx(4 / 255)
    assert defense.ask_threat.eps == pytest.approx(0.1)
    points = defense.inner(images, labels)
    assert float((points.x_pgd - images).abs().amax()) <= 4 / 255 + 1e-6
    assert float((points.x_ask - images).abs().amax()) <= 0.1 + 1e-6
    assert float((points.x_ask - images).abs().amax()) > 4 / 255  # it does use the larger ball
    assert points.references.shape == (10, 10, model.feature_shapes()[defense.layer][0] * 4 * 4)
    model.eval()
    with torch.no_grad():
        before = defense.margin(defense.features(images), labels, points.references)
        after = defense.margin(defense.features(points.x_ask), labels, points.references)
    assert float(after.mean()) > float(before.mean())  # the ASK maximisation raised the loss


@pytest.mark.parametrize("kind", ["instance", "class"])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_shared_references_match_per_example_references(kind: str, metric: str) -> None:
    generator = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 12, generator=generator).relu()
    feats[0] = 0  # an all-zero feature must stay finite
    refs = torch.randn(4, 3, 12, generator=generator).relu()
    labels = torch.tensor([0, 1, 2, 3, 1, 2])
    fast = ask_margin(feats, refs, labels, metric=metric, temperature=0.1, kind=kind)  # one product
    slow = ask_margin(feats, refs.expand(len(labels), *refs.shape), labels, metric=metric,
                      temperature=0.1, kind=kind)  # per-example similarities
    assert torch.isfinite(fast).all()
    assert torch.allclose(fast, slow, atol=1e-4, rtol=1e-4)


def test_reference_sampler_draws_distinct_images_of_each_class() -> None:
    labels = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 2, 1, 0])
    split = ImageSplit(torch.zeros(len(labels), 1, 8, 8, dtype=torch.uint8), labels)
    sampler = ReferenceSampler(split, num_classes=3, per_class=3)
    for _ in range(20):
        rows = sampler.draw()
        assert rows.shape == (3, 3)
        assert torch.equal(labels[rows], torch.arange(3).unsqueeze(1).expand(3, 3))
        assert all(len(set(r.tolist())) == 3 for r in rows)
    with pytest.raises(DataError, match="n_ref=5"):
        ReferenceSampler(split, num_classes=3, per_class=5)


# ----------------------------------------------------------------------------- TRADES
def test_trades_kl_is_zero_at_the_clean_point(digits) -> None:
    defense, model, images, labels = _setup(digits, "trades")
    with torch.no_grad():
        model.stages["logits"].weight.mul_(300)  # confident predictions, so the KL has a scale
    model.train()
    kl, _ = defense.robust_term(images, images)
    assert abs(float(kl.detach())) < 1e-6
    eps = defense.threat.eps
    assert eps == pytest.approx(0.1)  # TRADES trains at the threat model's radius (digits: attack.eps=0.1)
    x_adv = defense.adversarial(images)
    assert 0 < float((x_adv - images).abs().amax()) <= eps + 1e-6
    noise = images + (torch.rand(images.shape) * 2 - 1) * eps
    model.eval()
    with torch.no_grad():
        kl_adv, _ = defense.robust_term(images, x_adv)
        kl_noise, _ = defense.robust_term(images, noise.clamp(0, 1))
    assert float(kl_adv) > 3 * float(kl_noise) > 0  # the ascent found far more than random noise
    # The per-example KL against torch's own.
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    expected = F.kl_div(F.log_softmax(b, 1), F.log_softmax(a, 1), reduction="none", log_target=True).sum(1)
    assert torch.allclose(kl_divergence(a, b), expected, atol=1e-6)


@pytest.mark.parametrize("beta", [1.0, 6.0])
def test_trades_loss_is_clean_ce_plus_beta_times_kl_from_clean_to_adversarial(digits, beta: float) -> None:
    """The outer loss against its formula, term by term, on the x_adv the defence itself draws."""
    defense, model, images, labels = _setup(digits, "trades", [f"defense.params.beta={beta}"])
    assert defense.beta == beta
    with torch.no_grad():
        model.stages["logits"].weight.mul_(300)  # KL(p || q) and KL(q || p) then differ clearly
    model.eval()  # running statistics: the same network in every pass below
    torch.manual_seed(3)
    x_adv = defense.adversarial(images)
    torch.manual_seed(3)
    loss, logits = defense.loss(images, labels)
    with torch.no_grad():
        clean, adv = model(images), model(x_adv)
    p, q = F.softmax(clean, 1), F.softmax(adv, 1)
    kl = (p * (p.log() - q.log())).sum(1).mean()
    reverse = (q * (q.log() - p.log())).sum(1).mean()
    assert float(kl) > 0.01 and abs(float(kl - reverse)) > 0.01 * float(kl)  # the direction is visible
    torch.testing.assert_close(logits, clean)  # the running accuracy is the clean one
    torch.testing.assert_close(loss.detach(), F.cross_entropy(clean, labels) + beta * kl, rtol=1e-5, atol=1e-6)


def test_unknown_defense_setting_is_a_config_error(digits) -> None:
    run, data = digits
    model = build_model("smallcnn", num_classes=10, in_channels=1, image_size=8, mean=data.mean, std=data.std,
                        width=8)
    with pytest.raises(ConfigError, match="epss"):
        build_defense("at", model, {"epss": 0.1})
    with pytest.raises(ConfigError, match="eps_ask"):
        build_defense("ask_def", model, {"eps_ask": "eight"}, train_split=data.train, knn_layers=["block2"])
    assert defense_context("none", {"train_split": data.train}) == {}
    assert set(DEFENSES) >= {"none", "at", "ask_def", "trades"}


# ----------------------------------------------------------------------------- trainer
def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_training_selects_by_robust_knn_accuracy(tmp_path: Path, cache_dir: Path) -> None:
    run = compose_run("train", [*TINY, "defense=at", "train.epochs=2", "dataset.val_per_class=5",
                                "train.select_metric=val_robust_knn", "attack.steps=5"], cache_dir)
    summary = train(run, tmp_path)
    records = _records(tmp_path)
    assert [r["epoch"] for r in records] == [1, 2]
    for record in records:
        assert {"val_acc", "val_robust_dnn", "val_robust_knn", "val_knn_acc"} <= set(record)
        assert record["val_points"] == 50
        assert 0 <= record["val_robust_knn"] <= record["val_knn_acc"] + 1e-9
    best = load_checkpoint(tmp_path / "best.pt")
    scores = [r["val_robust_knn"] for r in records]
    assert best["epoch"] == 1 + scores.index(max(scores))
    assert summary["select_metric"] == "val_robust_knn"
    assert summary["best_val_robust_knn"] == max(scores)


def test_selection_numbers_are_the_attacks_and_votes_written_out(tmp_path: Path, cache_dir: Path) -> None:
    """val_robust_dnn against torchattacks' PGD, val_knn_acc against a brute-force vote, on last.pt."""
    torchattacks = pytest.importorskip("torchattacks", reason="in the dev extra: pip install -e '.[dev]'")
    run = compose_run("train", [*TINY, "defense=at", "train.epochs=4", "dataset.val_per_class=5", "train.amp=off",
                                "train.select_metric=val_robust_knn", "attack.steps=3", "attack.random_start=false",
                                "attack.eps=0.05"],
                      cache_dir)
    train(run, tmp_path)
    record = _records(tmp_path)[-1]  # last.pt's epoch
    data = load_dataset(run.dataset, run.cache_dir, seed=run.seed, progress=False)
    model = build_model(run.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
                        image_size=data.image_size, mean=data.mean, std=data.std, width=run.model.width)
    model.load_state_dict(load_checkpoint(tmp_path / "last.pt")["state_dict"])
    model.eval()
    points = select_points(data.val, run.train.val_points, run.seed)
    x, y = to_float(points.images), points.labels
    assert record["val_points"] == len(y) == 50

    attack = torchattacks.PGD(model, eps=run.attack.eps, alpha=run.attack.step_size, steps=run.attack.steps,
                              random_start=False)
    x_pgd = attack(x, y)
    with torch.no_grad():
        robust_dnn = int((model(x_pgd).argmax(1) == y).sum()) / len(y)
    assert record["val_robust_dnn"] == pytest.approx(robust_dnn, abs=1e-9)

    # Clean kNN: cosine over the whole training pool at knn.layers[0], k votes, ties to the nearest.
    layer, k = run.knn.layers[0], run.knn.k
    with torch.no_grad():
        pool = F.normalize(model.forward_features(to_float(data.train.images), [layer])[layer].flatten(1), dim=1)
        query = F.normalize(model.forward_features(x, [layer])[layer].flatten(1), dim=1)
    nearest = data.train.labels[(query @ pool.T).topk(k, dim=1).indices]  # [B, k], most similar first
    votes = []
    for row in nearest.tolist():
        counts = {c: row.count(c) for c in row}
        votes.append(next(c for c in row if counts[c] == max(counts.values())))
    clean_knn = int((torch.tensor(votes) == y).sum()) / len(y)
    assert record["val_knn_acc"] == pytest.approx(clean_knn, abs=1e-9)
    assert record["val_robust_knn"] < clean_knn  # ASK-Atk broke some of them


def _kept(records: list[dict], floor: float) -> list[int]:
    """The epochs that became best.pt in turn under ``validate``'s rule, with a clean floor."""
    train_config = TrainConfig(select_metric="val_robust_knn", select_min_val_acc=floor)
    best, history = -math.inf, []
    for epoch, record in enumerate(records, 1):
        score = selection_score(record, train_config)
        if score > best:
            best, history = score, [*history, epoch]
    return history


def test_selection_score_keeps_epochs_under_the_clean_floor_only_until_one_reaches_it() -> None:
    records = [{"val_acc": 0.40, "val_robust_knn": 0.30},   # the most robust, far under the floor
               {"val_acc": 0.60, "val_robust_knn": 0.10},   # the first to reach it: replaces epoch 1
               {"val_acc": 0.55, "val_robust_knn": 0.20},   # more robust but under it again
               {"val_acc": 0.70, "val_robust_knn": 0.15}]   # above it and more robust than epoch 2
    assert _kept(records, 0.0) == [1]
    assert _kept(records, 0.6) == [1, 2, 4]
    assert _kept(records, 0.9) == [1]  # nothing reaches it: the metric alone decides


def test_clean_floor_changes_the_kept_epoch_and_is_reported(tmp_path: Path, cache_dir: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    extra = [*TINY, "defense=at", "dataset.val_per_class=5", "train.select_metric=val_robust_knn", "attack.steps=2"]
    unreachable = train(compose_run("train", [*extra, "train.epochs=3", "train.select_min_val_acc=1.0"], cache_dir),
                        tmp_path / "a")
    records = _records(tmp_path / "a")
    robust = [r["val_robust_knn"] for r in records]
    assert unreachable["select_floor_met"] is False and "no epoch reached train.select_min_val_acc=1.0" in caplog.text
    assert load_checkpoint(tmp_path / "a" / "best.pt")["epoch"] == 1 + robust.index(max(robust))

    # A floor (one of the epochs' clean accuracies) and a run length (the constant schedule makes a
    # shorter run the first epochs of the longer one) under which the floor keeps another epoch.
    choices = [(epochs, r["val_acc"]) for epochs in (1, 2, 3) for r in records[:epochs]
               if _kept(records[:epochs], r["val_acc"])[-1] != _kept(records[:epochs], 0.0)[-1]]
    assert choices, f"no floor changes the kept epoch of these records, so the test cannot tell: {records}"
    epochs, floor = choices[0]
    summary = train(compose_run("train", [*extra, f"train.epochs={epochs}", f"train.select_min_val_acc={floor}"],
                                cache_dir), tmp_path / "b")
    assert [r["val_robust_knn"] for r in _records(tmp_path / "b")] == robust[:epochs]
    best = load_checkpoint(tmp_path / "b" / "best.pt")
    assert best["epoch"] == _kept(records[:epochs], floor)[-1] != _kept(records[:epochs], 0.0)[-1]
    assert summary["select_floor_met"] is True and best["metrics"]["val_acc"] >= floor


def test_resume_reproduces_adversarial_training(tmp_path: Path, cache_dir: Path) -> None:
    extra = [*TINY, "defense=at", "dataset.val_per_class=2", "attack.steps=2"]
    straight = tmp_path / "straight"
    train(compose_run("train", [*extra, "train.epochs=2"], cache_dir), straight)
    resumed = tmp_path / "resumed"
    train(compose_run("train", [*extra, "train.epochs=1"], cache_dir), resumed)
    train(compose_run("train", [*extra, "train.epochs=2"], cache_dir), resumed)
    a, b = _records(straight), _records(resumed)
    assert [r["epoch"] for r in b] == [1, 2]
    assert a[1]["train_loss"] == b[1]["train_loss"]
    assert a[1]["val_robust_dnn"] == b[1]["val_robust_dnn"]
    sa, sb = load_checkpoint(straight / "last.pt"), load_checkpoint(resumed / "last.pt")
    for key in sa["state_dict"]:
        assert torch.equal(sa["state_dict"][key], sb["state_dict"][key]), key


def test_robust_selection_without_attack_points_is_refused(cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="val_points"):
        compose_run("train", ["train.select_metric=val_robust_dnn", "train.val_points=0"], cache_dir)


def test_one_experiment_sets_the_inner_budget_of_every_defence(cache_dir: Path) -> None:
    runs = {name: compose_run("train", ["experiment=defenses_digits", f"defense={name}"], cache_dir)
            for name in ("at", "ask_def", "trades")}
    assert runs["at"].defense.params["steps"] == runs["ask_def"].defense.params["steps"] == 5
    assert runs["trades"].defense.params["steps"] == 5
    assert parse_size(runs["at"].defense.params["eps"], "eps") == pytest.approx(0.05)
    assert parse_size(runs["ask_def"].defense.params["eps_pgd"], "eps") == pytest.approx(0.05)
    assert parse_size(runs["ask_def"].defense.params["eps_ask"], "eps") == pytest.approx(0.1)
    assert parse_size(runs["trades"].defense.params["eps"], "eps") == pytest.approx(0.1)
    # defense=none takes the same experiment without complaint: the budget is not its params.
    assert compose_run("train", ["experiment=defenses_digits", "defense=none"], cache_dir).defense.params == {}


def test_defence_budget_out_of_range_is_refused(cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="defense.steps"):
        compose_run("train", ["defense=at", "defense.steps=-1"], cache_dir)
    with pytest.raises(ConfigError, match="defense.eps"):
        compose_run("train", ["defense=at", "defense.eps=-0.1"], cache_dir)
