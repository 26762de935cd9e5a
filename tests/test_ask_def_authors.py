"""ASK-Def as the authors run it: the preset against a transcription of their step, and each switch.

``authors_ask_def_step`` transcribes SPEC's "ASK-Def training step" 1-8 line by line with plain
torch (no helper of ``ask.defenses``), so ``defense=ask_def_authors`` is checked against the
step itself, not against the pieces it is built from. Tiny model, three classes, three steps.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ask.attacks import ThreatModel, pgd_maximise
from ask.attacks.ask_loss import loss_from_margin
from ask.data import ImageSplit, augment_batch, to_float
from ask.defenses import build_defense
from ask.defenses.ask_def import ASKDefense, AuthorsASKDefense
from ask.defenses.references import ReferenceSampler
from ask.errors import ConfigError
from ask.models import build_model
from tests.test_attacks import TinyNet

NUM_CLASSES = 3
N_REF = 2
LAYER = "block2"
# A budget where both balls clip: three steps of 3/255 overshoot 4/255 and reach 8/255.
PARAMS = {"n_ref": N_REF, "steps": 3, "step_size": "3/255", "eps_pgd": "4/255", "eps_ask": "8/255"}


# ----------------------------------------------------------------------------- fixtures
def make_split(counts: tuple[int, ...] = (5, 4, 6), seed: int = 0) -> ImageSplit:
    """Random 3x8x8 uint8 images, classes of uneven sizes (the sampler's padding is exercised), shuffled."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    images = torch.randint(0, 256, (len(labels), 3, 8, 8), dtype=torch.uint8, generator=generator)
    return ImageSplit(images, labels)


def make_batch(batch: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 8, 8, generator=generator), torch.arange(batch) % NUM_CLASSES


def make_defense(model: nn.Module, split: ImageSplit, name: str = "ask_def_authors", augment: str = "crop_flip",
                 **switches) -> ASKDefense:
    return build_defense(name, model, {**PARAMS, **switches}, train_split=split, knn_layers=[LAYER],
                         augment=augment)


def bn_state(model: nn.Module) -> list[torch.Tensor]:
    return [t.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


def tracked(model: nn.Module) -> int:
    return int(next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).num_batches_tracked)


# ----------------------------------------------------------------------------- the transcription
def authors_ask_def_step(model, split_images, split_labels, x, y, *, num_classes, n_ref, layer, eps_pgd,
                         eps_ask, step_size, steps, temperature=0.1, beta=1.0):
    """SPEC's ASK-Def training step 1-8 (the authors' order), line by line; returns the loss (not stepped).

    Random numbers in the authors' order from torch's global generator: the per-class shuffles of
    the reference loaders, their crop + flip, the PGD start of the references, the ASK start, the
    PGD start of the batch. The label bug is not transcribed: the PGD copies keep their labels.
    """

    def features(images):
        # The authors' forward runs the whole network whatever layer it returns.
        return model.forward_features(images, [layer], with_logits=True)[layer].flatten(1)

    def pgd_ce_eval(images, labels, eps):
        model.eval()
        x_adv = (images + (2 * torch.rand(images.shape) - 1) * eps).clamp(0, 1)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            loss = F.cross_entropy(model(x_adv), labels)
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + step_size * grad.sign()
            x_adv = (images + (x_adv - images).clamp(-eps, eps)).clamp(0, 1)
        return x_adv.detach()

    def ask_instance(feats, labels, ref_feats, ref_labels):
        sims = F.cosine_similarity(feats[:, None, :], ref_feats[None, :, :], dim=-1)  # [B, R]
        probs = torch.softmax(sims / temperature, dim=1)
        p_y = (probs * (ref_labels[None, :] == labels[:, None])).sum(dim=1)
        return -torch.log(p_y + 1e-6).mean()  # their ASKLoss adds 1e-6 before the log

    # 1. References: every class's loader shuffled (one random key per image, padding last), the
    #    first n_ref of each, class after class; the training augmentation on them.
    members = [torch.nonzero(split_labels == c).flatten() for c in range(num_classes)]
    keys = torch.rand(num_classes, max(len(m) for m in members))
    rows = []
    for c, m in enumerate(members):
        keys[c, len(m):] = 2.0
        rows.append(m[keys[c].argsort()[:n_ref]])
    rows = torch.cat(rows)
    ref_x = augment_batch(split_images[rows].float() / 255, "crop_flip", None)
    ref_y = split_labels[rows]
    # 2. Their PGD copies (eval mode); references = [clean; PGD], labels [y_ref; y_ref].
    ref_x = torch.cat([ref_x, pgd_ce_eval(ref_x, ref_y, eps_pgd)])
    ref_y = torch.cat([ref_y, ref_y])
    # 3. Clean forward in eval mode without gradient (include-self only, off).
    model.eval()
    with torch.no_grad():
        features(x)
    # 4. Train mode; the reference features keep their graph.
    model.train()
    ref_feats = features(ref_x)
    # 5. ASK maximisation in train mode, unclipped start, against the detached references.
    x_ask = x + (2 * torch.rand(x.shape) - 1) * eps_ask
    for _ in range(steps):
        x_ask = x_ask.detach().requires_grad_(True)
        loss = ask_instance(features(x_ask), y, ref_feats.detach(), ref_y)
        (grad,) = torch.autograd.grad(loss, x_ask)
        x_ask = x_ask.detach() + step_size * grad.sign()
        x_ask = (x + (x_ask - x).clamp(-eps_ask, eps_ask)).clamp(0, 1)
    x_ask = x_ask.detach()
    # 6. x_PGD in eval mode.
    x_pgd = pgd_ce_eval(x, y, eps_pgd)
    # 7. Train mode: x_PGD, the clean batch (batch-norm statistics only), x_ASK.
    model.train()
    logits = model(x_pgd)
    with torch.no_grad():
        model(x)
    feats_ask = features(x_ask)
    # 8. The loss.
    return F.cross_entropy(logits, y) + beta * ask_instance(feats_ask, y, ref_feats, ref_y)


def small_cnn() -> nn.Module:
    """smallcnn, whose feature passes stop at the layer asked for, with batch norm in block3 after LAYER."""
    torch.manual_seed(0)
    return build_model("smallcnn", NUM_CLASSES, 3, 8, (0.5,) * 3, (0.25,) * 3, width=4)


@pytest.mark.parametrize(("make_model", "temperature", "beta"), [
    (lambda: TinyNet(NUM_CLASSES, seed=0), 0.1, 1.0),
    # Batch norm after the layer (the authors' forward runs on to the logits, so it sees every
    # train-mode pass), and a temperature at which the 1e-6 in their log decides the loss.
    (small_cnn, 0.005, 1.0),
    # A weight other than 1: the ASK term is scaled, the CE term is not.
    (lambda: TinyNet(NUM_CLASSES, seed=0), 0.1, 2.5),
], ids=["tinynet", "smallcnn-past-the-layer", "tinynet-beta2.5"])
def test_authors_preset_is_the_authors_step(make_model, temperature, beta) -> None:
    split = make_split()
    x, y = make_batch()
    base = make_model().train()
    ours_model, theirs_model = copy.deepcopy(base), copy.deepcopy(base)
    defense = make_defense(ours_model, split, temperature=temperature, beta=beta)
    assert isinstance(defense, AuthorsASKDefense)

    torch.manual_seed(5)
    ours, _ = defense.loss(x, y)
    ours.backward()
    after_ours = torch.rand(3)  # the same random numbers were consumed

    torch.manual_seed(5)
    theirs = authors_ask_def_step(theirs_model, split.images, split.labels, x, y, num_classes=NUM_CLASSES,
                                  n_ref=N_REF, layer=LAYER, eps_pgd=4 / 255, eps_ask=8 / 255,
                                  step_size=3 / 255, steps=3, temperature=temperature, beta=beta)
    theirs.backward()
    assert torch.equal(after_ours, torch.rand(3))

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(ours_model.named_parameters(), theirs_model.parameters(), strict=True):
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
        # float32 rounding, scaled by 1 / T: ~2e-6 of the largest entry at T = 0.005
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5 * float(q.grad.abs().max()), msg=name)
    # Reference pass + 3 ASK steps + x_PGD, clean, x_ASK: 7 train-mode passes in both, in every
    # batch-norm layer, those after the layer included.
    assert {int(m.num_batches_tracked) for m in ours_model.modules() if isinstance(m, nn.BatchNorm2d)} == {7}
    for a, b in zip(bn_state(ours_model), bn_state(theirs_model), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours_model.training and all(m.training for m in ours_model.modules())


def test_our_variant_stops_its_feature_passes_at_the_layer() -> None:
    """full_forward=false: batch norm after the layer sees only x_PGD and the clean batch."""
    model = small_cnn().train()
    defense = make_defense(model, make_split(), full_forward=False)
    torch.manual_seed(5)
    defense.loss(*make_batch())[0].backward()
    counts = [int(m.num_batches_tracked) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert counts == [7, 7, 7, 2, 2]  # block1, block2 (x2) up to the layer; block3 (x2) after it


# ----------------------------------------------------------------------------- each switch
def test_reference_grad_adds_exactly_the_path_through_the_references() -> None:
    split = make_split()
    x, y = make_batch()
    base = TinyNet(NUM_CLASSES, seed=0).train()
    losses, grads = {}, {}
    for flag in (True, False):
        model = copy.deepcopy(base)
        defense = make_defense(model, split, reference_grad=flag)
        torch.manual_seed(5)
        loss, _ = defense.loss(x, y)
        loss.backward()
        losses[flag], grads[flag] = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
        # The references carry a graph back to the weights only with the switch on.
        torch.manual_seed(5)
        references = make_defense(copy.deepcopy(base).train(), split, reference_grad=flag).inner(x, y).references
        assert (references.grad_fn is not None) == flag and references.requires_grad == flag
    # The forward values are the same; only the gradient differs, by the ASK term's path through
    # h_l(references): the layers up to l, never the head beyond it.
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=0)
    torch.testing.assert_close(grads[True]["head.weight"], grads[False]["head.weight"])
    model = copy.deepcopy(base).train()
    defense = make_defense(model, split)
    torch.manual_seed(5)
    points = defense.inner(x, y)
    # The ASK term with h_l(x_ASK) held fixed: its gradient flows through the references alone.
    through_refs = defense.margin(defense.features(points.x_ask).detach(), y, points.references)
    term = defense.beta * loss_from_margin(through_refs, defense.kind).mean()
    names = [n for n, _ in model.named_parameters() if n != "head.weight"]
    path = torch.autograd.grad(term, [dict(model.named_parameters())[n] for n in names])
    for name, g in zip(names, path, strict=True):
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(grads[True][name], grads[False][name] + g, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reference_mode_decides_the_batch_norm_of_the_reference_pass(mode: str) -> None:
    split = make_split()
    model = TinyNet(NUM_CLASSES, seed=0).train()
    defense = make_defense(model, split, reference_mode=mode, reference_grad=False)
    before, snapshot = bn_state(model), copy.deepcopy(model)
    torch.manual_seed(0)
    images, labels, references = defense.reference_set(torch.device("cpu"), torch.float32)
    # The PGD copies run in eval mode (pgd_mode), so the feature pass alone may touch batch norm.
    assert tracked(model) - tracked(snapshot) == (1 if mode == "train" else 0)
    assert torch.equal(before[0], bn_state(model)[0]) == (mode == "eval")
    assert all(m.training for m in model.modules())
    order = torch.argsort(labels, stable=True)
    with torch.no_grad():
        # Eval first: a train-mode pass, even without gradient, moves the running statistics.
        running_stats = snapshot.eval().forward_features(images, [LAYER])[LAYER].flatten(1)[order]
        batch_stats = snapshot.train().forward_features(images, [LAYER])[LAYER].flatten(1)[order]
    flat = references.reshape(len(labels), -1)
    own, other = (batch_stats, running_stats) if mode == "train" else (running_stats, batch_stats)
    torch.testing.assert_close(flat, own)
    assert float((flat - other).abs().max()) > 1e-3


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ask_mode_decides_the_batch_norm_of_the_inner_loop(mode: str) -> None:
    model = TinyNet(NUM_CLASSES, seed=0).train()
    defense = make_defense(model, make_split(), ask_mode=mode)
    x, y = make_batch()
    references = torch.rand(NUM_CLASSES, 2 * N_REF, 8 * 2 * 2)
    before = bn_state(model)
    torch.manual_seed(0)
    x_ask = defense.ask_maximise(x, y, references)
    # Train mode: batch statistics and one running-statistics update per step; eval: none.
    assert tracked(model) - int(before[2]) == (PARAMS["steps"] if mode == "train" else 0)
    assert torch.equal(before[0], bn_state(model)[0]) == (mode == "eval")
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert 0 < float((x_ask - x).abs().max()) <= 8 / 255 + 1e-6


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_pgd_mode_decides_the_batch_norm_of_both_pgd_loops(mode: str) -> None:
    model = TinyNet(NUM_CLASSES, seed=0).train()
    # Everything else in eval mode, so only the two PGD-CE loops (references, batch) can count.
    defense = make_defense(model, make_split(), pgd_mode=mode, reference_mode="eval", ask_mode="eval")
    x, y = make_batch()
    torch.manual_seed(0)
    points = defense.inner(x, y)
    assert tracked(model) == (2 * PARAMS["steps"] if mode == "train" else 0)
    assert all(m.training for m in model.modules())
    assert 0 < float((points.x_pgd - x).abs().max()) <= 4 / 255 + 1e-6


@pytest.mark.parametrize("clip", [True, False])
def test_ask_start_clip_decides_whether_the_start_leaves_the_unit_box(clip: bool) -> None:
    ones = torch.ones(4, 3, 8, 8)
    labels = torch.arange(4) % NUM_CLASSES
    # The shared loop: the first iterate the objective sees, on images at the top of [0, 1].
    seen = []

    def objective(x_adv: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        seen.append(x_adv.detach().clone())
        return x_adv.flatten(1).sum(1)

    threat = ThreatModel(eps=0.1, steps=2, step_size=0.05)
    torch.manual_seed(0)
    result = pgd_maximise(objective, ones, labels, threat, clip_start=clip)
    assert (float(seen[0].max()) > 1) == (not clip)
    assert float(seen[0].min()) < 1 and float((seen[0] - ones).abs().max()) <= 0.1
    assert float(seen[1].max()) <= 1 and float(result.adversarial.max()) <= 1  # every step projects

    # The defence's inner ASK loop: the first input its network sees.
    model = TinyNet(NUM_CLASSES, seed=0).train()
    defense = make_defense(model, make_split(), ask_start_clip=clip)
    inputs = []
    handle = model.conv1.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().clone()))
    try:
        torch.manual_seed(0)
        x_ask = defense.ask_maximise(ones, labels, torch.rand(NUM_CLASSES, 2 * N_REF, 32))
    finally:
        handle.remove()
    assert len(inputs) == PARAMS["steps"]
    assert (float(inputs[0].max()) > 1) == (not clip)
    assert float(inputs[1].max()) <= 1 and float(x_ask.max()) <= 1


@pytest.mark.parametrize("clean_pass", [True, False])
def test_clean_pass_is_one_train_mode_forward_of_the_clean_batch(clean_pass: bool) -> None:
    model = TinyNet(NUM_CLASSES, seed=0).train()
    defense = make_defense(model, make_split(), clean_pass=clean_pass)
    x, y = make_batch()
    passes = []  # (input, train mode, gradient recorded) of every forward through the network

    def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        passes.append((args[0].detach().clone(), module.training, torch.is_grad_enabled()))

    handle = model.conv1.register_forward_pre_hook(record)
    try:
        torch.manual_seed(0)
        defense.loss(x, y)
    finally:
        handle.remove()
    clean = [(train, grad) for image, train, grad in passes if torch.equal(image, x)]
    assert clean == ([(True, False)] if clean_pass else [])
    # Reference pass + ASK steps + x_PGD (+ clean) + x_ASK, each one batch-norm update.
    assert tracked(model) == 1 + PARAMS["steps"] + 2 + int(clean_pass)
    outer = [image for image, train, _ in passes if train][-3:]
    if clean_pass:  # between the x_PGD pass and the x_ASK pass, as in the authors' step 7
        assert torch.equal(outer[1], x)
        assert float((outer[0] - x).abs().max()) <= 4 / 255 + 1e-6
        assert float((outer[2] - x).abs().max()) > 4 / 255


@pytest.mark.parametrize("augmented", [True, False])
def test_augment_references_applies_the_training_augmentation(augmented: bool) -> None:
    split = make_split()
    model = TinyNet(NUM_CLASSES, seed=0).train()
    defense = make_defense(model, split, augment_references=augmented)
    torch.manual_seed(3)
    ref_images = defense.inner(*make_batch()).ref_images
    # The same draw from a twin sampler, then (or not) the crop + flip with the next random numbers.
    torch.manual_seed(3)
    raw = to_float(split.images[ReferenceSampler(split, NUM_CLASSES, N_REF, "cycle").draw().reshape(-1)])
    clean = ref_images[:NUM_CLASSES * N_REF]
    if augmented:
        assert torch.equal(clean, augment_batch(raw, "crop_flip"))
        assert not torch.equal(clean, raw)
    else:
        assert torch.equal(clean, raw)


def test_bad_switch_values_are_config_errors() -> None:
    model, split = TinyNet(NUM_CLASSES, seed=0), make_split()
    with pytest.raises(ConfigError, match=r"augment_references=true but dataset.augment=none"):
        make_defense(model, split, augment="none")  # the preset's own switch
    make_defense(model, split, augment="none", augment_references=False)  # fine without it
    with pytest.raises(ConfigError, match=r"ask_mode='sometimes' is not one of train, eval"):
        make_defense(model, split, ask_mode="sometimes")
    with pytest.raises(ConfigError, match=r"reference_grad='yes' must be true or false"):
        make_defense(model, split, reference_grad="yes")


def test_cycle_walks_each_class_without_repeats_and_resumes_exactly() -> None:
    counts = (6, 4, 5)
    split = make_split(counts)
    sampler = ReferenceSampler(split, NUM_CLASSES, N_REF, "cycle")
    torch.manual_seed(0)
    draws = [sampler.draw() for _ in range(6)]
    for c, count in enumerate(counts):
        per_cycle = count // N_REF  # a class is spent when fewer than n_ref images are left
        walks = [torch.cat([d[c] for d in draws[i:i + per_cycle]]).tolist()
                 for i in range(0, 6 - per_cycle + 1, per_cycle)]
        for walk in walks:
            assert len(set(walk)) == per_cycle * N_REF  # no repeat within one walk through the class
            assert all(int(split.labels[r]) == c for r in walk)
            if count % N_REF == 0:
                assert sorted(walk) == torch.nonzero(split.labels == c).flatten().tolist()
    # Mid-walk draws take no random numbers; only a reshuffle does.
    sampler = ReferenceSampler(split, NUM_CLASSES, N_REF, "cycle")
    sampler.draw()
    rng = torch.get_rng_state()
    sampler.draw()
    assert torch.equal(rng, torch.get_rng_state())
    sampler.draw()  # classes 1 and 2 (4 and 5 images) are spent: a reshuffle
    assert not torch.equal(rng, torch.get_rng_state())

    # state_dict and the global random state resume the walk exactly, through a weights-only save.
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    rng = torch.get_rng_state()
    straight = [sampler.draw() for _ in range(5)]
    resumed = ReferenceSampler(split, NUM_CLASSES, N_REF, "cycle")
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    torch.set_rng_state(rng)
    assert all(torch.equal(a, b) for a, b in zip(straight, [resumed.draw() for _ in range(5)], strict=True))
    fresh = ReferenceSampler(split, NUM_CLASSES, N_REF, "cycle")  # without the state: another walk
    torch.set_rng_state(rng)
    assert not all(torch.equal(a, b) for a, b in zip(straight, [fresh.draw() for _ in range(5)], strict=True))


# ----------------------------------------------------------------------------- memory-bounded passes
def record_batch_sizes(model: nn.Module) -> list[int]:
    """Wrap ``model.forward_features`` (every pass goes through it) to record each batch's size."""
    sizes: list[int] = []
    forward_features = model.forward_features

    def recording(images, *args, **kwargs):
        sizes.append(len(images))
        return forward_features(images, *args, **kwargs)

    model.forward_features = recording
    return sizes


@pytest.mark.parametrize("name", ["ask_def", "ask_def_authors"])
def test_reference_passes_in_pieces_change_nothing(name: str) -> None:
    """reference_chunk=1 (each reference image alone through its PGD copy and, in eval mode, its
    feature pass) against one pass for all: the same references, inner points, loss and gradients,
    and the same random numbers consumed (the PGD start is drawn once for the whole set)."""
    split = make_split()
    x, y = make_batch()
    base = TinyNet(NUM_CLASSES, seed=0).train()
    outcomes = {}
    for chunk in (1, 1000):
        model = copy.deepcopy(base)
        sizes = record_batch_sizes(model)
        defense = make_defense(model, split, name=name, reference_chunk=chunk)
        torch.manual_seed(5)
        points = defense.inner(x, y)
        loss, _ = defense.loss(x, y)
        loss.backward()
        outcomes[chunk] = (points, loss.detach(), [p.grad.clone() for p in model.parameters()], torch.rand(3), sizes)
    (pieces, loss_pieces, grads_pieces, rng_pieces, sizes_pieces) = outcomes[1]
    (whole, loss_whole, grads_whole, rng_whole, sizes_whole) = outcomes[1000]
    references = 2 * NUM_CLASSES * N_REF
    assert 1 in sizes_pieces and max(sizes_pieces) == (references if name == "ask_def_authors" else len(x))
    assert references in sizes_whole  # the feature pass of all references at once
    assert torch.equal(rng_pieces, rng_whole)
    for got, want in zip(pieces, whole, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_pieces, loss_whole, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_pieces, grads_whole, strict=True):
        assert float(want.abs().max()) > 0
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_reference_chunk_must_be_a_positive_integer() -> None:
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="reference_chunk"):
            make_defense(TinyNet(NUM_CLASSES), make_split(), reference_chunk=bad)
