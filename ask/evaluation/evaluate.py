"""Evaluate every selected attack on every selected victim, on the same test points.

For each batch, each attack crafts x' once (against its own objective); every victim is then
scored on x and on x'. The counts give clean accuracy, robust accuracy, attack success rate
(the fraction of the points a victim got right on x that it gets wrong on x') and perturbation
norms, all with the number of points evaluated.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ask.attacks import ThreatModel, build_attack
from ask.config.schema import RunConfig
from ask.data import ImageSplit, to_float
from ask.errors import ConfigError
from ask.knn import DkNNClassifier, DkNNVoteClassifier, KNNClassifier, ReferenceStore
from ask.models import FeatureModel

log = logging.getLogger(__name__)


@dataclass
class Victim:
    """A classifier under attack: a name and a batch -> (predicted labels, credibility or None)."""

    name: str
    judge: Callable[[Tensor], tuple[Tensor, Tensor | None]]


def _labels_only(predict: Callable[[Tensor], Tensor]) -> Callable[[Tensor], tuple[Tensor, None]]:
    return lambda x: (predict(x), None)


def build_victims(names: list[str], model: FeatureModel, store: ReferenceStore, run: RunConfig,
                  calibration: ImageSplit | None = None) -> list[Victim]:
    """The classifiers to score. DkNN is calibrated on ``calibration``, a split held out from the pool."""
    victims = []
    for name in names:
        if name == "dnn":
            victims.append(Victim("dnn", _labels_only(lambda x: model(x).argmax(1))))
        elif name == "knn":
            # The kNN victim votes on the first listed layer; DkNN uses them all.
            knn = KNNClassifier(model, store, run.knn.layers[0], run.knn.k)
            victims.append(Victim("knn", _labels_only(knn.predict)))
        elif name == "dknn":
            dknn = DkNNClassifier(
                model, store, run.knn.dknn_layers, run.knn.k,
                calibration_images=None if calibration is None else calibration.images,
                calibration_labels=None if calibration is None else calibration.labels,
                batch_size=run.knn.batch_size,
            )
            # Its labels equal the summed vote's (p_j falls as alpha_j rises); what DkNN adds is
            # credibility, the p-value of the prediction, which a deployment thresholds to reject.
            victims.append(Victim("dknn", lambda x, dknn=dknn: dknn.predict_with_confidence(x)[:2]))
        elif name == "dknn_vote":
            vote = DkNNVoteClassifier(model, store, run.knn.dknn_layers, run.knn.k)
            victims.append(Victim("dknn_vote", _labels_only(vote.predict)))
        else:
            raise ConfigError(f"unknown victim '{name}'; choose from dnn, knn, dknn, dknn_vote")
    return victims


@dataclass
class _Tally:
    n: int = 0
    clean_correct: int = 0
    robust_correct: int = 0
    successes: int = 0
    clean_credibility: float = 0.0
    adv_credibility: float = 0.0

    def add(self, clean_ok: Tensor, adv_ok: Tensor, clean_cred: Tensor | None, adv_cred: Tensor | None) -> None:
        self.n += int(clean_ok.numel())
        self.clean_correct += int(clean_ok.sum())
        self.robust_correct += int(adv_ok.sum())
        self.successes += int((clean_ok & ~adv_ok).sum())
        if clean_cred is not None and adv_cred is not None:
            self.clean_credibility += float(clean_cred.sum())
            self.adv_credibility += float(adv_cred.sum())


@dataclass
class _AttackStats:
    seconds: float = 0.0
    linf: list[Tensor] = field(default_factory=list)
    l2: list[Tensor] = field(default_factory=list)
    zero_grad_points: int = 0


def select_points(split: ImageSplit, n_points: int | None, seed: int) -> ImageSplit:
    """The first ``n_points`` of a seeded shuffle (folders are class-sorted; a prefix would be one class)."""
    if n_points is None or n_points >= len(split):
        return split
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(split), generator=generator)[:n_points].sort().values
    return split.subset(index)


def attack_seed(seed: int, attack_name: str) -> int:
    """A per-attack seed, stable across runs and independent of the attack's position in the list."""
    return seed * 1_000_003 + zlib.crc32(attack_name.encode())


