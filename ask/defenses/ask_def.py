"""ASK-Def (Wang, Chen, Yao, Liu, Rajapakse and Hero, *ASK: Adversarial Soft k-Nearest Neighbor
Attack and Defense*, IEEE Access 10, 2022, arXiv:2106.14300).

Minimise CE(f(x_PGD), y) + beta * ASK(h_l(x_ASK), y; R) where
- x_PGD maximises the cross-entropy in the ``eps_pgd`` ball (AT's term),
- x_ASK maximises the ASK loss in the ``eps_ask`` ball against the reference set R (the ASK-Atk
  inner loop),
- R is drawn afresh at every step: ``n_ref`` training images of every class plus their
  PGD-perturbed copies, each copy keeping the label of its source, so 2 * n_ref per class.

One training step follows the authors' order (SPEC, "The authors' code"): draw the references,
their PGD copies, the reference features, the inner ASK maximisation, x_PGD, then the outer
passes (x_PGD, optionally the clean batch, x_ASK). Where the authors' step and ours differ, a
named switch picks the behaviour; ``defense=ask_def_authors`` sets every switch to the authors'
side, ``defense=ask_def`` keeps ours:

=====================  ===============  ==========  ==================================================
switch                 ours (ask_def)   authors'    what it decides
=====================  ===============  ==========  ==================================================
``reference_draw``     ``random``       ``cycle``   n_ref random images per class each step, or per-class
                                                    shuffled orders walked through and reshuffled when spent
``augment_references`` false            true        the training augmentation on the reference images
``reference_mode``     ``eval``         ``train``   mode of the reference-feature pass (train: batch-norm
                                                    statistics of the reference batch, running stats updated)
``reference_grad``     false            true        the outer loss back-propagates through h_l(references)
``ask_mode``           ``eval``         ``train``   mode of the inner ASK maximisation (train: running
                                                    statistics updated at every step)
``pgd_mode``           ``eval``         ``eval``    mode of the PGD-CE maximisations (batch and references)
``ask_start_clip``     true             false       the ASK loop's random start projected into the ball and
                                                    [0, 1] before the first step
``clean_pass``         false            true        an extra train-mode forward of the clean batch before the
                                                    x_ASK pass (its output unused; it updates batch norm)
``full_forward``       false            true        train-mode feature passes run the network to its end, as
                                                    the authors' forward does: the layers after l (their batch
                                                    norm, their dropout's random numbers) see the reference
                                                    batch, every train-mode ASK iterate and x_ASK
``log_eps``            ``1e-12``        ``1e-6``    the constant in the instance-wise -log(p_y + eps)
=====================  ===============  ==========  ==================================================

Why ours differs: R plays the part of the kNN pool, which is fixed when the kNN votes, so by
default the regulariser moves h_l(x_ASK) towards its class's references, not the references
towards it (no gradient), and batch-norm statistics are never taken from adversarial points or
the small reference batch (eval mode); a feature pass stops at l, where its output is used.
The references are drawn from the training split the trainer passes in (``train_split``), never
from the batch: a batch need not hold ``n_ref`` images of every class (it cannot with 1000
classes).

``full_forward`` changes nothing where no layer after l keeps state or draws random numbers
(smallcnn's block3: a global pool and a linear head). Elsewhere (VGG16's block4, smallcnn's
block2) it decides the running statistics of the later batch-norm layers, and through them every
eval-mode pass: the PGD-CE that makes x_PGD and the references' copies, model selection, and the
DNN victim. ``log_eps`` keeps the two losses close: with cosine similarities of post-ReLU
features (>= 0) at T = 0.1 and 2 * n_ref references per class, p_y >= 1 / (1 + (C - 1) e^10)
(5e-6 for ten classes), so the two constants change the loss by at most log(1 + 1e-6 / p_y) < 0.2
and an example's gradient by a factor p_y / (p_y + eps) >= 0.83.

Drawing and arranging R (and the authors' labelling bug, fixed in both variants) is
:mod:`ask.defenses.references`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ask.attacks.ascent import pgd_maximise
from ask.attacks.ask_loss import KINDS, ask_margin, loss_from_margin
from ask.data import ImageSplit, augment_batch
from ask.defenses.at import check_number, inner_mode, make_threat, module_mode, pgd_ce
from ask.defenses.base import Defense, register_defense
from ask.defenses.references import ReferenceSampler, check_reference_draw, group_by_class, mix_references
from ask.errors import ConfigError
from ask.knn.similarity import METRICS, flatten_features

__all__ = [
    "ASKDefense",
    "AuthorsASKDefense",
    "InnerPoints",
    "MODES",
]


MODES = ("train", "eval")


class InnerPoints(NamedTuple):
    """What ASK-Def's inner maximisations produce for one batch.

    Attributes:
        x_pgd: the batch after PGD-CE at ``eps_pgd``, [B, ...] (detached).
        x_ask: the batch after the ASK maximisation at ``eps_ask``, [B, ...] (detached).
        ref_images: the reference images, clean ones then their PGD copies, [2 * C * n_ref, ...].
        ref_labels: their labels, [2 * C * n_ref].
        references: their features at the layer grouped by label, [C, 2 * n_ref, D]; with
            ``reference_grad`` they carry the graph back to the weights.
    """

    x_pgd: Tensor
    x_ask: Tensor
    ref_images: Tensor
    ref_labels: Tensor
    references: Tensor


@register_defense
class ASKDefense(Defense):
    """ASK-Def: AT's CE on x_PGD plus ``beta`` times the ASK loss of x_ASK against a per-batch reference set.

    See the module docstring for the switches where our step and the authors' differ.

    Hyperparameters (``conf/defense/ask_def.yaml``; ``conf/defense/ask_def_authors.yaml``):
        layer: the hidden layer l (default: the first of ``knn.layers``).
        metric: ``cosine`` or ``l2`` (default the kNN's metric, cosine).
        temperature: T of the soft kNN (0.1; the attack's 0.01 is for evaluation).
        kind: ``instance`` (the authors' training loss) or ``class``.
        beta: weight of the ASK term (1).
        n_ref: clean references per class (5; 2 * n_ref with the PGD copies).
        eps_pgd: ball of the CE term and of the references' copies (4/255).
        eps_ask: ball of the ASK maximisation (8/255).
        step_size, steps: budget of both inner maximisations (2/255, 10 steps).
        norm: ``linf`` or ``l2``.
        reference_draw, augment_references, reference_mode, reference_grad, ask_mode, pgd_mode,
        ask_start_clip, clean_pass, full_forward, log_eps: the switches of the module docstring.
        reference_chunk: reference images per forward/backward pass of their PGD copies and of
            the reference-feature pass (null: the batch's size, which the batch's own PGD shows
            to fit). Only eval-mode passes are split, where examples are independent and the
            pieces give what one pass would; a train-mode pass (the authors' reference features)
            takes all 2 * C * n_ref images at once, since its batch statistics are the method.

    Context from the trainer: ``train_split`` (the reference source), ``knn_layers`` and
    ``augment`` (the training augmentation, for ``augment_references``).
    """

    name = "ask_def"
    #: The switches' values when a caller leaves them unset: our variant (module docstring).
    switches: ClassVar[dict[str, Any]] = {
        "reference_draw": "random", "augment_references": False, "reference_mode": "eval",
        "reference_grad": False, "ask_mode": "eval", "pgd_mode": "eval", "ask_start_clip": True,
        "clean_pass": False, "full_forward": False, "log_eps": 1e-12,
    }

    def __init__(
        self,
        model: nn.Module,
        *,
        label_smoothing: float = 0.0,
        train_split: ImageSplit | None = None,
        knn_layers: list[str] | None = None,
        augment: str = "none",
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
        reference_draw: str | None = None,
        augment_references: bool | None = None,
        reference_mode: str | None = None,
        reference_grad: bool | None = None,
        ask_mode: str | None = None,
        pgd_mode: str | None = None,
        ask_start_clip: bool | None = None,
        clean_pass: bool | None = None,
        full_forward: bool | None = None,
        log_eps: float | None = None,
        reference_chunk: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__(model, label_smoothing=label_smoothing, **unknown)
        given = {"reference_draw": reference_draw, "augment_references": augment_references,
                 "reference_mode": reference_mode, "reference_grad": reference_grad, "ask_mode": ask_mode,
                 "pgd_mode": pgd_mode, "ask_start_clip": ask_start_clip, "clean_pass": clean_pass,
                 "full_forward": full_forward, "log_eps": log_eps}
        switches = {key: self.switches[key] if value is None else value for key, value in given.items()}
        reference_draw, augment_references = switches["reference_draw"], switches["augment_references"]
        reference_mode, reference_grad = switches["reference_mode"], switches["reference_grad"]
        ask_mode, pgd_mode = switches["ask_mode"], switches["pgd_mode"]
        ask_start_clip, clean_pass = switches["ask_start_clip"], switches["clean_pass"]
        full_forward = switches["full_forward"]
        if train_split is None:
            raise ConfigError(f"defense '{self.name}' draws its references from the training split; "
                              "pass train_split=...")
        if layer is None:
            if not knn_layers:
                raise ConfigError(f"defense '{self.name}' needs a layer; set defense.params.layer (e.g. block3)")
            layer = knn_layers[0]
        if hasattr(model, "check_layers"):
            model.check_layers([layer])
        checked = self.check_settings({
            "metric": metric, "kind": kind, "temperature": temperature, "beta": beta, "n_ref": n_ref,
            "reference_chunk": reference_chunk, "eps_pgd": eps_pgd, "eps_ask": eps_ask, "step_size": step_size,
            "steps": steps, "norm": norm, **switches,
        })
        if augment_references and augment == "none":
            raise ConfigError("defense.params.augment_references=true but dataset.augment=none; "
                              "set dataset.augment=crop_flip or augment_references=false")
        self.layer = layer
        self.metric = metric
        self.kind = kind
        self.temperature, self.beta, n_ref = checked["temperature"], checked["beta"], checked["n_ref"]
        self.reference_chunk, self.log_eps = checked["reference_chunk"], checked["log_eps"]
        self.pgd_threat, self.ask_threat = checked["pgd_threat"], checked["ask_threat"]
        num_classes = getattr(model, "num_classes", None) or int(train_split.labels.max()) + 1
        self.num_classes = int(num_classes)
        self.sampler = ReferenceSampler(train_split, self.num_classes, n_ref, reference_draw)
        self.augment = augment if augment_references else "none"
        self.reference_train = reference_mode == "train"
        self.reference_grad = reference_grad
        self.ask_train = ask_mode == "train"
        self.pgd_train = pgd_mode == "train"
        self.ask_start_clip = ask_start_clip
        self.clean_pass = clean_pass
        self.full_forward = full_forward

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        if settings["metric"] not in METRICS:
            raise ConfigError(f"defense '{cls.name}' metric={settings['metric']!r} is not one of {', '.join(METRICS)}")
        if settings["kind"] not in KINDS:
            raise ConfigError(f"defense '{cls.name}' kind={settings['kind']!r} is not one of {', '.join(KINDS)}")
        for name in ("reference_mode", "ask_mode", "pgd_mode"):
            if settings[name] not in MODES:
                raise ConfigError(f"defense.params.{name}={settings[name]!r} is not one of {', '.join(MODES)}")
        for name in ("augment_references", "reference_grad", "ask_start_clip", "clean_pass", "full_forward"):
            if not isinstance(settings[name], bool):
                raise ConfigError(f"defense.params.{name}={settings[name]!r} must be true or false")
        check_reference_draw(settings["reference_draw"])
        chunk = settings["reference_chunk"]
        budget = {"step_size": settings["step_size"], "steps": settings["steps"], "norm": settings["norm"]}
        return {
            "temperature": check_number(cls.name, "temperature", settings["temperature"], strict=True),
            "beta": check_number(cls.name, "beta", settings["beta"]),
            "n_ref": check_number(cls.name, "n_ref", settings["n_ref"], minimum=1, integer=True),
            "log_eps": check_number(cls.name, "log_eps", settings["log_eps"]),
            "reference_chunk": None if chunk is None else check_number(cls.name, "reference_chunk", chunk, minimum=1,
                                                                       integer=True),
            "pgd_threat": make_threat(cls.name, eps=settings["eps_pgd"], eps_name="eps_pgd", **budget),
            "ask_threat": make_threat(cls.name, eps=settings["eps_ask"], eps_name="eps_ask", **budget),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state.get("sampler") or {})

    # ------------------------------------------------------------------------- pieces
    def features(self, images: Tensor) -> Tensor:
        """Flattened h_l(images) in the model's current mode (differentiable).

        With ``full_forward`` a train-mode pass runs on to the logits (and discards them), as the
        authors' forward always does, so that the layers after l see it. In eval mode those layers
        change nothing, and the pass stops at l.
        """
        to_the_end = self.full_forward and self.model.training
        outputs = self.model.forward_features(images, [self.layer], with_logits=to_the_end)
        return flatten_features(outputs[self.layer])

    def margin(self, features: Tensor, labels: Tensor, references: Tensor) -> Tensor:
        """Per-example ASK margin of ``features`` against the shared ``references`` [C, m, D]."""
        return ask_margin(features, references, labels, metric=self.metric,
                          temperature=self.temperature, kind=self.kind)

    def reference_set(self, device: torch.device, dtype: torch.dtype,
                      chunk: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(images, labels, features [C, 2 * n_ref, D])``: the references, their PGD copies, h_l of both.

        ``chunk``: images per eval-mode pass (None: all at once; see ``reference_chunk``).
        """
        ref_clean, ref_y = self.sampler.sample(device)
        ref_clean = augment_batch(ref_clean.to(dtype), self.augment)
        ref_pgd = pgd_ce(self.model, ref_clean, ref_y, self.pgd_threat, training=self.pgd_train, chunk=chunk)
        ref_images, ref_labels = mix_references(ref_clean, ref_pgd, ref_y)
        step = len(ref_images) if self.reference_train or chunk is None else chunk
        with module_mode(self.model, self.reference_train), torch.set_grad_enabled(self.reference_grad):
            pieces = [self.features(ref_images[i:i + step]) for i in range(0, len(ref_images), step)]
        features = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return ref_images, ref_labels, group_by_class(features, ref_labels, self.num_classes)

    def ask_maximise(self, images: Tensor, labels: Tensor, references: Tensor) -> Tensor:
        """x_ASK: the inner ASK maximisation against fixed (detached) ``references``."""
        if self.ask_threat.is_trivial:
            return images.detach()

        def objective(x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            margin = self.margin(self.features(x_adv), y, references)
            loss = loss_from_margin(margin, self.kind, self.log_eps)
            # Eval mode: step along the margin (same sign steps, no underflow). Train mode: batch
            # statistics couple the examples, so only the loss's own gradient is exact.
            return loss, loss if self.ask_train else margin

        with inner_mode(self.model, self.ask_train):
            return pgd_maximise(objective, images, labels, self.ask_threat,
                                clip_start=self.ask_start_clip).adversarial

    def inner(self, images: Tensor, labels: Tensor) -> InnerPoints:
        """The reference set and both inner maximisations, in the authors' order (modes restored)."""
        chunk = self.reference_chunk or len(images)
        ref_images, ref_labels, references = self.reference_set(images.device, images.dtype, chunk)
        x_ask = self.ask_maximise(images, labels, references.detach())
        x_pgd = pgd_ce(self.model, images, labels, self.pgd_threat, training=self.pgd_train)
        return InnerPoints(x_pgd, x_ask, ref_images, ref_labels, references)

    def loss(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        points = self.inner(images, labels)
        logits = self.model(points.x_pgd)
        if self.clean_pass:
            with torch.no_grad():
                self.model(images)
        ce = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        ask = loss_from_margin(self.margin(self.features(points.x_ask), labels, points.references), self.kind,
                               self.log_eps)
        return ce + self.beta * ask.mean(), logits


@register_defense
class AuthorsASKDefense(ASKDefense):
    """ASK-Def exactly as the authors' training step runs (SPEC, "The authors' code"), label bug fixed.

    The same defence as :class:`ASKDefense` with every switch on the authors' side by default.
    """

    name = "ask_def_authors"
    switches: ClassVar[dict[str, Any]] = {
        "reference_draw": "cycle", "augment_references": True, "reference_mode": "train",
        "reference_grad": True, "ask_mode": "train", "pgd_mode": "eval", "ask_start_clip": False,
        "clean_pass": True, "full_forward": True, "log_eps": 1e-6,
    }
