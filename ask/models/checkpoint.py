"""Checkpoints as plain data: weights, optimiser, epoch, RNG states and the resolved config.

Written atomically (temp file + ``os.replace``), read with ``weights_only=True`` only: a
truncated or tampered file is refused with one line, never executed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ask.errors import CheckpointError
from ask.utils.io import LoadError, atomic_save, safe_load

FORMAT = "ask-checkpoint"
VERSION = 1
_PREFIXES = ("module.", "_orig_mod.")
# What rebuilding the network takes (see model_spec); mean, std and normalize have fallbacks.
MODEL_FIELDS = ("name", "width", "num_classes", "in_channels", "image_size")
RESUME_FIELDS = ("optimizer", "scheduler", "epoch", "best_metric", "order_rng", "config")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors, numbers, strings, plain containers) atomically."""
    return atomic_save({"format": FORMAT, "version": VERSION, **payload}, path)


def load_checkpoint(path: str | Path, setting: str = "model.checkpoint") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; every failure is a :class:`CheckpointError`.

    ``setting`` is the config key that named the file (``model.checkpoint`` or ``train.resume``),
    so the message says what to change; with ``train.resume`` the training state must be there too.
    A checkpoint whose header lacks a field, or whose weights hold NaN or Inf, is refused.
    """
    path = Path(path).expanduser()
    if path.is_symlink() and not path.exists():
        raise CheckpointError(
            f"checkpoint '{path}' is a broken link or a loop of links; point it (or {setting}) at a real file"
        )
    if path.is_dir():
        raise CheckpointError(f"checkpoint '{path}' is a folder; point {setting} at the best.pt or last.pt in it")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' does not exist; train one with ask-train or fix {setting}"
        )
    try:
        payload = safe_load(path)
    except LoadError as error:
        raise CheckpointError(_unreadable(path, error, setting)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"'{path}' is not an ask checkpoint (no '{FORMAT}' header); point {setting} at a file "
            "written by ask-train" + ("; a plain state_dict goes in model.weights" if setting == "model.checkpoint" else "")
        )
    if not isinstance(payload.get("state_dict"), dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(
            f"checkpoint '{path}' lacks its weights or model description; {setting} must name a best.pt or "
            "last.pt written by ask-train"
        )
    missing = [key for key in MODEL_FIELDS if key not in payload["model"]]
    if setting == "train.resume":  # resuming also needs the training state
        missing += [key for key in RESUME_FIELDS if key not in payload]
    if missing:
        raise CheckpointError(
            f"checkpoint '{path}' lacks {', '.join(missing)} in its header; it was not written by "
            f"ask-train (or was edited): point {setting} at a best.pt or last.pt written by ask-train"
        )
    payload["state_dict"] = strip_prefixes(payload["state_dict"])
    broken = next((key for key, value in payload["state_dict"].items()
                   if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()),
                  None)
    if broken is not None:
        # What a diverged training saves: every prediction would be NaN, and the kNN search fails on it.
        raise CheckpointError(
            f"checkpoint '{path}' holds NaN or Inf weights (first in '{broken}'): its training diverged; "
            f"point {setting} at an earlier checkpoint or retrain with a lower train.lr"
        )
    return payload


def load_plain_weights(model: torch.nn.Module, path: str | Path, key: str | None = None,
                       strip_prefix: str = "module.") -> None:
    """Load a plain ``torch.save(model.state_dict())`` file (or a dict holding one under ``key``)
    into ``model``; every failure is one line naming ``model.weights`` and the fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"model.weights '{path}' is not a file; point model.weights at a saved state_dict")
    try:
        payload = safe_load(path)
    except LoadError as error:
        raise CheckpointError(_unreadable(path, error, "model.weights")) from None
    if key is not None:
        if not isinstance(payload, dict) or key not in payload:
            found = ", ".join(list(payload)[:8]) if isinstance(payload, dict) else type(payload).__name__
            raise CheckpointError(f"model.weights '{path}' has no '{key}' entry (it has: {found}); "
                                  "fix model.state_dict_key")
        payload = payload[key]
    if not isinstance(payload, dict) or not all(torch.is_tensor(v) for v in payload.values()):
        hint = next((k for k in ("state_dict", "model", "model_state_dict", "net")
                     if isinstance(payload, dict) and isinstance(payload.get(k), dict)), None)
        fix = f"set model.state_dict_key={hint}" if hint else "save it with torch.save(model.state_dict())"
        raise CheckpointError(f"model.weights '{path}' is not a state_dict of tensors; {fix}")
    if strip_prefix:
        payload = {k[len(strip_prefix):] if k.startswith(strip_prefix) else k: v for k, v in payload.items()}
    load_weights(model, payload, path, setting="model.weights",
                 fix="check model.arch (or model.target) and the dataset's class count")


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path,
                 setting: str = "model.checkpoint", fix: str | None = None) -> None:
    """``model.load_state_dict(state_dict)``, or one line saying which tensors are missing, extra or misshaped.

    torch's own message lists every tensor over many lines; the first of them says nothing.
    """
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    misshaped = [f"{key} {tuple(state_dict[key].shape)} vs {tuple(value.shape)}" for key, value in expected.items()
                 if key in state_dict and tuple(state_dict[key].shape) != tuple(value.shape)]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected),
                       ("shape in the checkpoint vs the model", misshaped)):
        if keys:
            shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
            problems.append(f"{what}: {shown}")
    if problems:
        raise CheckpointError(
            f"checkpoint '{path}' does not fit the model built from its description ({'; '.join(problems)}); "
            + (fix or f"point {setting} at a best.pt or last.pt written by ask-train")
        )
    model.load_state_dict(state_dict)


