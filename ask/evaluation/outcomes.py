"""What an evaluation counts and concludes: per (attack, victim) tallies, per-point outcomes, the
rows of the result table, the per-point worst case over the attacks and the sanity warnings.

Nothing here runs an attack; :func:`ask.evaluation.evaluate.evaluate` feeds it batch by batch.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ask.constants import ANY_ATTACK


@dataclass
class Tally:
    """One (attack, victim)'s counts over the points so far."""

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
class AttackStats:
    """One attack's time, perturbation norms and never-moved points over the points so far."""

    seconds: float = 0.0
    linf: list[Tensor] = field(default_factory=list)
    l2: list[Tensor] = field(default_factory=list)
    zero_grad_points: int = 0


@dataclass
class PointOutcomes:
    """Per point, in the order evaluated: did each victim get it right on x, and on each attack's x'.

    ``clean_ok[victim]`` and ``adv_ok[(attack, victim)]`` are boolean CPU vectors over the points.
    """

    clean_ok: dict[str, Tensor]
    adv_ok: dict[tuple[str, str], Tensor]

    @property
    def attacks(self) -> list[str]:
        return list(dict.fromkeys(attack for attack, _ in self.adv_ok))

    @property
    def victims(self) -> list[str]:
        return list(self.clean_ok)

    def to_csv(self, indices: Tensor, labels: Tensor) -> str:
        """One line per (point, victim): ``point`` (its position in the split the points were drawn
        from, ``indices``), ``label``, ``victim``, ``clean`` and one column per attack, 1 where the
        victim was right and 0 where it was wrong."""
        attacks = self.attacks
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["point", "label", "victim", "clean", *attacks])
        columns = {victim: torch.stack([self.clean_ok[victim], *(self.adv_ok[(a, victim)] for a in attacks)], 1)
                   .int().tolist() for victim in self.victims}
        for i, (point, label) in enumerate(zip(indices.tolist(), labels.tolist(), strict=True)):
            for victim, flags in columns.items():
                writer.writerow([point, label, victim, *flags[i]])
        return text.getvalue()


def worst_case(clean_ok: Tensor, adv_ok: dict[str, Tensor]) -> dict[str, Any]:
    """The per-point worst case over ``adv_ok``'s attacks on one victim (AutoAttack's rule).

    ``clean_ok`` flags the points the victim gets right on x, ``adv_ok[attack]`` those it gets
    right on that attack's x' (boolean vectors over the same points). A point is robust only if it
    is right on x and on every x'; it is *broken* when right on x and wrong on some x'. Returns
    ``clean_acc``, ``robust_acc`` (robust points / points), ``asr`` (broken / right on x, None
    when no point is right on x), ``n_points``, ``attacks`` (the names, in order), ``broken_by``
    (per attack, the points right on x that it made wrong), ``only_by`` (per attack, the points
    it broke and no other attack did) and ``times_broken`` (entry k: the points right on x that
    exactly k of the attacks broke, k = 0 .. number of attacks; entry 0 is the robust points).
    """
    n = int(clean_ok.numel())
    wrong = {name: clean_ok & ~ok for name, ok in adv_ok.items()}  # broken by that attack
    times_broken = torch.stack(list(wrong.values())).sum(0)
    broken = int((times_broken > 0).sum())
    clean_correct = int(clean_ok.sum())
    return {
        "clean_acc": clean_correct / n,
        "robust_acc": (clean_correct - broken) / n,
        "asr": broken / clean_correct if clean_correct else None,
        "n_points": n,
        "attacks": list(adv_ok),
        "broken_by": {name: int(w.sum()) for name, w in wrong.items()},
        "only_by": {name: int((w & (times_broken == 1)).sum()) for name, w in wrong.items()},
        "times_broken": torch.bincount(times_broken[clean_ok], minlength=len(adv_ok) + 1).tolist(),
    }


def sanity_warnings(rows: list[dict[str, Any]], white_box: dict[str, set[str]]) -> list[str]:
    """AutoAttack-style checks that flag an evaluation to distrust.

    ``white_box[attack]`` names the victims the attack optimises against directly (the network for
    PGD, the kNN family for attacks on features). A transfer attack that beats every white-box
    attack on a victim, or points whose input gradient was exactly zero throughout, usually mean
    gradient masking or an under-tuned attack, not robustness. Worst-case (``any``) rows are
    left out.
    """
    warnings = []
    rows = [row for row in rows if row["attack"] != ANY_ATTACK]  # a combination, not an attack to check
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


def attack_rows(tallies: dict[tuple[str, str], Tally], stats: dict[str, AttackStats], victims: list[str],
                threat: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (attack, victim), attacks in ``stats``' order: accuracies, ASR, norms and timings.

    ``threat`` holds the run's ``eps``, ``norm`` and ``steps``, copied into every row.
    """
    rows = []
    for name in stats:
        linf, l2 = torch.cat(stats[name].linf), torch.cat(stats[name].l2)
        seconds = stats[name].seconds
        for victim in victims:
            tally = tallies[(name, victim)]
            row = {
                "attack": name,
                "victim": victim,
                "clean_acc": tally.clean_correct / tally.n,
                "robust_acc": tally.robust_correct / tally.n,
                "asr": tally.successes / tally.clean_correct if tally.clean_correct else None,
                "n_points": tally.n,
                "seconds": seconds,
                **threat,
                "mean_linf": float(linf.mean()),
                "max_linf": float(linf.max()),
                "mean_l2": float(l2.mean()),
                "max_l2": float(l2.max()),
                "images_per_second": tally.n / seconds if seconds > 0 else None,
                "zero_grad_points": stats[name].zero_grad_points,
            }
            if victim == "dknn":
                row["mean_credibility_clean"] = tally.clean_credibility / tally.n
                row["mean_credibility_adv"] = tally.adv_credibility / tally.n
            rows.append(row)
    return rows


def worst_case_rows(outcomes: PointOutcomes, seconds: float, threat: dict[str, Any]) -> list[dict[str, Any]]:
    """One :data:`ANY_ATTACK` row per victim (see :func:`worst_case`), with the attacks' summed
    ``seconds`` and ``threat`` (the run's ``eps``, ``norm`` and ``steps``)."""
    rows = []
    for victim in outcomes.victims:
        worst = worst_case(outcomes.clean_ok[victim],
                           {name: outcomes.adv_ok[(name, victim)] for name in outcomes.attacks})
        n = worst.pop("n_points")
        rows.append({
            "attack": ANY_ATTACK, "victim": victim,
            **{key: worst.pop(key) for key in ("clean_acc", "robust_acc", "asr")},
            "n_points": n, "seconds": seconds,
            **threat,
            "images_per_second": n / seconds if seconds > 0 else None,
            **worst,  # attacks, broken_by, only_by, times_broken
        })
    return rows
