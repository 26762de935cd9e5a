"""Parts fitted on a reference pool, cached beside its features.

Adv-kNN's heads, the DkNN attack's eta and the DkNN victim's calibration scores are functions of
the network, the pool and the fit's settings (which name any other data the fit reads, such as
the calibration split), never of the evaluated points. So each is fitted once per (checkpoint,
pool, layer, settings) and every later evaluation of that checkpoint (an eps sweep, a rerun, a
resumed run) loads it. Adv-kNN's head fit was most of a CIFAR-10 evaluation's wall time
(docs/RESULTS.md).

The files live in the store's feature-cache directory, under ``fitted/``: when the features go
stale and that directory is replaced, the parts fitted on them go with it, and a store held in
memory (no cache directory) refits every time, as before. Like the feature cache, a file that is
unreadable, of another format, or fitted for another key is ignored with a warning, refitted and
replaced; a cache that cannot be written costs a warning, not the run.

A fit runs in fp32 even when it is first needed inside an attack's bf16 autocast
(:func:`ask.utils.precision.fp32`): the part depends on the pool alone, not on the arithmetic of
the run that happened to fit it first.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from ask.utils import precision
from ask.utils.io import LoadError, atomic_save, safe_load

log = logging.getLogger(__name__)

__all__ = ["FITTED_FORMAT", "cached_fit", "content_digest", "fitted_path"]

#: Bump when what a cached part holds, or how it is fitted, changes.
#: 2: fits run with autocast off (format 1 could hold a head fitted in bf16).
FITTED_FORMAT = 2

Part = TypeVar("Part")


def content_digest(*tensors: Tensor) -> str:
    """sha1 of the tensors' dtypes, shapes and bytes, read in slices (no copy of a large split)."""
    sha = hashlib.sha1()
    for t in tensors:
        t = t.detach()
        sha.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel() == 0:
            continue
        rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
        step = max(1, (64 << 20) // (rows.shape[1] * t.element_size()))
        for lo in range(0, rows.shape[0], step):
            # Flattened: a [n, 1] slice counts as contiguous with any stride (a 1x1 convolution's
            # weight in channels_last), and view(torch.uint8) needs a unit last stride.
            part = rows[lo : lo + step].to("cpu").contiguous().reshape(-1)
            sha.update(part.view(torch.uint8).numpy().data)
    return sha.hexdigest()[:16]


def _full_key(store: Any, name: str, key: Mapping[str, Any]) -> dict[str, Any]:
    # Through JSON, so a key compares equal to the one read back from a file (tuples become lists).
    full = {"format": FITTED_FORMAT, "name": name, "store": store.cache_key, "settings": dict(key)}
    return json.loads(json.dumps(full, sort_keys=True))


def fitted_path(store: Any, name: str, key: Mapping[str, Any]) -> Path | None:
    """The file of part ``name`` fitted with settings ``key`` on ``store``; None without a cache directory."""
    if getattr(store, "cache_path", None) is None:
        return None
    digest = hashlib.sha1(json.dumps(_full_key(store, name, key), sort_keys=True).encode()).hexdigest()[:16]
    return Path(store.cache_path) / "fitted" / f"{name}-{digest}.pt"


def cached_fit(store: Any, name: str, key: Mapping[str, Any], fit: Callable[[], Any],
               build: Callable[[Any], Part]) -> Part:
    """The part ``name`` fitted on ``store`` with settings ``key``: ``build(saved)`` from its cache
    file when there is a good one, else ``build(fit())`` (and the fit is saved).

    ``key`` must hold every setting that changes the fitted values (plain data); the store's own
    cache key (checkpoint, pool, layers, metric, dtype) is added to it. ``fit()`` returns plain
    data (tensors, numbers, strings and containers of them); ``build`` turns that into the part and
    raises KeyError, TypeError, ValueError or RuntimeError for a malformed one.
    """
    path = fitted_path(store, name, key)

    def fit_in_fp32() -> Any:
        with precision.fp32():
            return fit()

    if path is None:
        return build(fit_in_fp32())
    full_key = _full_key(store, name, key)
    if path.exists():
        problem = None
        try:
            saved = safe_load(path)
        except LoadError as error:
            problem = str(error)
        else:
            if not isinstance(saved, dict) or saved.get("key") != full_key:
                problem = "it was fitted for another pool or setting (stale key)"
            else:
                try:
                    part = build(saved["value"])
                except (KeyError, TypeError, ValueError, RuntimeError) as error:
                    problem = f"malformed content ({error})"
                else:
                    log.info("loaded the %s fitted earlier from %s", name, path)
                    return part
        log.warning("ignoring the cached %s %s: %s; fitting it again", name, path, problem)
    value = fit_in_fp32()
    part = build(value)
    try:
        atomic_save({"key": full_key, "value": value}, path)
    except OSError as error:  # a cache is an optimisation: a full disk must not end the run
        log.warning("could not write the %s cache %s (%s); keeping the fit in memory", name, path, error)
    return part
