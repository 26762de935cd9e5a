"""Evaluate every selected attack on every selected victim, on the same test points.

For each batch, each attack crafts x' once (against its own objective); every victim is then
scored on x and on x'. The counts give clean accuracy, robust accuracy, attack success rate
(the fraction of the points a victim got right on x that it gets wrong on x') and perturbation
norms, all with the number of points evaluated.

Each victim also gets an ``attack: "any"`` row, the per-point worst case (AutoAttack's rule): a
point is robust only if the victim gets it right on x and on every attack's x'. It comes from the
per-point correctness flags kept for every (attack, victim) (:class:`PointOutcomes`, which the
caller can save), not from the counts, which cannot tell which points different attacks broke.
With one attack it repeats that attack's row, except that the points wrong on x which x' happens
to get right are not robust; every run has the same rows to compare.

An evaluation can be resumed: after every batch the counts, the per-point flags, the norms so far
and every random state an attack draws from are saved atomically (:func:`evaluate`'s
``state_path``), keyed by :func:`evaluation_key`. A rerun with the same key continues at the next
batch and ends with the same numbers as an uninterrupted run; only the timings differ.

This module is the batch loop; the counts, rows and worst case are :mod:`ask.evaluation.outcomes`'s,
the saved state and its key :mod:`ask.evaluation.state`'s.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ask.attacks import Attack
from ask.config.schema import RunConfig
from ask.data import ImageSplit, to_float
from ask.evaluation.outcomes import (
    WHITE_BOX_FEATURE_VICTIMS,
    AttackStats,
    PointOutcomes,
    Tally,
    attack_rows,
    sanity_warnings,
    worst_case,
    worst_case_rows,
)
from ask.evaluation.state import (
    Progress,
    StaleState,
    evaluation_key,
    joined_flags,
    restored_progress,
    saved_state,
)
from ask.knn import ReferenceStore
from ask.models import FeatureModel
from ask.utils import precision
from ask.utils.io import LoadError, atomic_save, safe_load
from ask.utils.runtime import to_device
from ask.wiring import build_attacks, build_threat_model, build_victims

__all__ = ["PointOutcomes", "evaluate", "evaluation_key", "sanity_warnings", "worst_case"]

log = logging.getLogger(__name__)


def _load_progress(state_path: Path, key: str, n_batches: int, n_points: int, batch_size: int,
                   attacks: dict[str, Attack], victims: list[str], device: torch.device) -> Progress | None:
    """The progress saved at ``state_path`` when it is this evaluation's, else None (with a warning)."""
    if not state_path.exists():
        return None

    def done(next_batch: int) -> int:
        return min(next_batch * batch_size, n_points)

    try:
        progress = restored_progress(safe_load(state_path), key, n_batches, done, attacks, victims, device)
    except LoadError as error:
        log.warning("%s; starting the evaluation over", error)
        return None
    except StaleState:
        log.warning("ignoring %s: it was saved by an evaluation with another config, checkpoint or point "
                    "set; starting over", state_path)
        return None
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        log.warning("ignoring %s: malformed evaluation state (%s); starting over", state_path, error)
        return None
    log.info("resuming evaluation at batch %d/%d (%d points done)", progress.next_batch + 1, n_batches,
             done(progress.next_batch))
    return progress


def evaluate(run: RunConfig, model: FeatureModel, points: ImageSplit, store: ReferenceStore,
             device: torch.device, calibration: ImageSplit | None = None, *,
             state_path: Path | None = None,
             state_key: str = "") -> tuple[list[dict[str, Any]], list[str], PointOutcomes]:
    """Rows of the result table, one per (attack, victim), the sanity warnings, and the per-point
    outcomes the rows are counted from.

    One worst-case row per victim follows the attacks' rows (``attack`` :data:`ANY_ATTACK`, see
    :func:`worst_case`), with the attacks' summed ``seconds`` and the threat model.

    With ``state_path``, the progress is saved there after every batch and a matching saved state
    (same ``state_key``, see :func:`evaluation_key`) is resumed from; the caller removes the file
    once the results are written.
    """
    assert run.attack is not None and run.eval is not None
    threat = build_threat_model(run)
    model.eval()
    if run.eval.channels_last:
        model.to(memory_format=torch.channels_last)
    amp_dtype = precision.resolve_amp(run.eval.amp, device)
    log.info(precision.describe(run.eval.amp, amp_dtype, device, "attacks"))
    victims = build_victims(run.eval.victims, model, store, run, calibration)
    attacks = build_attacks(run, model, threat, store, device)

    batch_size = run.eval.batch_size
    n_batches = (len(points) + batch_size - 1) // batch_size
    progress = None
    if state_path is not None:
        progress = _load_progress(state_path, state_key, n_batches, len(points), batch_size, attacks,
                                  [v.name for v in victims], device)
    if progress is None:
        progress = Progress(0, {(a, v.name): Tally() for a in attacks for v in victims},
                            {a: AttackStats() for a in attacks}, {v.name: [] for v in victims},
                            {(a, v.name): [] for a in attacks for v in victims})
    tallies, stats = progress.tallies, progress.stats
    bar = tqdm(total=n_batches * len(attacks), initial=progress.next_batch * len(attacks), desc="attacking",
               disable=not run.progress)
    for batch in range(progress.next_batch, n_batches):
        start = batch * batch_size
        images = to_float(to_device(points.images[start:start + batch_size], device))
        labels = to_device(points.labels[start:start + batch_size], device)
        # Attacks search the same clean points and victims the same adversarial ones: one faiss
        # search each, shared for the batch (same neighbours, see ReferenceStore.shared_searches).
        with store.shared_searches():
            with torch.no_grad():
                clean = {v.name: v.judge(images) for v in victims}
            for victim in victims:
                progress.clean_ok[victim.name].append((clean[victim.name][0] == labels).cpu())
            for name, attack in attacks.items():
                started = time.perf_counter()
                with precision.autocast(device, amp_dtype):
                    adversarial = attack(images, labels).float()
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
                        progress.adv_ok[(name, victim.name)].append((adv_pred == labels).cpu())
                bar.update(1)
        if state_path is not None:
            progress.next_batch = batch + 1
            atomic_save(saved_state(state_key, n_batches, progress, attacks, device), state_path)
        if not run.progress:  # a sweep's log still shows how far each job has got
            done = min(start + batch_size, len(points))
            log.info("attacked %d/%d points (%s)", done, len(points),
                     ", ".join(f"{name} {stats[name].seconds:.0f} s" for name in attacks))
    bar.close()

    threat_row = {"eps": run.attack.eps, "norm": run.attack.norm, "steps": run.attack.steps}
    rows = attack_rows(tallies, stats, [victim.name for victim in victims], threat_row)
    # Attacks on kNN features are white-box for the kNN family; the rest (PGD) for the network.
    white_box = {name: WHITE_BOX_FEATURE_VICTIMS if attack.needs_store else {"dnn"}
                 for name, attack in attacks.items()}
    warnings = sanity_warnings(rows, white_box)
    for warning in warnings:
        log.warning(warning)
    outcomes = PointOutcomes(
        clean_ok={victim.name: joined_flags(progress.clean_ok[victim.name]) for victim in victims},
        adv_ok={key: joined_flags(parts) for key, parts in progress.adv_ok.items()},
    )
    rows += worst_case_rows(outcomes, sum(stats[name].seconds for name in attacks), threat_row)
    return rows, warnings, outcomes
