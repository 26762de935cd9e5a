"""95 % confidence intervals for the report: Student's t over replicates, Wilson's over one run's points.

No scipy: the t quantiles are tabulated up to 30 degrees of freedom and a series beyond.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

#: z with 2.5 % of the standard normal above it.
Z_975 = 1.959963984540054
#: t_{0.975, df} for df = 1..30 (Student's t, 97.5th percentile; df 1 first), to six decimals.
T_975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157,
         2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922,
         2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831,
         2.048407, 2.045230, 2.042272)


def t_quantile_975(df: int) -> float:
    """Student's t_{0.975, df}: :data:`T_975` up to 30, then the Cornish-Fisher series in 1/df.

    The series (Abramowitz & Stegun 26.7.5, four terms) is within 3e-8 of the exact quantile
    from df 31 on and tends to :data:`Z_975`; no scipy needed.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    terms = ((z ** 3 + z) / 4,
             (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(term / df ** (power + 1) for power, term in enumerate(terms))


def t_interval(values: Sequence[float]) -> tuple[float, float]:
    """The 95 % interval for the mean of ``values`` (two or more): mean ± t_{0.975, n-1} · s / √n."""
    if len(values) < 2:
        raise ValueError("a t interval needs two values or more")
    mean, half = statistics.fmean(values), t_quantile_975(len(values) - 1) * statistics.stdev(values)
    half /= math.sqrt(len(values))
    return mean - half, mean + half


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """Wilson's 95 % score interval for a proportion of ``successes`` out of ``n`` trials (n >= 1)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    z2 = Z_975 ** 2
    p = successes / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_975 / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def confidence_interval(values: Sequence[float], denominators: Sequence[int]) -> tuple[float | None, float | None, str]:
    """The 95 % interval of a fraction, ``(low, high, kind)``.

    ``values`` are one fraction per run and ``denominators`` the number of trials behind each
    (points, or the points right on x for ASR). Two runs or more: Student's t over the values
    (``kind`` ``"t"``), which covers the spread between seeds. One run: Wilson's interval over its
    trials (``"wilson"``), which covers only the choice of points. Clipped to [0, 1]; ``(None,
    None, "")`` when there is nothing to go on.
    """
    if len(values) >= 2:
        low, high = t_interval(values)
        return max(0.0, low), min(1.0, high), "t"
    if len(values) == 1 and denominators and denominators[0] >= 1:
        n = denominators[0]
        return (*wilson_interval(min(n, max(0, round(values[0] * n))), n), "wilson")
    return None, None, ""
