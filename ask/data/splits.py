"""Image splits and class-balanced subsets."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from ask.errors import DataError


@dataclass
class ImageSplit:
    """Images and labels of one split, kept as compact uint8 on the CPU.

    Attributes:
        images: ``uint8`` tensor ``N x C x H x W``, contiguous, on the CPU.
        labels: ``int64`` tensor ``N`` of class indices.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"ImageSplit.images must be uint8 N x C x H x W, got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise ValueError(f"ImageSplit.labels must be int64 of shape N, got {self.labels.dtype}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.images = self.images.cpu().contiguous()
        self.labels = self.labels.cpu()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> ImageSplit:
        """The images at ``indices`` (in the given order), copied."""
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        return ImageSplit(self.images[indices].contiguous(), self.labels[indices].clone())

    def images_at(self, indices: torch.Tensor) -> torch.Tensor:
        """The images at ``indices``; the split's own tensor, not a copy, when that is all of them in order
        (a memory-mapped ImageNet split must not be copied into RAM to build a reference pool)."""
        indices = torch.as_tensor(indices, dtype=torch.long).cpu()
        if len(indices) == len(self) and torch.equal(indices, torch.arange(len(self))):
            return self.images
        return self.images[indices]

    def class_counts(self, num_classes: int) -> torch.Tensor:
        """Number of images of each class, ``int64`` of length ``num_classes``."""
        return torch.bincount(self.labels, minlength=num_classes)


def balanced_indices(
    labels: torch.Tensor,
    per_class: int,
    generator: torch.Generator,
    what: str,
    classes: list[str],
) -> torch.Tensor:
    """Pick ``per_class`` random indices of every class; return them sorted.

    Args:
        labels: ``int64`` class indices in ``[0, len(classes))``.
        per_class: how many indices to draw from each class.
        generator: CPU generator driving the draw (same seed, same indices).
        what: the option that asked for ``per_class`` (e.g. ``dataset.train_per_class``); named in
            the error message.
        classes: class names, for the error message; ``len(classes)`` is the number of classes.

    Raises:
        DataError: a class has fewer than ``per_class`` images.
    """
    if per_class < 0:
        raise ValueError(f"per_class={per_class} must be >= 0")
    labels = labels.detach().cpu().long()
    num_classes = len(classes)
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"labels fall outside 0..{num_classes - 1} for the {num_classes} classes; "
            "check that the dataset's class list matches its labels"
        )
    counts = torch.bincount(labels, minlength=num_classes)
    short = [c for c in range(num_classes) if int(counts[c]) < per_class]
    if short:
        c = min(short, key=lambda k: int(counts[k]))
        others = len(short) - 1
        more = f" ({others} other class{'es' if others > 1 else ''} too)" if others else ""
        raise DataError(
            f"{what}={per_class} but class '{classes[c]}' has only {int(counts[c])} images"
            f"{more}; lower {what} to at most {int(counts[c])}"
        )
    # One stable sort groups each class's indices in their original order, so the draw below
    # depends only on the labels and the generator.
    order = torch.argsort(labels, stable=True)
    chosen = []
    for group in torch.split(order, counts.tolist()):
        if per_class == 0:
            break
        perm = torch.randperm(len(group), generator=generator)[:per_class]
        chosen.append(group[perm])
    if not chosen:
        return torch.empty(0, dtype=torch.long)
    return torch.sort(torch.cat(chosen)).values


def purpose_generator(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and a purpose name.

    Separate streams keep, for one seed, the test subset unchanged when the training subset sizes
    change (and the validation split unchanged when the calibration size changes).
    """
    digest = hashlib.sha256(f"{seed}/{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def complement(n: int, indices: torch.Tensor) -> torch.Tensor:
    """Sorted indices in ``range(n)`` that are not in ``indices``."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[indices] = False
    return keep.nonzero().flatten()


def point_indices(n_split: int, n_points: int | None, seed: int) -> torch.Tensor:
    """Where in a split of ``n_split`` the points :func:`select_points` picks are, in order."""
    if n_points is None or n_points >= n_split:
        return torch.arange(n_split)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_split, generator=generator)[:n_points].sort().values


def select_points(split: ImageSplit, n_points: int | None, seed: int) -> ImageSplit:
    """The first ``n_points`` of a seeded shuffle (folders are class-sorted; a prefix would be one class).

    The points an evaluation attacks, and the validation points robust validation attacks.
    """
    if n_points is None or n_points >= len(split):
        return split
    return split.subset(point_indices(len(split), n_points, seed))
