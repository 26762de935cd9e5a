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


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors, numbers, strings, plain containers) atomically."""
    return atomic_save({"format": FORMAT, "version": VERSION, **payload}, path)


def load_checkpoint(path: str | Path, setting: str = "model.checkpoint") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; every failure is a :class:`CheckpointError`.

    ``setting`` is the config key that named the file (``model.checkpoint`` or ``train.resume``),
    so the message says what to change.
    """
    path = Path(path).expanduser()
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
            "written by ask-train"
        )
    if not isinstance(payload.get("state_dict"), dict) or not isinstance(payload.get("model"), dict):
        raise CheckpointError(
            f"checkpoint '{path}' lacks its weights or model description; {setting} must name a best.pt or "
            "last.pt written by ask-train"
        )
    payload["state_dict"] = strip_prefixes(payload["state_dict"])
    return payload


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
