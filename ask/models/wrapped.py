"""Any classifier ``nn.Module`` as a :class:`FeatureModel`: hidden layers named by module path.

A torchvision ResNet, a timm model or a network of your own gets ask's contract (``[0, 1]`` pixels
in, the normalisation inside, ``forward_features(x, layers)`` by name) without changing its code:

>>> model = wrap(torchvision.models.resnet50(weights="IMAGENET1K_V2"), layers=["layer3"],
...              mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], image_size=224)
>>> model.forward_features(images, ["layer3"])["layer3"].shape     # (N, 1024, 14, 14)

Layers are read with torchvision's ``create_feature_extractor`` (torch.fx): a module path such as
``layer3`` names the output of the last operation inside that module, and a deeper path
(``layer3.1.conv2``) or any graph node name works too. Only the part of the network up to the
deepest requested layer runs. The extractors share the wrapped module's parameters and buffers,
so training, batch-norm statistics and ``.to(device)`` act on one set of weights.

The wrapper never calls the wrapped module's own ``forward_features``: timm gives that name
another meaning (``forward_features(x)``, the unpooled last stage), and it stays usable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ask.errors import ModelError
from ask.models.base import LOGITS, FeatureModel, _as_name_list

__all__ = ["WrappedModel", "wrap"]

# Module paths deeper than this are left out of the listing in an unknown-layer message (they
# still work as layer names); ResNet's layer3.1 is depth 2.
_LISTED_DEPTH = 2


class WrappedModel(FeatureModel):
    """A classifier ``nn.Module`` whose hidden layers are addressed by module path.

    Built by :func:`wrap`. ``module`` is kept as the submodule ``network``, so its ``state_dict``
    keys are prefixed ``network.`` (not ``module.``, which checkpoints strip as DataParallel's);
    ``name`` is its class name.
    """

    name = "wrapped"

    def __init__(
        self,
        module: nn.Module,
        *,
        in_channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: bool,
        num_classes: int | None = None,
    ) -> None:
        from torchvision.models.feature_extraction import get_graph_node_names

        if not isinstance(module, nn.Module):
            raise ModelError(f"ask.wrap needs a torch.nn.Module; got {type(module).__name__}")
        super().__init__(num_classes or 1, in_channels, image_size, mean, std, normalize)
        self.name = type(module).__name__
        self.network = module
        try:
            _, eval_nodes = get_graph_node_names(module)
        except Exception as error:  # torch.fx could not trace it: say which model and why, in one line
            raise ModelError(
                f"{self.name} cannot be traced by torch.fx, which names its layers "
                f"({type(error).__name__}: {_first_line(error)}); mark the untraceable submodules as leaves "
                "or wrap a traceable part of the network"
            ) from None
        self._nodes = tuple(eval_nodes)
        self._output_node = eval_nodes[-1]
        self._listed_paths = tuple(
            path for path, _ in module.named_modules()
            if path and path.count(".") < _LISTED_DEPTH and self._names_a_node(path)
        )
        self._extractors: dict[tuple[str, ...], Any] = {}  # not submodules: they share module's weights
        logits = self._dummy_logits()
        if num_classes is None:
            num_classes = logits.shape[1]
        elif logits.shape[1] != num_classes:
            raise ModelError(f"{self.name} returns {logits.shape[1]} logits but num_classes={num_classes}; "
                             "give the number of classes the network was trained for")
        self.num_classes = int(num_classes)
        self.config = {"name": self.name, "num_classes": self.num_classes, "in_channels": int(in_channels),
                       "image_size": int(image_size), "mean": [float(v) for v in mean],
                       "std": [float(v) for v in std], "normalize": self.input_normalized}

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The module paths down to depth two, in definition order (deeper paths work too)."""
        return self._listed_paths

    def _names_a_node(self, name: str) -> bool:
        return any(node == name or node.startswith(name + ".") for node in self._nodes)

    def check_layers(self, layers: str | Sequence[str]) -> None:
        for layer in _as_name_list(layers):
            if layer != LOGITS and not self._names_a_node(layer):
                shown = ", ".join(self._listed_paths[:40]) + (", ..." if len(self._listed_paths) > 40 else "")
                raise ModelError(f"model '{self.name}' has no layer '{layer}'; its module paths include: {shown}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(self.normalize(x))
        if not isinstance(out, torch.Tensor):
            raise ModelError(f"{self.name}'s forward returned {type(out).__name__}, not a tensor of logits; "
                             "wrap a module whose forward returns the logits")
        return out

    def forward_features(self, x: torch.Tensor, layers: str | Sequence[str],
                         with_logits: bool = False) -> dict[str, torch.Tensor]:
        wanted = _as_name_list(layers)
        self.check_layers(wanted)
        if with_logits and LOGITS not in wanted:
            wanted.append(LOGITS)
        if not wanted:
            return {}
        nodes = tuple(dict.fromkeys(self._output_node if name == LOGITS else name for name in wanted))
        extractor = self._extractor(nodes)
        extractor.train(self.training)
        found = extractor(self.normalize(x))
        return {name: found[self._output_node if name == LOGITS else name] for name in wanted}

    def _extractor(self, nodes: tuple[str, ...]) -> Any:
        extractor = self._extractors.get(nodes)
        if extractor is None:
            from torchvision.models.feature_extraction import create_feature_extractor

            extractor = create_feature_extractor(self.network, return_nodes=list(nodes))
            self._extractors[nodes] = extractor
        return extractor

    @torch.no_grad()
    def _dummy_logits(self) -> torch.Tensor:
        ref = next(self.network.parameters(), None)
        x = torch.zeros(1, self.in_channels, self.image_size, self.image_size,
                        device=None if ref is None else ref.device)
        was_training = self.network.training
        self.network.eval()
        try:
            out = self.forward(x)
        except ModelError:
            raise
        except Exception as error:
            raise ModelError(
                f"{self.name} fails on a {self.in_channels}x{self.image_size}x{self.image_size} image "
                f"({type(error).__name__}: {_first_line(error)}); give the in_channels and image_size it was built for"
            ) from None
        finally:
            self.network.train(was_training)
        if out.dim() != 2:
            raise ModelError(f"{self.name}'s forward returned shape {tuple(out.shape)} for one image, not "
                             "[1, classes] logits; wrap a module whose forward returns the logits")
        return out


def wrap(
    module: nn.Module,
    *,
    layers: Sequence[str] = (),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    image_size: int = 224,
    in_channels: int = 3,
    num_classes: int | None = None,
) -> WrappedModel:
    """``module`` as a :class:`FeatureModel` that takes [0, 1] pixels and names its layers by module path.

    Args:
        module: a classifier whose ``forward`` returns logits.
        layers: layer names to check now (an unknown one raises, listing the module paths).
        mean, std: the per-channel normalisation ``module`` expects, applied inside; leave both
            unset for a network that takes [0, 1] pixels as they are.
        image_size, in_channels: the input the network was built for (one dummy image is run).
        num_classes: checked against the logits; by default read from them.
    """
    if (mean is None) != (std is None):
        raise ModelError("give ask.wrap both mean and std, or neither (for a network that takes [0, 1] pixels)")
    normalize = mean is not None
    model = WrappedModel(module, in_channels=in_channels, image_size=image_size,
                         mean=mean if normalize else [0.0] * in_channels,
                         std=std if normalize else [1.0] * in_channels,
                         normalize=normalize, num_classes=num_classes)
    model.check_layers(list(layers))
    return model


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:200] if text else ""
