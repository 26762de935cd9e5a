"""Resident memory of this process, for the scale benchmarks and their tests (Linux ``/proc``)."""

from __future__ import annotations


def status_mib(field: str = "VmHWM") -> float:
    """A ``/proc/self/status`` size field in MiB: ``VmHWM`` is the peak resident set, ``VmRSS`` the current one."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")
