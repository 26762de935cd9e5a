"""ASK-Def (Wang, Chen, Yao, Liu, Rajapakse and Hero, *ASK: Adversarial Soft k-Nearest Neighbor
Attack and Defense*, IEEE Access 10, 2022, arXiv:2106.14300).

Minimise CE(f(x_PGD), y) + beta * ASK(h_l(x_ASK), y; R) where
- x_PGD maximises the cross-entropy in the ``eps_pgd`` ball (AT's term),
- x_ASK maximises the ASK loss in the ``eps_ask`` ball against the reference set R (the ASK-Atk
  inner loop),
- R is drawn afresh at every step: ``n_ref`` random training images of every class plus their
  PGD-perturbed copies, each copy keeping the label of its source, so 2 * n_ref per class.

Choices the paper leaves open (SPEC, Defences), made here:
- The references come from the training split the trainer passes in (``train_split``), not from
  the batch: a batch need not hold ``n_ref`` images of every class (it cannot with 1000 classes),
  and drawing from the batch would put each point's own clean image among its references. The
  draw is class-balanced and without replacement within a class; a reference may also be in the
  batch. Reference images are not augmented.
- Their PGD copies come from the same batched PGD call as x_PGD (one attack on the batch and the
  references together), at ``eps_pgd``.
- Reference features are computed once per step with the current weights, in eval mode, and carry
  no gradient: R plays the part of the kNN pool, which is fixed when the kNN votes, so the
  regulariser moves h_l(x_ASK) towards its class's references and away from the others, not the
  references towards it. The same R serves the inner ASK maximisation and the outer loss.
- Both inner maximisations run in eval mode (the authors' script ran the ASK one in train mode);
  the outer passes run in train mode, x_PGD and x_ASK each in its own pass, and x_ASK's pass stops
  at layer l (its logits are never used).
- The authors' script labelled the PGD copies with ``labels.repeat_interleave(2)`` against images
  concatenated as ``[clean; perturbed]``; here :func:`mix_references` concatenates the labels in
  the same order, and :func:`group_by_class` arranges features by their labels, never by position.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ask.attacks.ask_loss import KINDS, ask_margin, loss_from_margin
from ask.attacks.base import pgd_maximise
from ask.data import ImageSplit, to_float
from ask.defenses.at import check_number, inner_mode, make_threat, pgd_ce
from ask.defenses.base import Defense, register_defense
from ask.errors import ConfigError, DataError
from ask.knn.similarity import METRICS

__all__ = [
    "ASKDefense",
    "InnerPoints",
    "ReferenceSampler",
    "group_by_class",
    "mix_references",
]


class ReferenceSampler:
    """Draws ``per_class`` random images of every class from a split, without replacement in a class.

    Random numbers come from torch's global CPU generator (saved in the trainer's checkpoints, so a
    resumed run draws the same references).
    """

    def __init__(self, split: ImageSplit, num_classes: int, per_class: int) -> None:
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
        # Rows of each class, padded with -1 to a [C, max_count] table so one draw serves all classes.
        order = torch.argsort(split.labels, stable=True)
        width = int(counts.max()) if len(split) else 0
        self._rows = torch.full((num_classes, width), -1, dtype=torch.long)
        for c, group in enumerate(torch.split(order, counts.tolist())):
            self._rows[c, :len(group)] = group
        self._valid = self._rows >= 0

    def draw(self) -> Tensor:
        """Row indices into the split, [C, per_class]; row c holds distinct images of class c."""
        keys = torch.rand(self._rows.shape).masked_fill_(~self._valid, 2.0)
        picked = keys.topk(self.per_class, dim=1, largest=False).indices
        return self._rows.gather(1, picked)

    def sample(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(images float [C * per_class, ...] in [0, 1], labels [C * per_class])`` on ``device``, class-major."""
        rows = self.draw().reshape(-1)
        images = to_float(self.split.images[rows].to(device, non_blocking=True))
        labels = self.split.labels[rows].to(device, non_blocking=True)
        return images, labels


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


class InnerPoints(NamedTuple):
    """What ASK-Def's inner maximisations produce for one batch (all detached).

    Attributes:
        x_pgd: the batch after PGD-CE at ``eps_pgd``, [B, ...].
        x_ask: the batch after the ASK maximisation at ``eps_ask``, [B, ...].
        ref_images: the reference images, clean ones then their PGD copies, [2 * C * n_ref, ...].
        ref_labels: their labels, [2 * C * n_ref].
        references: their features at the layer grouped by label, [C, 2 * n_ref, D].
    """

    x_pgd: Tensor
    x_ask: Tensor
    ref_images: Tensor
    ref_labels: Tensor
    references: Tensor