def sanity_warnings(rows: list[dict[str, Any]], white_box: dict[str, set[str]]) -> list[str]:
    """AutoAttack-style checks that flag an evaluation to distrust.

    ``white_box[attack]`` names the victims the attack optimises against directly (the network for
    PGD, the kNN family for attacks on features). A transfer attack that beats every white-box
    attack on a victim, or points whose input gradient was exactly zero throughout, usually mean
    gradient masking or an under-tuned attack, not robustness.
    """
    warnings = []
    by_victim: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_victim.setdefault(row["victim"], []).append(row)
    for victim, victim_rows in by_victim.items():
        direct = [r for r in victim_rows if victim in white_box[r["attack"]] and r["asr"] is not None]
        if not direct:
            continue
        best = max(direct, key=lambda r: r["asr"])
        for row in victim_rows:
            if victim not in white_box[row["attack"]] and row["asr"] is not None and row["asr"] > best["asr"]:
                warnings.append(
                    f"transfer attack '{row['attack']}' (ASR {row['asr']:.1%}) beats every white-box attack on "
                    f"victim '{victim}' (best: '{best['attack']}', {best['asr']:.1%}): suspect gradient masking "
                    "or an under-tuned attack"
                )
    seen = set()
    for row in rows:
        if row["zero_grad_points"] and row["attack"] not in seen:
            seen.add(row["attack"])
            warnings.append(
                f"attack '{row['attack']}': the input gradient was exactly zero at every step for "
                f"{row['zero_grad_points']} of {row['n_points']} points (saturated loss or gradient masking)"
            )
    return warnings


WHITE_BOX_FEATURE_VICTIMS = {"knn", "dknn", "dknn_vote"}


def evaluate(run: RunConfig, model: FeatureModel, points: ImageSplit, store: ReferenceStore,
             device: torch.device, calibration: ImageSplit | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of the result table, one per (attack, victim), and the sanity warnings."""
    assert run.attack is not None and run.eval is not None
    threat = ThreatModel(
        eps=run.attack.eps, norm=run.attack.norm, steps=run.attack.steps,
        step_size=run.attack.step_size, random_start=run.attack.random_start,
    )
    model.eval()
    victims = build_victims(run.eval.victims, model, store, run, calibration)
    attacks = {}
    for name, hyper in run.attack.methods.items():
        generator = torch.Generator(device=device).manual_seed(attack_seed(run.seed, name))
        attacks[name] = build_attack(name, model, threat, store=store, generator=generator, **dict(hyper))

    tallies = {(a, v.name): _Tally() for a in attacks for v in victims}
    stats = {a: _AttackStats() for a in attacks}
    batch_size = run.eval.batch_size
    n_batches = (len(points) + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches * len(attacks), desc="attacking", disable=not run.progress)
    for start in range(0, len(points), batch_size):
        images = to_float(points.images[start:start + batch_size].to(device))
        labels = points.labels[start:start + batch_size].to(device)
        with torch.no_grad():
            clean = {v.name: v.judge(images) for v in victims}
        for name, attack in attacks.items():
            started = time.perf_counter()
            adversarial = attack(images, labels)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stats[name].seconds += time.perf_counter() - started
            delta = (adversarial - images).flatten(1)
            stats[name].linf.append(delta.abs().amax(1).cpu())
            stats[name].l2.append(delta.norm(dim=1).cpu())
            if attack.last_result is not None:
                stats[name].zero_grad_points += int(attack.last_result.zero_grad.sum())
            with torch.no_grad():
                for victim in victims:
                    clean_pred, clean_cred = clean[victim.name]
                    adv_pred, adv_cred = victim.judge(adversarial)
                    tallies[(name, victim.name)].add(clean_pred == labels, adv_pred == labels, clean_cred, adv_cred)
            bar.update(1)
        if not run.progress:  # a sweep's log still shows how far each job has got
            done = min(start + batch_size, len(points))
            log.info("attacked %d/%d points (%s)", done, len(points),
                     ", ".join(f"{name} {stats[name].seconds:.0f} s" for name in attacks))
    bar.close()

    rows = []
    for name in attacks:
        linf, l2 = torch.cat(stats[name].linf), torch.cat(stats[name].l2)
        seconds = stats[name].seconds
        for victim in victims:
            tally = tallies[(name, victim.name)]
            row = {
                "attack": name,
                "victim": victim.name,
                "clean_acc": tally.clean_correct / tally.n,
                "robust_acc": tally.robust_correct / tally.n,
                "asr": tally.successes / tally.clean_correct if tally.clean_correct else None,
                "n_points": tally.n,
                "seconds": seconds,
                "eps": run.attack.eps,
                "norm": run.attack.norm,
                "steps": run.attack.steps,
                "mean_linf": float(linf.mean()),
                "max_linf": float(linf.max()),
                "mean_l2": float(l2.mean()),
                "max_l2": float(l2.max()),
                "images_per_second": tally.n / seconds if seconds > 0 else None,
                "zero_grad_points": stats[name].zero_grad_points,
            }
            if victim.name == "dknn":
                row["mean_credibility_clean"] = tally.clean_credibility / tally.n
                row["mean_credibility_adv"] = tally.adv_credibility / tally.n
            rows.append(row)
    # Attacks on kNN features are white-box for the kNN family; the rest (PGD) for the network.
    white_box = {name: WHITE_BOX_FEATURE_VICTIMS if attack.needs_store else {"dnn"}
                 for name, attack in attacks.items()}
    warnings = sanity_warnings(rows, white_box)
    for warning in warnings:
        log.warning(warning)
    return rows, warnings
