"""How many torch threads the suite's processes get: the cores that other processes leave idle.

Beside busy processes, torch's threads wait for each other at every parallel region, because one
of them always shares its core. On the 2-core machine the full suite took 26 minutes with
``OMP_NUM_THREADS=1`` where the CI, with torch's default of two threads per process, took 47 to
88 minutes under about the same load; on the idle machine one thread made the heaviest test
files 11 % slower. So the suite measures the idle cores once, as it starts, and uses those (at
least one); ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``, when set, decide instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def thread_variable_set(environ: Mapping[str, str]) -> bool:
    return any(name in environ for name in THREAD_VARIABLES)


def _cpu_ticks(stat: str = "/proc/stat") -> tuple[float, float]:
    """(idle + iowait, all) clock ticks of all CPUs since boot."""
    with open(stat) as lines:
        ticks = [float(field) for field in lines.readline().split()[1:]]
    return ticks[3] + ticks[4], sum(ticks)


def cores_left_idle(seconds: float = 0.5, stat: str = "/proc/stat", cores: int | None = None) -> float | None:
    """How many of the ``cores`` (default: all) sat idle over the next ``seconds`` (None where ``stat`` cannot be read)."""
    try:
        idle_before, total_before = _cpu_ticks(stat)
        time.sleep(seconds)
        idle_after, total_after = _cpu_ticks(stat)
    except (OSError, ValueError, IndexError):
        return None
    if total_after <= total_before:
        return None
    return (cores or os.cpu_count() or 1) * (idle_after - idle_before) / (total_after - total_before)


def threads_for(idle_cores: float | None, cores: int) -> int | None:
    """The thread count for the suite's processes, or None to leave torch's default (all cores)."""
    if idle_cores is None:
        return None
    threads = max(1, round(idle_cores))
    return threads if threads < cores else None


_chosen: tuple[int | None, float | None] | None = None


def choose_suite_threads() -> tuple[int | None, float | None]:
    """Measure once per process and set ``OMP_NUM_THREADS`` for what follows: (threads or None, idle cores or None).

    Call it before torch loads (OpenMP reads the variable once); every command the suite starts
    inherits the variable. conftest runs twice in a process (as ``conftest`` and as ``tests.conftest``),
    and the second call returns the first's answer.
    """
    global _chosen
    if _chosen is None:
        idle = None if thread_variable_set(os.environ) else cores_left_idle()
        threads = threads_for(idle, os.cpu_count() or 1)
        if threads is not None:
            os.environ["OMP_NUM_THREADS"] = str(threads)
        _chosen = (threads, idle)
    return _chosen
