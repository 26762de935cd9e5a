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
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor
from tqdm.auto import tqdm

from ask.attacks import Attack
from ask.config.schema import EVALUATION_KEY, RunConfig, ignored_settings
from ask.constants import ANY_ATTACK
from ask.data import ImageSplit, to_float
from ask.knn import ReferenceStore
from ask.models import FeatureModel
from ask.utils import precision
from ask.utils.io import LoadError, atomic_save, safe_load
from ask.utils.runtime import to_device
from ask.wiring import build_attacks, build_threat_model, build_victims

log = logging.getLogger(__name__)


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

# ------------------------------------------------------------------------- resumable state
STATE_VERSION = 2  # 2: per-point correctness flags



def evaluation_key(run: RunConfig, checkpoint_digest: str, points: ImageSplit, device: torch.device) -> str:
    """A digest of everything that shapes an evaluation's numbers, to tell a saved state's run apart.

    The resolved config (less the settings the schema marks ``EVALUATION_KEY``: display, where
    caches live, and the checkpoint's path), the checkpoint's content digest,
    the evaluated points themselves (so the selected indices and n_points are covered whatever
    selected them), the device type (generator states and kernels differ between devices) and the
    attacks' resolved precision (``eval.amp=auto`` means bf16 on one machine and fp32 on another).
    """
    config = OmegaConf.to_container(OmegaConf.structured(run), resolve=True)
    assert isinstance(config, dict)
    for dotted in ignored_settings(EVALUATION_KEY):
        *path, name = dotted.split(".")
        node = config
        for part in path:
            node = node.get(part) or {}
        node.pop(name, None)
    sha = hashlib.sha1()
    sha.update(json.dumps(
        {"config": config, "checkpoint": checkpoint_digest, "device": device.type, "version": STATE_VERSION,
         "precision": precision.precision_name(precision.resolve_amp(run.eval.amp, device))},
        sort_keys=True, default=str,
    ).encode())
    sha.update(points.images.numpy().data)  # the buffer itself: no copy of a mapped split
    sha.update(points.labels.numpy().tobytes())
    return sha.hexdigest()[:20]


class _StaleState(Exception):
    """The saved state belongs to another evaluation (or another version of this code)."""


@dataclass
class _Progress:
    """Where an evaluation stands: the next batch, the counts, the per-point flags and the norms so far.

    ``clean_ok[victim]`` and ``adv_ok[(attack, victim)]`` hold, batch by batch, whether the victim
    got each point right on x and on the attack's x' (boolean CPU tensors).
    """

    next_batch: int
    tallies: dict[tuple[str, str], _Tally]
    stats: dict[str, _AttackStats]
    clean_ok: dict[str, list[Tensor]]
    adv_ok: dict[tuple[str, str], list[Tensor]]


def _joined(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.bool)


def _state_dict(key: str, n_batches: int, progress: _Progress, attacks: dict[str, Attack],
                device: torch.device) -> dict[str, Any]:
    """Plain data only (tensors, numbers, strings), so ``weights_only`` loading accepts it."""
    tallies: dict[str, dict[str, Any]] = {}
    for (attack, victim), tally in progress.tallies.items():
        tallies.setdefault(attack, {})[victim] = asdict(tally)
    adv_ok: dict[str, dict[str, Tensor]] = {}
    for (attack, victim), parts in progress.adv_ok.items():
        adv_ok.setdefault(attack, {})[victim] = _joined(parts)
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "key": key,
        "next_batch": progress.next_batch,
        "n_batches": n_batches,
        "tallies": tallies,
        # One boolean vector per victim and per (attack, victim): what the worst case is made of.
        "clean_ok": {victim: _joined(parts) for victim, parts in progress.clean_ok.items()},
        "adv_ok": adv_ok,
        "stats": {
            name: {
                "seconds": stats.seconds,
                # One tensor per attack, not one per batch: the file stays a handful of entries.
                "linf": torch.cat(stats.linf) if stats.linf else torch.empty(0),
                "l2": torch.cat(stats.l2) if stats.l2 else torch.empty(0),
                "zero_grad_points": stats.zero_grad_points,
            }
            for name, stats in progress.stats.items()
        },
        # The attacks' only random source (random starts). Lazily fitted parts (Adv-kNN's heads,
        # the DkNN attack's eta) are drawn from a fixed seed and the pool alone, so a resumed run
        # loads them from the fitted-part cache or refits them identically: no saving here.
        "generators": {name: attack.generator.get_state() for name, attack in attacks.items()
                       if attack.generator is not None},
        # No attack or victim draws from the global generators today; saved anyway so one that
        # starts to does not silently break resumption.
        "torch_rng": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _restore(state: Any, key: str, n_batches: int, done: Callable[[int], int], attacks: dict[str, Attack],
             victims: list[str], device: torch.device) -> _Progress:
    """The saved progress, with the random states put back.

    Raises :class:`_StaleState` for another evaluation's state, and KeyError, TypeError or
    ValueError for a malformed one.

    Everything is parsed and checked before any generator is touched, so a bad file leaves the
    fresh run's state intact.
    """
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or state.get("key") != key:
        raise _StaleState
    next_batch = int(state["next_batch"])
    if int(state["n_batches"]) != n_batches or not 0 <= next_batch <= n_batches:
        raise ValueError(f"batch {next_batch} of {state['n_batches']} does not fit {n_batches} batches")
    tallies = {(a, v): _Tally(**state["tallies"][a][v]) for a in attacks for v in victims}
    n_done = done(next_batch)

    def flags(saved: Any, what: str) -> list[Tensor]:
        if not (isinstance(saved, Tensor) and saved.dtype == torch.bool and saved.shape == (n_done,)):
            raise ValueError(f"bad per-point flags for {what}")
        return [saved] if n_done else []

    clean_ok = {v: flags(state["clean_ok"][v], f"victim '{v}'") for v in victims}
    adv_ok = {(a, v): flags(state["adv_ok"][a][v], f"attack '{a}' on victim '{v}'")
              for a in attacks for v in victims}
    stats = {}
    for name in attacks:
        saved = state["stats"][name]
        linf, l2 = saved["linf"], saved["l2"]
        if not (isinstance(linf, Tensor) and isinstance(l2, Tensor) and linf.shape == l2.shape):
            raise ValueError(f"bad norm tensors for attack '{name}'")
        stats[name] = _AttackStats(
            seconds=float(saved["seconds"]),
            linf=[linf] if linf.numel() else [],
            l2=[l2] if l2.numel() else [],
            zero_grad_points=int(saved["zero_grad_points"]),
        )
    generators = state["generators"]
    for name, attack in attacks.items():
        if attack.generator is not None:
            # A scratch generator on the same device rejects a state of the wrong size or kind.
            torch.Generator(device=attack.generator.device).set_state(generators[name])
    torch_rng = state["torch_rng"]
    cuda_rng = state.get("cuda_rng") if device.type == "cuda" else None
    if device.type == "cuda" and cuda_rng is None:
        raise ValueError("no CUDA random state")

    for name, attack in attacks.items():
        if attack.generator is not None:
            attack.generator.set_state(generators[name])
    torch.set_rng_state(torch_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    return _Progress(next_batch, tallies, stats, clean_ok, adv_ok)


def _load_progress(state_path: Path, key: str, n_batches: int, n_points: int, batch_size: int,
                   attacks: dict[str, Attack], victims: list[str], device: torch.device) -> _Progress | None:
    """The progress saved at ``state_path`` when it is this evaluation's, else None (with a warning)."""
    if not state_path.exists():
        return None

    def done(next_batch: int) -> int:
        return min(next_batch * batch_size, n_points)

    try:
        progress = _restore(safe_load(state_path), key, n_batches, done, attacks, victims, device)
    except LoadError as error:
        log.warning("%s; starting the evaluation over", error)
        return None
    except _StaleState:
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
        progress = _Progress(0, {(a, v.name): _Tally() for a in attacks for v in victims},
                             {a: _AttackStats() for a in attacks}, {v.name: [] for v in victims},
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
            atomic_save(_state_dict(state_key, n_batches, progress, attacks, device), state_path)
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
    outcomes = PointOutcomes(
        clean_ok={victim.name: _joined(progress.clean_ok[victim.name]) for victim in victims},
        adv_ok={key: _joined(parts) for key, parts in progress.adv_ok.items()},
    )
    seconds = sum(stats[name].seconds for name in attacks)
    for victim in victims:
        worst = worst_case(outcomes.clean_ok[victim.name],
                           {name: outcomes.adv_ok[(name, victim.name)] for name in attacks})
        n = worst.pop("n_points")
        rows.append({
            "attack": ANY_ATTACK, "victim": victim.name,
            **{key: worst.pop(key) for key in ("clean_acc", "robust_acc", "asr")},
            "n_points": n, "seconds": seconds,
            "eps": run.attack.eps, "norm": run.attack.norm, "steps": run.attack.steps,
            "images_per_second": n / seconds if seconds > 0 else None,
            **worst,  # attacks, broken_by, only_by, times_broken
        })
    return rows, warnings, outcomes
