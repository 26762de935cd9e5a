"""Seeded synthetic reference pools, generated chunk by chunk (benchmarks and tests of scale).

Points of class c are ``centre_c + B z + noise`` with z in a low-dimensional latent space shared
by all classes: like deep features, the data has far fewer degrees of freedom than dimensions, so
nearest neighbours are meaningful and an IVF index has structure to exploit (in an isotropic
512-dimensional Gaussian every point is about equally far from every other and no index can beat
a scan). ``clustered=False`` gives that isotropic Gaussian instead, the hard case for IVF.
Each chunk is drawn from its own seeded stream, so any chunk can be regenerated alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

LAYER = "feat"


class SyntheticPool:
    """A clustered Gaussian pool of ``n`` points in ``d`` dimensions with ``classes`` classes."""

    def __init__(self, n: int, d: int, classes: int = 1000, *, seed: int = 0, latent: int = 16,
                 spread: float = 0.5, clustered: bool = True, noise: float = 0.1) -> None:
        self.n, self.d, self.classes, self.seed = int(n), int(d), int(classes), int(seed)
        self.clustered, self.noise = clustered, float(noise)
        rng = np.random.default_rng([seed, 0])
        self.centres = rng.standard_normal((classes, d), dtype=np.float32)
        # Per-dimension spread of a class around its centre (centres are about sqrt(2) apart per
        # dimension): classes are clusters, as in a trained network's deeper layers.
        self.basis = rng.standard_normal((latent, d), dtype=np.float32) * np.float32(spread / np.sqrt(latent))

    def _draw(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.clustered:
            return rng.standard_normal((labels.size, self.d), dtype=np.float32)
        z = rng.standard_normal((labels.size, self.basis.shape[0]), dtype=np.float32)
        x = self.centres[labels] + z @ self.basis
        x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(self.noise)
        return x

    def chunks(self, chunk: int = 65536) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """``({LAYER: features [B, d] float32}, labels [B] int64)`` for rows 0..n in order."""
        for i, lo in enumerate(range(0, self.n, chunk)):
            rng = np.random.default_rng([self.seed, 1, i])
            labels = rng.integers(0, self.classes, min(chunk, self.n - lo), dtype=np.int64)
            yield {LAYER: self._draw(labels, rng)}, labels

    def queries(self, m: int) -> np.ndarray:
        """``m`` held-out points from the same distribution (a stream no chunk uses)."""
        rng = np.random.default_rng([self.seed, 2])
        return self._draw(rng.integers(0, self.classes, m, dtype=np.int64), rng)
