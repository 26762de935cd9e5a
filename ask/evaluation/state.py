"""The resumable evaluation's state: where it stands (:class:`Progress`), the file saved after every
batch (:func:`saved_state`), its reading back (:func:`restored_progress`) and the key that tells
one evaluation's file from another's (:func:`evaluation_key`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from ask.attacks import Attack
from ask.config.schema import EVALUATION_KEY, RunConfig, ignored_settings
from ask.data import ImageSplit
from ask.evaluation.outcomes import AttackStats, Tally
from ask.utils import precision

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


class StaleState(Exception):
    """The saved state belongs to another evaluation (or another version of this code)."""


@dataclass
class Progress:
    """Where an evaluation stands: the next batch, the counts, the per-point flags and the norms so far.

    ``clean_ok[victim]`` and ``adv_ok[(attack, victim)]`` hold, batch by batch, whether the victim
    got each point right on x and on the attack's x' (boolean CPU tensors).
    """

    next_batch: int
    tallies: dict[tuple[str, str], Tally]
    stats: dict[str, AttackStats]
    clean_ok: dict[str, list[Tensor]]
    adv_ok: dict[tuple[str, str], list[Tensor]]


def joined_flags(parts: list[Tensor]) -> Tensor:
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.bool)


def saved_state(key: str, n_batches: int, progress: Progress, attacks: dict[str, Attack],
                device: torch.device) -> dict[str, Any]:
    """Plain data only (tensors, numbers, strings), so ``weights_only`` loading accepts it."""
    tallies: dict[str, dict[str, Any]] = {}
    for (attack, victim), tally in progress.tallies.items():
        tallies.setdefault(attack, {})[victim] = asdict(tally)
    adv_ok: dict[str, dict[str, Tensor]] = {}
    for (attack, victim), parts in progress.adv_ok.items():
        adv_ok.setdefault(attack, {})[victim] = joined_flags(parts)
    state: dict[str, Any] = {
        "version": STATE_VERSION,
        "key": key,
        "next_batch": progress.next_batch,
        "n_batches": n_batches,
        "tallies": tallies,
        # One boolean vector per victim and per (attack, victim): what the worst case is made of.
        "clean_ok": {victim: joined_flags(parts) for victim, parts in progress.clean_ok.items()},
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


def restored_progress(state: Any, key: str, n_batches: int, done: Callable[[int], int], attacks: dict[str, Attack],
             victims: list[str], device: torch.device) -> Progress:
    """The saved progress, with the random states put back.

    Raises :class:`StaleState` for another evaluation's state, and KeyError, TypeError or
    ValueError for a malformed one.

    Everything is parsed and checked before any generator is touched, so a bad file leaves the
    fresh run's state intact.
    """
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION or state.get("key") != key:
        raise StaleState
    next_batch = int(state["next_batch"])
    if int(state["n_batches"]) != n_batches or not 0 <= next_batch <= n_batches:
        raise ValueError(f"batch {next_batch} of {state['n_batches']} does not fit {n_batches} batches")
    tallies = {(a, v): Tally(**state["tallies"][a][v]) for a in attacks for v in victims}
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
        stats[name] = AttackStats(
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
    return Progress(next_batch, tallies, stats, clean_ok, adv_ok)
