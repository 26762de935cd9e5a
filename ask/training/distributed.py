"""Several processes, one run: ``torchrun`` and :class:`~torch.nn.parallel.DistributedDataParallel`.

``torchrun --nproc_per_node=N --no-python ask-train ...`` starts N copies of ``ask-train``;
:func:`init_from_env` joins them into one process group (NCCL for CUDA tensors, gloo for CPU
tensors) before Hydra composes, so every rank writes into rank 0's output directory. The trainer
asks :func:`current` who it is: rank 0 writes checkpoints and metrics, every rank trains on its
share of each global batch, and gradients are averaged by DDP. Without ``torchrun`` everything
here is a no-op with ``world_size == 1``.

How long a rank waits in a collective for the others is ``ASK_DIST_TIMEOUT_MIN`` minutes (default
120, against torch's 30): rank 0 alone decodes a dataset into the cache or runs robust validation
over a large pool while the other ranks wait at the next barrier. It is an environment variable,
not a config key, because the group forms before Hydra composes the config.
"""

from __future__ import annotations

import datetime
import gc
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ask.errors import ConfigError

TIMEOUT_VARIABLE = "ASK_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 120.0


def collective_timeout(environ: Mapping[str, str] = os.environ) -> datetime.timedelta:
    """The collective timeout from ``ASK_DIST_TIMEOUT_MIN`` (minutes, > 0; default 120)."""
    text = environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN)
    try:
        minutes = float(text)
    except ValueError:
        minutes = math.nan
    if not (math.isfinite(minutes) and minutes > 0):
        raise ConfigError(
            f"{TIMEOUT_VARIABLE}={text} is not a positive number of minutes; set it to how long a process "
            f"may wait for the others, e.g. {TIMEOUT_VARIABLE}={DEFAULT_TIMEOUT_MIN:g}, or unset it"
        )
    return datetime.timedelta(minutes=minutes)


def launched_by_torchrun() -> bool:
    """True inside a ``torchrun`` worker of a group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclass(frozen=True)
class Distributed:
    """This process's place in the group (rank 0 of 1 outside ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """Each rank's own GPU (``LOCAL_RANK``) when the run is on CUDA; the CPU is shared."""
        if device.type != "cuda" or not self.enabled:
            return device
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"rank {self.rank} wants GPU {self.local_rank} but only {torch.cuda.device_count()} are visible; "
                "start torchrun with --nproc_per_node at most the GPU count"
            )
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, on the CPU through gloo)."""
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True, so all ranks stop at the same step."""
        if not self.enabled:
            return flag
        return self.sum([float(flag)])[0] > 0

    def gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current() -> Distributed:
    """The process group this process belongs to, or a group of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return Distributed()
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def init_from_env() -> Distributed:
    """Join ``torchrun``'s group (idempotent); a group of one outside ``torchrun``.

    The backend string routes CPU tensors through gloo and CUDA tensors through NCCL, so one
    group serves both the DDP gradients and the small CPU bookkeeping collectives. Collectives
    wait :func:`collective_timeout` (``ASK_DIST_TIMEOUT_MIN``; read here because the group forms
    before Hydra composes, so a config key could not reach it); a bad value is a ConfigError.
    """
    if not launched_by_torchrun():
        return Distributed()
    if not dist.is_initialized():
        timeout = collective_timeout()
        # torch.distributed.nn evaluates ``group=group.WORLD`` as default arguments of its functions
        # when it is first imported. DistributedDataParallel imports it (through torch._dynamo) after
        # the group exists, and those defaults then hold the default group for the rest of the
        # process: destroy_process_group() cannot free it and gloo's worker threads outlive
        # shutdown() (see there). Imported before the group exists, the defaults are None.
        import torch.distributed.nn  # noqa: F401
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=timeout)
    return current()


def shutdown() -> None:
    """Leave the group, and so stop its communication threads, while Python is still whole.

    A gloo group runs each collective on a worker thread of its own, and that thread drops its
    reference to a finished collective's Work (whose tensors can own Python objects, e.g. those of
    ``all_gather_object``) only after the caller has already moved on. When that last release comes
    after interpreter finalisation has begun, taking the GIL makes the thread exit (pthread_exit)
    through a noexcept C++ destructor and std::terminate aborts the process: SIGABRT, "terminate
    called without an active exception", after a run that finished. Freeing the group here joins
    the worker threads while Python can still serve them (torch drops the GIL for that join) - but
    only when nothing else holds the group: DDP's reducer does, so call this once the trainer has
    returned and no traceback keeps its frames alive; the collections drop reference cycles that
    may still hold a reducer.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def parameter_fingerprint(model: torch.nn.Module) -> list[float]:
    """Per-tensor float64 sums of the weights: equal on all ranks iff DDP kept them in step.

    Buffers are left out: batch norm's running statistics follow each rank's own last batch
    (DDP re-broadcasts rank 0's before every forward), and rank 0's are the ones saved.
    """
    return [float(p.detach().double().sum()) for p in model.parameters()]
