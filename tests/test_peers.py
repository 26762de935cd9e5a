"""Peers as references: our attacks against an independent implementation of the same attack.

torchattacks (a test-only dependency, in the ``dev`` extra) implements PGD-CE as Madry et al.
describe it. Ours steps along the logit margin instead of the cross-entropy, whose gradient has
the same sign, and draws its random start from its own generator rather than the global one.
From the same start, in float64, both give the same adversarial images on every digits test
point. In float32 the two gradients round differently: on a few confident points (softmax of the
true class within ~1e-5 of 1) a pixel whose gradient is near zero flips sign and the iterates
part (1 to 3 points of 540 per seed when this was written).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ask.attacks import ThreatModel, build_attack
from ask.cli.attack import auto_checkpoint
from ask.data import load_dataset, select_points, to_float
from ask.wiring import load_model
from tests.conftest import compose_run

torchattacks = pytest.importorskip("torchattacks", reason="in the dev extra: pip install -e '.[dev]'")

N_POINTS = 540  # the whole digits test split
N_POINTS_FLOAT64 = 100  # float64 convolutions are ten times slower on a CPU


@pytest.fixture(scope="module")
def digits(shared_cache: Path) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float, int, float]:
    """The digits model ask-attack trains on the fly (cached for the session), the test points
    and the default budget (eps, steps, step size)."""
    run = compose_run("attack", [], shared_cache)
    data = load_dataset(run.dataset, run.cache_dir, seed=run.seed, progress=False)
    model = load_model(auto_checkpoint(run, data), run, data, torch.device("cpu"))
    points = select_points(data.test, N_POINTS, run.seed)
    budget = run.attack.eps, run.attack.steps, run.attack.step_size
    return model, to_float(points.images), points.labels, *budget


def _ours(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int,
          step_size: float, seed: int) -> torch.Tensor:
    threat = ThreatModel(eps=eps, norm="linf", steps=steps, step_size=step_size, random_start=True)
    return build_attack("pgd", model, threat, generator=torch.Generator().manual_seed(seed))(images, labels)


def _theirs(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, steps: int,
            step_size: float, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # torchattacks draws its random start from the global generator
    return torchattacks.PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=True)(images, labels)


@pytest.mark.parametrize("eps_name", ["default", "8/255"])
def test_pgd_equals_torchattacks_pgd_on_the_digits_model(digits: tuple, eps_name: str) -> None:
    model, images, labels, default_eps, steps, step_size = digits
    eps = default_eps if eps_name == "default" else 8 / 255
    model64 = copy.deepcopy(model).double()
    images64, labels = images[:N_POINTS_FLOAT64].double(), labels[:N_POINTS_FLOAT64]
    ours = _ours(model64, images64, labels, eps, steps, step_size, seed=5)
    theirs = _theirs(model64, images64, labels, eps, steps, step_size, seed=5)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)

    with torch.no_grad():
        clean_right = (model64(images64).argmax(1) == labels).sum()
        robust_right = (model64(ours).argmax(1) == labels).sum()
    # The comparison means something: the attack breaks points, and the start is part of it
    # (another seed moves pixels by whole steps, so a misaligned start would be caught).
    assert robust_right < clean_right
    other_start = _ours(model64, images64, labels, eps, steps, step_size, seed=6)
    assert (other_start - theirs).abs().max() > step_size / 2


def test_pgd_and_torchattacks_pgd_part_only_on_float32_rounding(digits: tuple) -> None:
    model, images, labels, eps, steps, step_size = digits
    ours = _ours(model, images, labels, eps, steps, step_size, seed=5)
    theirs = _theirs(model, images, labels, eps, steps, step_size, seed=5)
    parted = (ours - theirs).flatten(1).abs().amax(1) > 1e-6
    assert int(parted.sum()) <= N_POINTS // 100
    with torch.no_grad():
        ours_right = (model(ours).argmax(1) == labels).sum()
        theirs_right = (model(theirs).argmax(1) == labels).sum()
    assert abs(int(ours_right) - int(theirs_right)) <= int(parted.sum())