@register_defense
class ASKDefense(Defense):
    """ASK-Def: AT's CE on x_PGD plus ``beta`` times the ASK loss of x_ASK against a per-batch reference set.

    See the module docstring for the choices made where the paper is silent.

    Hyperparameters (``conf/defense/ask_def.yaml``; defaults are the authors' CIFAR-10 settings):
        layer: the hidden layer l (default: the first of ``knn.layers``).
        metric: ``cosine`` or ``l2`` (default the kNN's metric, cosine).
        temperature: T of the soft kNN (0.1; the attack's 0.01 is for evaluation).
        kind: ``instance`` (the paper's) or ``class``.
        beta: weight of the ASK term (1).
        n_ref: clean references per class (5; 2 * n_ref with the PGD copies).
        eps_pgd: ball of the CE term and of the references' copies (4/255).
        eps_ask: ball of the ASK maximisation (8/255).
        step_size, steps: budget of both inner maximisations (2/255, 10 steps).
        norm: ``linf`` or ``l2``.

    Context from the trainer: ``train_split`` (the reference source) and ``knn_layers``.
    """

    name = "ask_def"

    def __init__(
        self,
        model: nn.Module,
        *,
        label_smoothing: float = 0.0,
        train_split: ImageSplit | None = None,
        knn_layers: list[str] | None = None,
        layer: str | None = None,
        metric: str = "cosine",
        temperature: float = 0.1,
        kind: str = "instance",
        beta: float = 1.0,
        n_ref: int = 5,
        eps_pgd: Any = "4/255",
        eps_ask: Any = "8/255",
        step_size: Any = "2/255",
        steps: int = 10,
        norm: str = "linf",
        **unknown: Any,
    ) -> None:
        super().__init__(model, label_smoothing=label_smoothing, **unknown)
        if train_split is None:
            raise ConfigError("defense 'ask_def' draws its references from the training split; pass train_split=...")
        if layer is None:
            if not knn_layers:
                raise ConfigError("defense 'ask_def' needs a layer; set defense.params.layer (e.g. block3)")
            layer = knn_layers[0]
        if hasattr(model, "check_layers"):
            model.check_layers([layer])
        if metric not in METRICS:
            raise ConfigError(f"defense 'ask_def' metric={metric!r} is not one of {', '.join(METRICS)}")
        if kind not in KINDS:
            raise ConfigError(f"defense 'ask_def' kind={kind!r} is not one of {', '.join(KINDS)}")
        self.layer = layer
        self.metric = metric
        self.kind = kind
        self.temperature = check_number(self.name, "temperature", temperature, strict=True)
        self.beta = check_number(self.name, "beta", beta)
        n_ref = check_number(self.name, "n_ref", n_ref, minimum=1, integer=True)
        self.pgd_threat = make_threat(self.name, eps=eps_pgd, step_size=step_size, steps=steps, norm=norm,
                                      eps_name="eps_pgd")
        self.ask_threat = make_threat(self.name, eps=eps_ask, step_size=step_size, steps=steps, norm=norm,
                                      eps_name="eps_ask")
        num_classes = getattr(model, "num_classes", None) or int(train_split.labels.max()) + 1
        self.num_classes = int(num_classes)
        self.sampler = ReferenceSampler(train_split, self.num_classes, n_ref)

    # ------------------------------------------------------------------------- pieces
    def features(self, images: Tensor) -> Tensor:
        """Flattened h_l(images) in the model's current mode (differentiable)."""
        return self.model.forward_features(images, [self.layer])[self.layer].flatten(1)

    def margin(self, features: Tensor, labels: Tensor, references: Tensor) -> Tensor:
        """Per-example ASK margin of ``features`` against the shared ``references`` [C, m, D]."""
        return ask_margin(features, references, labels, metric=self.metric,
                          temperature=self.temperature, kind=self.kind)

    def inner(self, images: Tensor, labels: Tensor) -> InnerPoints:
        """Both inner maximisations and the reference set (eval mode, frozen weights; both restored)."""
        device = images.device
        ref_clean, ref_y = self.sampler.sample(device)
        batch = images.shape[0]
        with inner_mode(self.model):
            # One PGD call for the batch and the references: the same attack, batched.
            adversarial = pgd_ce(self.model, torch.cat([images, ref_clean.to(images.dtype)]),
                                 torch.cat([labels, ref_y]), self.pgd_threat)
            x_pgd, ref_pgd = adversarial[:batch], adversarial[batch:]
            ref_images, ref_labels = mix_references(ref_clean, ref_pgd, ref_y)
            with torch.no_grad():
                references = group_by_class(self.features(ref_images), ref_labels, self.num_classes).detach()

            def objective(x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
                # Record the loss, step along the margin (same sign steps, no underflow).
                margin = self.margin(self.features(x_adv), y, references)
                return loss_from_margin(margin, self.kind), margin

            if self.ask_threat.is_trivial:
                x_ask = images.detach()
            else:
                x_ask = pgd_maximise(objective, images, labels, self.ask_threat).adversarial
        return InnerPoints(x_pgd, x_ask, ref_images, ref_labels, references)

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        points = self.inner(images, labels)
        logits = self.model(points.x_pgd)
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        ask = loss_from_margin(self.margin(self.features(points.x_ask), labels, points.references), self.kind)
        return ce + self.beta * ask.mean(), logits
