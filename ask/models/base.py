"""The backbone contract: hidden layers addressed by name, normalisation inside the model.

Every architecture is a :class:`FeatureModel` built from an ordered list of named *stages*; the
last stage is the classifier and is always called ``"logits"``. :meth:`FeatureModel.forward_features`
runs the stages in that order, keeps the outputs that were asked for and stops after the deepest
one, so tapping ``block1`` never pays for the rest of the network. Code outside this package uses
the layer names only, never module order or indices.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ask.errors import ConfigError, ModelError
from ask.utils.layout import is_channels_last

__all__ = ["FeatureModel", "LOGITS", "init_weights"]

logger = logging.getLogger(__name__)

#: Name of the classifier output; accepted by :meth:`FeatureModel.forward_features`.
LOGITS = "logits"

#: Smallest image side every architecture must accept.
MIN_IMAGE_SIZE = 8


class FeatureModel(nn.Module):
    """Backbone whose hidden layers are addressed by name.

    Input: float images in [0, 1], shape N×C×H×W. ``(x - mean) / std`` happens inside (the
    statistics are non-persistent buffers, so they are not in the ``state_dict``), which lets
    attacks work on raw pixels and clip to [0, 1]. A model built with ``normalize=False`` (the
    default of architectures whose ``normalizes_by_default`` is False, such as the ASK authors'
    VGG16) feeds the pixels to its first layer unchanged; its buffers then hold 0 and 1.

    Subclasses build their modules and then call :meth:`_set_stages` once with the ordered
    ``(name, module)`` pairs, the classifier last under the name ``"logits"``.

    Attributes:
        name: architecture name, as given to :func:`ask.models.build_model`.
        num_classes: number of output classes.
        in_channels: number of input channels.
        image_size: the image side the model was built for (other sizes work where the
            architecture allows, e.g. the global pools adapt).
        layer_names: hidden layers in forward order (``"logits"`` excluded).
        input_normalized: whether ``(x - mean) / std`` is applied to the input.
        config: the keyword arguments that rebuild this model with ``build_model(**config)``.
    """

    name: str = "featuremodel"
    #: Whether the input is normalised when the builder passes ``normalize=None``.
    normalizes_by_default: bool = True

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        normalize: bool | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(num_classes, "num_classes")
        check_positive_int(in_channels, "in_channels")
        check_positive_int(image_size, "image_size")
        if image_size < MIN_IMAGE_SIZE:
            raise ConfigError(
                f"image_size={image_size} is too small for model '{self.name}'; "
                f"use images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels"
            )
        mean_t = _channel_stats(mean, in_channels, "mean")
        std_t = _channel_stats(std, in_channels, "std")
        if bool((std_t <= 0).any()):
            raise ConfigError(f"std={list(std)} must be positive for every channel")
        self.num_classes = int(num_classes)
        self.in_channels = int(in_channels)
        self.image_size = int(image_size)
        self.input_normalized = self.normalizes_by_default if normalize is None else bool(normalize)
        if not self.input_normalized:
            mean_t, std_t = torch.zeros_like(mean_t), torch.ones_like(std_t)
        # Non-persistent: the statistics belong to the dataset config, and a checkpoint trained
        # with them must not silently override a different normalisation on load.
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)
        self.config: dict[str, Any] = {}
        self._stage_names: tuple[str, ...] = ()
        self.stages = nn.ModuleDict()

    # ----------------------------------------------------------------------------------- setup
    def _set_stages(self, stages: Iterable[tuple[str, nn.Module]]) -> None:
        """Register the ordered stages; the last must be the classifier named ``"logits"``."""
        pairs = list(stages)
        names = [n for n, _ in pairs]
        if not names or names[-1] != LOGITS:
            raise ValueError(f"the last stage must be named '{LOGITS}', got {names}")
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        self.stages = nn.ModuleDict(pairs)
        # The order is kept explicitly rather than read back from the container.
        self._stage_names = tuple(names)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """Hidden layers in forward order; ``"logits"`` is not among them."""
        return self._stage_names[:-1]

    # --------------------------------------------------------------------------------- forward
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] pixels to the network's input scale (``x`` itself when ``input_normalized`` is False)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ModelError(
                f"model '{self.name}' expects images of shape N×{self.in_channels}×H×W, "
                f"got {tuple(x.shape)}; check dataset.channels against the checkpoint"
            )
        if not self.input_normalized:
            return x
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of [0, 1] images."""
        h = self.normalize(x)
        for name in self._stage_names:
            h = self.stages[name](h)
        return h

    def forward_features(
        self,
        x: torch.Tensor,
        layers: str | Sequence[str],
        with_logits: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Outputs of the named layers, in one pass.

        Args:
            x: images in [0, 1], N×C×H×W.
            layers: layer names (``"logits"`` allowed); a single string means one layer.
            with_logits: also return ``"logits"`` (the pass then runs to the end).

        Returns:
            A dict from each requested name to its unflattened output (``pool`` and ``logits``
            are N×D). The pass stops after the deepest requested layer, so nothing beyond it
            is computed. The tensors keep their autograd graph.

        Raises:
            ModelError: a name is not a layer of this model.
        """
        wanted = _as_name_list(layers)
        self.check_layers(wanted)
        if with_logits:
            wanted.append(LOGITS)
        if not wanted:
            return {}
        wanted_set = set(wanted)
        last = max(self._stage_names.index(n) for n in wanted_set)
        out: dict[str, torch.Tensor] = {}
        h = self.normalize(x)
        for name in self._stage_names[: last + 1]:
            h = self.stages[name](h)
            if name in wanted_set:
                out[name] = h
        return out

    def check_layers(self, layers: str | Sequence[str]) -> None:
        """Raise :class:`ModelError` naming the valid layers if any of ``layers`` is unknown."""
        for layer in _as_name_list(layers):
            if layer not in self._stage_names:
                raise ModelError(
                    f"model '{self.name}' has no layer '{layer}'; its layers are: "
                    f"{', '.join(self._stage_names)}"
                )

    @torch.no_grad()
    def feature_shapes(self, image_size: int | None = None) -> dict[str, tuple[int, ...]]:
        """Per-sample output shape of every layer (and ``"logits"``) at ``image_size``.

        Runs one dummy image in eval mode (batch-norm needs no batch statistics then) and
        restores the previous mode.
        """
        size = self.image_size if image_size is None else int(image_size)
        ref = next(self.parameters())
        x = torch.zeros(1, self.in_channels, size, size, device=ref.device, dtype=ref.dtype)
        was_training = self.training
        self.eval()
        try:
            feats = self.forward_features(x, self.layer_names, with_logits=True)
        finally:
            self.train(was_training)
        return {name: tuple(t.shape[1:]) for name, t in feats.items()}

    def extra_repr(self) -> str:
        return (
            f"name={self.name}, num_classes={self.num_classes}, in_channels={self.in_channels}, "
            f"image_size={self.image_size}, normalized={self.input_normalized}, layers={list(self.layer_names)}"
        )


# ------------------------------------------------------------------------------------ helpers
class GlobalAvgPool(nn.Module):
    """The mean over the spatial positions, flattened: ``[B, C, H, W] -> [B, C]``.

    Not ``nn.AdaptiveAvgPool2d(1)``: its CUDA backward has no deterministic kernel, so under
    ``deterministic=true`` on a GPU the first gradient (a training step or an attack) would raise.
    The mean is the same value (bit for bit on the CPU) and its backward is deterministic. It has
    no parameters, so checkpoints written with the old module load unchanged.

    Its gradient comes back in the input's memory layout. Autograd's own backward of the mean
    returns it in the default layout, and in a channels-last network every batch norm and ReLU
    backward below it then ran on mixed layouts. Handing it back channels-last made a PGD-CE step
    on a channels-last smallcnn in bf16 (CIFAR-10 batch, CPU, one thread) about 7 % cheaper; the
    gradients are the same bit for bit.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SpatialMean.apply(x)


class _SpatialMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        ctx.layout = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        return x.mean(dim=(2, 3))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        # Written with differentiable ops, so a second backward (create_graph) still works.
        positions = ctx.shape[2] * ctx.shape[3]
        return (grad / positions)[:, :, None, None].expand(ctx.shape).contiguous(memory_format=ctx.layout)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions (fan-out, ReLU), unit/zero batch-norm, small-normal linear."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _as_name_list(layers: str | Sequence[str]) -> list[str]:
    # A bare string would otherwise be iterated character by character.
    if isinstance(layers, str):
        return [layers]
    names = list(layers)
    for name in names:
        if not isinstance(name, str):
            raise ModelError(f"layer names must be strings, got {name!r} in {names}")
    return names


def check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}={value!r} must be a positive integer")


def _channel_stats(values: Sequence[float], channels: int, what: str) -> torch.Tensor:
    try:
        t = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}={values!r} must be a list of {channels} numbers") from exc
    if t.numel() != channels:
        raise ConfigError(
            f"{what} has {t.numel()} values but the images have {channels} channels; "
            f"give one {what} per channel"
        )
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{what}={list(values)} must be finite")
    return t
