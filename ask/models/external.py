"""Networks ask did not define, built from the config: a torchvision architecture by name
(``model=torchvision model.arch=resnet50``) or any importable class (``model=module
model.target=package.module.Class``), wrapped by :func:`ask.models.wrapped.wrap` so that their
layers are module paths.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ask.errors import ModelError
from ask.models.wrapped import WrappedModel, wrap

__all__ = ["build_external"]


def build_external(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    normalize: bool | None,
    arch: str | None = None,
    target: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
) -> WrappedModel:
    """An untrained ``torchvision`` architecture or ``module`` class, wrapped; ``config`` rebuilds it."""
    kwargs = dict(kwargs or {})
    if name == "torchvision":
        module = _torchvision(str(arch), num_classes, kwargs)
    elif name == "module":
        module = _importable(str(target), kwargs)
    else:
        raise ModelError(f"unknown external model '{name}'; use model=torchvision or model=module")
    normalize = True if normalize is None else bool(normalize)
    model = wrap(module, mean=mean if normalize else None, std=std if normalize else None,
                 image_size=image_size, in_channels=in_channels, num_classes=num_classes)
    model.config = {**model.config, "name": name, "arch": arch, "target": target, "kwargs": kwargs,
                    "width": 64, "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return model


def _torchvision(arch: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)  # classification only
    if arch not in available:
        close = [a for a in available if a.startswith(arch.rstrip("0123456789_")[:3])] or available[:12]
        raise ModelError(f"model.arch={arch!r} is not a torchvision classification model; e.g. {', '.join(close[:12])}")
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def _importable(target: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except ImportError as error:
        raise ModelError(f"model.target={target!r}: cannot import {module_name} ({error}); "
                         "put its package on PYTHONPATH or install it") from None
    except AttributeError:
        cls = None
    if cls is None:
        raise ModelError(f"model.target={target!r} names no class; write it as package.module.Class")
    try:
        module = cls(**kwargs)
    except TypeError as error:
        raise ModelError(f"model.target={target} refused model.kwargs={kwargs} ({error})") from None
    if not isinstance(module, nn.Module):
        raise ModelError(f"model.target={target} built a {type(module).__name__}, not a torch.nn.Module")
    return module
