"""ASK-Def's reference set R: which training images it holds each step and how they are arranged.

:class:`ReferenceSampler` draws ``n_ref`` images of every class from the training split (afresh or
cycling, the ``reference_draw`` switch of :mod:`ask.defenses.ask_def`); :func:`mix_references`
joins them with their PGD copies; :func:`group_by_class` arranges their features as the
``[C, m, D]`` table the ASK loss reads.

The authors' script labelled the PGD copies with ``labels.repeat_interleave(2)`` against images
concatenated as ``[clean; perturbed]``; both ASK-Def variants keep that bug fixed:
:func:`mix_references` concatenates the labels in the same order, and :func:`group_by_class`
arranges features by their labels, never by position.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ask.data import ImageSplit, to_float
from ask.errors import ConfigError, DataError
from ask.utils.runtime import to_device

__all__ = [
    "REFERENCE_DRAWS",
    "ReferenceSampler",
    "check_reference_draw",
    "group_by_class",
    "mix_references",
]


REFERENCE_DRAWS = ("random", "cycle")


def check_reference_draw(draw: Any) -> None:
    """:class:`ConfigError` unless ``draw`` is one of :data:`REFERENCE_DRAWS`."""
    if draw not in REFERENCE_DRAWS:
        raise ConfigError(f"defense.params.reference_draw={draw!r} is not one of {', '.join(REFERENCE_DRAWS)}")


class ReferenceSampler:
    """Draws ``per_class`` images of every class from a split, distinct within a class.

    ``draw="random"``: a fresh random choice at every call. ``draw="cycle"``: each class walks
    through its own random order, ``per_class`` images a call, and reshuffles when fewer than
    ``per_class`` are left (the authors' per-class shuffled loaders, cycled). Random numbers come
    from torch's global CPU generator, saved in the trainer's checkpoints; the cycle's position is
    :meth:`state_dict`, saved beside them, so a resumed run draws the same references.
    """

    def __init__(self, split: ImageSplit, num_classes: int, per_class: int, draw: str = "random") -> None:
        check_reference_draw(draw)
        counts = split.class_counts(num_classes)
        short = [c for c in range(num_classes) if int(counts[c]) < per_class]
        if short:
            c = min(short, key=lambda k: int(counts[k]))
            raise DataError(
                f"defense.params.n_ref={per_class} but class {c} has only {int(counts[c])} training images; "
                f"lower defense.params.n_ref to at most {int(counts[c])}"
            )
        self.split = split
        self.num_classes = int(num_classes)
        self.per_class = int(per_class)
        self.draw_mode = draw
        self._counts = counts.long()
        # Rows of each class, padded with -1 to a [C, max_count] table so one draw serves all classes.
        order = torch.argsort(split.labels, stable=True)
        width = int(counts.max()) if len(split) else 0
        self._rows = torch.full((num_classes, width), -1, dtype=torch.long)
        for c, group in enumerate(torch.split(order, counts.tolist())):
            self._rows[c, :len(group)] = group
        self._valid = self._rows >= 0
        # cycle: each class's current order (positions into its rows) and how far it has been used.
        self._order = torch.zeros_like(self._rows)
        self._used = self._counts.clone()  # "spent": the first draw shuffles every class

    def _keys(self) -> Tensor:
        """A uniform random key per row of the class table; padding gets 2, after every real row."""
        return torch.rand(self._rows.shape).masked_fill_(~self._valid, 2.0)

    def draw(self) -> Tensor:
        """Row indices into the split, [C, per_class]; row c holds distinct images of class c."""
        if self.draw_mode == "random":
            picked = self._keys().topk(self.per_class, dim=1, largest=False).indices
            return self._rows.gather(1, picked)
        spent = self._used + self.per_class > self._counts
        if bool(spent.any()):
            fresh = self._keys().argsort(dim=1)  # a random order of each class's rows, padding last
            self._order[spent] = fresh[spent]
            self._used[spent] = 0
        window = self._used.unsqueeze(1) + torch.arange(self.per_class)
        picked = self._order.gather(1, window)
        self._used += self.per_class
        return self._rows.gather(1, picked)

    def sample(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(images float [C * per_class, ...] in [0, 1], labels [C * per_class])`` on ``device``, class-major."""
        rows = self.draw().reshape(-1)
        images = to_float(to_device(self.split.images[rows], device))
        labels = to_device(self.split.labels[rows], device)
        return images, labels

    def state_dict(self) -> dict[str, Tensor]:
        return {"order": self._order.clone(), "used": self._used.clone()} if self.draw_mode == "cycle" else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.draw_mode == "cycle" and state:
            if state["order"].shape != self._order.shape:
                raise DataError("the checkpoint's reference cycle does not match this training split; "
                                "resume with the same dataset settings")
            self._order.copy_(state["order"])
            self._used.copy_(state["used"])


def mix_references(clean: Tensor, perturbed: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The reference images ``[clean; perturbed]`` and their labels ``[labels; labels]``.

    ``perturbed[i]`` is the PGD copy of ``clean[i]`` and keeps its label, so the labels are
    *repeated* as a block (``labels.repeat(2)``), not interleaved (``repeat_interleave(2)``, the
    authors' bug, which labels the i-th image with ``labels[i // 2]``).
    """
    if clean.shape != perturbed.shape or labels.shape != (clean.shape[0],):
        raise ValueError(
            f"clean {tuple(clean.shape)}, perturbed {tuple(perturbed.shape)} and labels {tuple(labels.shape)} "
            "must describe the same references"
        )
    return torch.cat([clean, perturbed]), torch.cat([labels, labels])


def group_by_class(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Arrange flattened features [N, D] as [C, m, D] by their labels (every class must have m rows).

    The arrangement reads the labels, never positions, so the references of class c are exactly
    the rows labelled c whatever order they came in.
    """
    counts = torch.bincount(labels, minlength=num_classes)
    if counts.numel() != num_classes or bool((counts != counts[0]).any()) or int(counts[0]) == 0:
        raise ValueError(f"every class needs the same positive number of references; got counts {counts.tolist()}")
    order = torch.argsort(labels, stable=True)
    return features.flatten(1)[order].view(num_classes, int(counts[0]), -1)
