"""Device choice, seeding and RNG state capture (so a resumed run continues the same random stream)."""

from __future__ import annotations

import logging
import os
import random
from typing import Any

import numpy as np
import torch

from ask.errors import ConfigError

log = logging.getLogger(__name__)


def select_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an explicit CUDA request on a CPU machine is an error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={spec} was asked for but no CUDA device is visible; use device=cpu or device=auto"
        )
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally switch torch to deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matmuls but reads it at the first
        # GEMM; the console scripts set it before torch loads (ask/cli/__init__.py), this is the
        # fallback for library callers that seed before their first GEMM.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def float32_precision(device: torch.device, tf32: bool) -> str:
    """How float32 matmuls and convolutions round on ``device``: ``"tf32"`` or ``"ieee"`` (full float32).

    TF32 exists only on CUDA, so a CPU run is ``ieee`` whatever ``tf32`` says; this is the value
    recorded in ``metrics.json`` and in the feature-cache key.
    """
    return "tf32" if device.type == "cuda" and tf32 else "ieee"


def configure_backends(device: torch.device, deterministic: bool, tf32: bool) -> str:
    """Set this process's cuBLAS / cuDNN float32 precision and cuDNN autotuning for a run on ``device``.

    TF32 is off unless ``tf32``: PyTorch leaves it on for cuDNN convolutions by default, where it
    moves hidden features by about 1e-3 relative, and at the attack temperature T = 0.01 that
    shifts the ASK loss's softmax materially. ``cudnn.benchmark`` times the candidate convolution
    kernels per input shape and keeps the fastest; the choice can differ between runs, so it is on
    only for CUDA runs that are not ``deterministic``. Returns :func:`float32_precision`.
    """
    # The allow_tf32 switches, not torch >= 2.9's fp32_precision strings: they exist in every
    # supported torch, and once the strings say "ieee" reading the switches (torch's own
    # cudnn.flags() does) raises, whereas setting the switches keeps both views consistent.
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = device.type == "cuda" and not deterministic
    return float32_precision(device, tf32)


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU ``batch`` on ``device``; to a GPU through page-locked memory, so the copy is asynchronous.

    ``non_blocking=True`` from ordinary (pageable) memory is a synchronous copy in disguise; from
    pinned memory the host goes on preparing the next batch while the copy runs.
    """
    if device.type != "cuda" or batch.device.type != "cpu":
        return batch.to(device)
    return batch.pin_memory().to(device, non_blocking=True)


def capture_rng_state() -> dict[str, Any]:
    """Every RNG state as plain data (tensors, ints, lists) so ``weights_only`` loading accepts it."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what :func:`capture_rng_state` saved, on whatever devices this process sees.

    Python, NumPy and the CPU generator are restored exactly. The CUDA generators are restored
    one per device that both the checkpoint and this process have; when the counts differ (a run
    saved on 4 GPUs resumed on 1, or on none, or a CPU checkpoint resumed on a GPU) the other
    devices keep the seeding they have and one warning says their streams restart.
    """
    random.setstate(_to_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    saved = list(state.get("cuda") or [])
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index in range(min(len(saved), visible)):
        torch.cuda.set_rng_state(saved[index], index)
    if len(saved) != visible:
        log.warning("the random state was saved with %d CUDA device(s) and %d are visible: the CUDA random "
                    "streams of the devices it lacks restart from the seed", len(saved), visible)


def restore_generator(generator: torch.Generator, state: torch.Tensor, name: str) -> None:
    """Set ``generator`` to a saved ``state``, or keep its seeding when the state is another device's.

    A CPU generator's state (Mersenne Twister, 5056 bytes) and a CUDA one's (Philox, 16 bytes)
    do not fit each other, so a run started on the CPU and resumed on a GPU, or the other way
    round, restarts ``name``'s stream from its seed, with one warning, instead of failing.
    """
    current = generator.get_state()
    if state.dtype != current.dtype or state.shape != current.shape:
        log.warning("the saved %s random state (%d bytes) does not fit this run's %s generator (%d bytes): "
                    "it was saved on another kind of device; its stream restarts from the seed",
                    name, state.numel(), generator.device.type, current.numel())
        return
    generator.set_state(state.to(current.device))


def _to_plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_plain(item) for item in value]
    return value


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuple(item) for item in value)
    return value
