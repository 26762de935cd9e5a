"""Names and labels that results, tables and plots share (no torch, no matplotlib)."""

from __future__ import annotations

import math

from ask.constants import ANY_ATTACK

__all__ = ["ANY_ATTACK", "format_eps"]


def format_eps(eps: float, norm: str = "linf") -> str:
    """``0.0314`` as ``8/255`` where it is a whole number of 8-bit grey levels (L-inf only).

    A short decimal wins when it is exact: ``0.2`` is also 51/255, but it was typed as 0.2.
    """
    if math.isnan(eps):
        return "?"
    short = f"{eps:.4g}"
    levels = eps * 255
    if (norm == "linf" and abs(float(short) - eps) > 1e-12 * max(1.0, abs(eps))
            and abs(levels - round(levels)) < 1e-6 and round(levels) > 0):
        return f"{round(levels)}/255"
    return short
