"""Which arithmetic a run uses: bf16 autocast where the hardware has bf16 units, fp32 elsewhere.

``train.amp`` and ``eval.amp`` take one of :data:`ask.constants.AMP_SETTINGS`:

- ``auto`` (the default, also ``true``): bf16 autocast on a CUDA GPU with bf16 support and on a
  CPU with native bf16 instructions (AVX512-BF16 or AMX on x86, the BF16 extension on Arm), fp32
  anywhere else. On a CPU without bf16 units autocast is *slower* than fp32 (oneDNN falls back to
  reference kernels: one SmallCNN step took 17x as long on an AVX2-only EPYC), so ``auto`` never
  turns it on there.
- ``bf16``: bf16 autocast whatever the hardware, to check the numerics of the fast path on a
  machine that lacks it (slow where emulated).
- ``off`` (also ``false``): fp32 throughout.

Autocast covers the network's forward and backward passes only. The ASK margin switches it off
and runs in fp32 (:func:`ask.attacks.ask_loss.ask_margin`), so do Adv-kNN's head and every part
fitted on the pool (:func:`fp32`, :func:`ask.knn.fitted.cached_fit`), reference stores hold fp32
features, and victims judge in fp32, so a run's reported numbers never come from a bf16 kNN.
"""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from pathlib import Path

import torch


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX on x86; BF16 on Arm)."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            return True
    if platform.machine().lower() in ("aarch64", "arm64"):
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return any(line.startswith("Features") and " bf16" in line for line in flags.splitlines())
    return False


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast on ``device`` runs on bf16 hardware rather than an emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def resolve_amp(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype an ``amp`` setting means on ``device``; ``None`` is fp32."""
    if setting == "off":
        return None
    if setting == "bf16" or native_bf16(device):
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """``"bf16"`` or ``"fp32"``: what run records and cache keys store."""
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.").replace("bfloat16", "bf16")


def describe(setting: str, dtype: torch.dtype | None, device: torch.device, what: str) -> str:
    """One log line saying which arithmetic ``what`` uses and why."""
    if dtype is None and setting == "auto":
        reason = ("this CPU has no bf16 units (AVX512-BF16/AMX), where autocast would be slower"
                  if device.type == "cpu" else f"{device.type} has no native bf16")
        return f"{what}: fp32 ({reason}); amp=bf16 forces it"
    if dtype is None:
        return f"{what}: fp32 (amp=off)"
    native = "native" if native_bf16(device) else "emulated, slow: amp=bf16 was asked for"
    return f"{what}: bf16 autocast on {device.type} ({native}); amp=off switches it off"


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[None]:
    """``torch.autocast`` for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def fp32() -> Iterator[None]:
    """Autocast switched off on every device type, whatever the caller's context.

    For arithmetic that must not round to bf16 although it runs inside an attack's autocast: an
    Adv-kNN head fitted with its linear layer in bf16 came out with logit gaps near 1,400, a
    softmax that saturated and an input gradient of exactly zero for 90 % of the digits points,
    where the same fit in fp32 matched the kNN's vote (KL 0.01 against 12).
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield
