"""Evaluation helpers: point selection, sanity checks, the worst case over attacks and the console table."""

from __future__ import annotations

import torch

from ask.attacks import attack_seed
from ask.data import ImageSplit, select_points
from ask.evaluation.outcomes import sanity_warnings, worst_case
from ask.reporting import format_results_table
from ask.reporting.labels import ANY_ATTACK


def _row(attack: str, victim: str, asr: float | None, zero: int = 0) -> dict:
    return {"attack": attack, "victim": victim, "asr": asr, "zero_grad_points": zero, "n_points": 100,
            "clean_acc": 0.9, "robust_acc": 0.5, "mean_linf": 0.03, "images_per_second": 10.0}


WHITE_BOX = {"ask": {"knn", "dknn"}, "pgd": {"dnn"}}


def test_transfer_beating_white_box_is_flagged() -> None:
    rows = [_row("ask", "knn", 0.30), _row("pgd", "knn", 0.45), _row("ask", "dnn", 0.2), _row("pgd", "dnn", 0.9)]
    (warning,) = sanity_warnings(rows, WHITE_BOX)
    assert "transfer attack 'pgd'" in warning and "victim 'knn'" in warning and "'ask'" in warning


def test_no_warning_when_white_box_wins() -> None:
    rows = [_row("ask", "knn", 0.50), _row("pgd", "knn", 0.45), _row("ask", "dnn", 0.2), _row("pgd", "dnn", 0.9)]
    assert sanity_warnings(rows, WHITE_BOX) == []


def test_zero_gradients_are_flagged_once_per_attack() -> None:
    rows = [_row("ask", "knn", 0.5, zero=7), _row("ask", "dnn", 0.1, zero=7), _row("pgd", "dnn", 0.9)]
    warnings = sanity_warnings(rows, WHITE_BOX)
    assert warnings == ["attack 'ask': the input gradient was exactly zero at every step for 7 of 100 points "
                        "(saturated loss or gradient masking)"]


def test_select_points_is_a_seeded_spread_subset() -> None:
    labels = torch.arange(10).repeat_interleave(20)  # class-sorted, as folders are
    split = ImageSplit(torch.zeros(200, 1, 2, 2, dtype=torch.uint8), labels)
    a, b = select_points(split, 30, seed=0), select_points(split, 30, seed=0)
    assert torch.equal(a.labels, b.labels) and len(a) == 30
    assert len(set(a.labels.tolist())) >= 8  # a prefix would have been two classes
    assert not torch.equal(select_points(split, 30, seed=1).labels, a.labels)
    assert select_points(split, None, seed=0) is split


def test_attack_seed_depends_on_name_not_position() -> None:
    assert attack_seed(0, "ask") != attack_seed(0, "pgd")
    assert attack_seed(3, "ask") == attack_seed(3, "ask")


def test_table_formats_fractions_and_missing_asr() -> None:
    table = format_results_table([_row("ask", "knn", 0.5), _row("pgd", "knn", None)])
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["attack", "victim", "clean", "robust", "ASR"]
    assert "50.0%" in lines[2] and lines[3].split()[4] == "-"


def test_worst_case_counts_a_point_robust_only_if_every_attack_failed() -> None:
    # Eight points: 0-5 right on x; ask breaks 1, 2 and 4, pgd breaks 2 and 3; point 6 is wrong on x
    # but right after both attacks (counted robust by the per-attack rows, never by the worst case).
    clean = torch.tensor([1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    ask = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0], dtype=torch.bool)
    pgd = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    worst = worst_case(clean, {"ask": ask, "pgd": pgd})
    assert worst == {
        "clean_acc": 6 / 8,
        "robust_acc": 2 / 8,  # points 0 and 5
        "asr": 4 / 6,  # points 1-4
        "n_points": 8,
        "attacks": ["ask", "pgd"],
        "broken_by": {"ask": 3, "pgd": 2},
        "only_by": {"ask": 2, "pgd": 1},  # 1 and 4; 3
        "times_broken": [2, 3, 1],  # of the six right on x: 0 and 5 unbroken; 1, 3, 4 once; 2 twice
    }
    assert worst["robust_acc"] <= min(float(ask.float().mean()), float(pgd.float().mean()))
    nothing_right = worst_case(torch.zeros(3, dtype=torch.bool), {"ask": ask[:3], "pgd": pgd[:3]})
    assert nothing_right["asr"] is None and nothing_right["robust_acc"] == 0.0
    assert nothing_right["times_broken"] == [0, 0, 0]
    # One attack: the worst case is that attack's own accuracies.
    alone = worst_case(clean, {"ask": ask})
    assert alone["robust_acc"] == float((clean & ask).float().mean()) == 3 / 8  # 0, 3, 5
    assert alone["asr"] == 3 / 6 and alone["only_by"] == alone["broken_by"] == {"ask": 3}
    assert alone["times_broken"] == [3, 3]


def test_worst_case_rows_are_left_out_of_the_sanity_checks() -> None:
    # An `any` row has no white-box set and no zero-gradient count; it beats every attack by design.
    any_row = {"attack": ANY_ATTACK, "victim": "knn", "asr": 0.99, "n_points": 100, "clean_acc": 0.9,
               "robust_acc": 0.01}
    rows = [_row("ask", "knn", 0.50), _row("pgd", "knn", 0.45), any_row]
    assert sanity_warnings(rows, WHITE_BOX) == []
    table = format_results_table(rows)
    assert table.splitlines()[-1].split() == ["any", "knn", "90.0%", "1.0%", "99.0%", "-", "100", "-"]