def _unreadable(path: Path, error: LoadError, setting: str) -> str:
    """One line for a checkpoint that ``safe_load`` refused, by what went wrong (never torch's internals)."""
    fix = f"retrain it or point {setting} at a good file"
    if error.kind == "unsafe":
        # Refused by weights_only before anything in it ran: say so, it is what a worried user asks.
        what = f" ({error.detail})" if error.detail else ""
        return (f"checkpoint '{path}' holds objects other than tensors and plain data{what}; safe loading "
                f"refused it, so nothing in it ran; point {setting} at a file written by ask-train")
    if error.kind == "truncated":
        return f"checkpoint '{path}' is unreadable: the file is truncated (its zip archive is incomplete); {fix}"
    if error.kind == "empty":
        return f"checkpoint '{path}' is unreadable: the file is empty; {fix}"
    if error.kind == "not_torch":
        return f"'{path}' is not a PyTorch file; point {setting} at a best.pt or last.pt written by ask-train"
    if error.kind == "checksum":
        return (f"checkpoint '{path}' is unreadable: the file is corrupted (its bytes no longer match the "
                f"checksums stored when it was written); {fix}")
    if error.kind == "unreadable":
        return f"checkpoint '{path}' is unreadable ({error.detail}); check its permissions or fix {setting}"
    return f"checkpoint '{path}' is unreadable: the file is corrupted (it cannot be unpickled); {fix}"


def strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` (DistributedDataParallel) and ``_orig_mod.`` (torch.compile) prefixes."""
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        cleaned[key] = value
    return cleaned


def model_spec(model_name: str, width: int, num_classes: int, in_channels: int, image_size: int,
               mean: tuple[float, ...], std: tuple[float, ...], normalize: bool = True) -> dict[str, Any]:
    """What it takes to rebuild the architecture, stored beside the weights.

    ``normalize`` says whether ``mean`` and ``std`` were applied inside the network; checkpoints
    written before it was recorded lack it, and their architectures all normalised.
    """
    return {
        "name": model_name,
        "width": width,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "mean": list(mean),
        "std": list(std),
        "normalize": bool(normalize),
    }


def check_compatible(spec: dict[str, Any], path: str | Path, *, model_name: str, num_classes: int,
                     in_channels: int, image_size: int) -> None:
    """Refuse a checkpoint of another architecture, class count or input shape, naming the fix."""
    if spec["name"] != model_name:
        raise CheckpointError(
            f"checkpoint '{path}' holds a {spec['name']} but model={model_name}; add model={spec['name']}"
        )
    if spec["num_classes"] != num_classes:
        raise CheckpointError(
            f"checkpoint '{path}' was trained for {spec['num_classes']} classes but the dataset has "
            f"{num_classes}; use the dataset it was trained on"
        )
    if spec["in_channels"] != in_channels or spec["image_size"] != image_size:
        raise CheckpointError(
            f"checkpoint '{path}' expects {spec['in_channels']}x{spec['image_size']}px inputs but the dataset "
            f"gives {in_channels}x{image_size}px; set dataset.image_size or use the matching dataset"
        )
