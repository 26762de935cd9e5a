"""ASK-Atk: projected gradient ascent on the Adversarial Soft kNN loss.

Wang, Chen, Yao, Liu, Rajapakse and Hero, *ASK: Adversarial Soft k-Nearest Neighbor Attack and
Defense*, IEEE Access 10 (2022), arXiv:2106.14300.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ask.attacks.ask_loss import KINDS, ClassSums, multi_layer_ask_objective
from ask.attacks.base import Attack
from ask.attacks.registry import register_attack
from ask.attacks.support import check_int, check_knn_layers, check_labels, check_positive, smallest_class
from ask.attacks.threat import ThreatModel
from ask.constants import METRICS
from ask.errors import ConfigError
from ask.knn.similarity import l2_normalize

__all__ = ["ASKAttack", "ASKInstanceAttack", "gather_references"]

_MB = 1024 * 1024


def gather_references(pool: Tensor, rows: Tensor, *, device: torch.device, unit: bool = False,
                      summed: bool = False, chunk_bytes: int | None = None) -> Tensor:
    """The pool rows ``rows`` [B, C, k] as reference features on ``device``, in at least float32.

    Returns [B, C, k, D], or with ``summed`` the per-class sums [B, C, D] (:class:`ClassSums`'
    tensor); ``unit`` l2-normalises every reference first (cosine). The rows are gathered
    ``chunk_bytes`` of features at a time, whole (example, class) groups of k, so what exists
    beside the result is a piece and its temporaries (about two pieces), never the whole
    [B, C, k, D] tensor: for a batch of 128 on ImageNet-1k at ResNet18's layer4 (25,088-d) that
    tensor is 64 GB, while the summed result is 13 GB. Measured on the CPU for a CIFAR-10 batch
    at 8,192-d (a 200 MiB [B, C, k, D]): the summed references peaked 404 MiB above the start in
    one piece and about 100 MiB in pieces of 16 MiB.
    """
    batch, num_classes, k = rows.shape
    dim = pool.shape[1]
    dtype = torch.promote_types(pool.dtype, torch.float32)
    groups = rows.reshape(batch * num_classes, k).to(pool.device)
    out = torch.empty((len(groups), dim) if summed else (len(groups), k, dim), device=device, dtype=dtype)
    group_bytes = k * dim * dtype.itemsize
    step = len(groups) if chunk_bytes is None else max(1, chunk_bytes // group_bytes)
    for start in range(0, len(groups), step):
        piece = pool.index_select(0, groups[start:start + step].reshape(-1))
        piece = piece.to(device=device, dtype=dtype).view(-1, k, dim)
        if unit:
            piece = l2_normalize(piece)
        out[start:start + step] = piece.sum(dim=1) if summed else piece
    return out.view(batch, num_classes, dim) if summed else out.view(batch, num_classes, k, dim)


@register_attack
class ASKAttack(Attack):
    """ASK-Atk (Wang et al. 2022): push a point's hidden features out of its class's kNN neighbourhood.

    For each clean input x the attack first finds, at every attacked layer l, the ``k`` pool
    points of *each* class nearest to h_l(x) (``store.search_per_class``); these in-class
    references stay fixed while x is perturbed. It then maximises
    ``sum_l kappa_l * ASK_l(h_l(x'), references_l, y)`` over the threat ball by projected gradient
    ascent (random start, sign steps for L-inf, normalised steps for L2), see
    :func:`ask.attacks.ask_loss.ask_loss` for the instance-wise and class-wise losses.

    The default is the attack the authors run (SPEC, "The authors' code"): the class-wise loss at
    T = 0.01, cosine, k = 5; their CIFAR-10 settings add VGG16 block 4, 2000 pool points per
    class, eps 8/255, step 2/255, 20 steps. At T = 0.01 the instance-wise loss makes a much weaker
    attack (:class:`ASKInstanceAttack` keeps it available beside the default); at T = 0.1 both
    are weaker than PGD on cross-entropy for an undefended model.

    Cost of a step: the backbone only up to the deepest attacked layer (``forward_features``
    stops there), then the similarities. With the class-wise cosine loss the references enter
    only as their per-class sums of unit vectors, formed once per batch (:class:`ClassSums`), so
    the similarities are a [B, C, D] product; the instance-wise and L2 losses hold all
    [B, C, k, D] references and compare against each one.

    Hyperparameters:
        layers: the attacked layer names (each must be in the store).
        kappa: one weight per layer (default 1 each).
        temperature: T of the soft kNN.
        k: references per class.
        kind: ``"class"`` (class-mean logits, the authors' attack) or ``"instance"`` (the soft kNN
            probability of the paper's equations); default :attr:`default_kind`.
        include_self: the clean h_l(x) joins R_y as one more reference.
        targeted: the labels passed to the call are *target* classes and the loss is minimised,
            pulling h_l(x') towards the target class's references.
        keep_best: return per point the iterate with the highest loss rather than the last.
        metric: similarity of the loss; default the store's metric (the references are always
            the store's nearest under its own metric).
        chunk_mb: the most reference features, in MiB, gathered or compared at once (a piece's
            temporaries come to about twice that): the per-batch gathering runs in pieces of
            this size, and so do the per-step L2 (or un-normalised cosine) similarities,
            recomputed piece by piece in the backward pass. The
            references the steps use are held whole: [B, C, D] for the class-wise cosine loss,
            [B, C, k, D] otherwise (lower the evaluation batch if those do not fit).
    """

    name = "ask"
    needs_store = True
    default_kind = "class"

    def __init__(
        self,
        model: nn.Module,
        threat: ThreatModel,
        *,
        store: Any = None,
        generator: torch.Generator | None = None,
        layers: str | Sequence[str] = (),
        kappa: Sequence[float] | None = None,
        temperature: float = 0.01,
        k: int = 5,
        kind: str | None = None,
        include_self: bool = False,
        targeted: bool = False,
        keep_best: bool = False,
        metric: str | None = None,
        chunk_mb: float = 1024,
    ) -> None:
        layer_list = [layers] if isinstance(layers, str) else list(layers)
        kind = self.default_kind if kind is None else kind
        try:
            kappa_list = [1.0] * len(layer_list) if kappa is None else [float(w) for w in kappa]
        except (TypeError, ValueError):
            raise ConfigError(f"attack '{self.name}' kappa={kappa!r} must be a list of numbers, one per layer") from None
        super().__init__(
            model, threat, store=store, generator=generator,
            layers=layer_list, kappa=kappa_list, temperature=temperature, k=k, kind=kind,
            include_self=include_self, targeted=targeted, keep_best=keep_best, metric=metric, chunk_mb=chunk_mb,
        )
        layer_list = check_knn_layers(self.name, model, store, layer_list)
        if len(kappa_list) != len(layer_list):
            raise ConfigError(
                f"attack '{self.name}' has {len(kappa_list)} kappa weights for {len(layer_list)} layers; "
                "give one weight per layer or leave kappa unset"
            )
        checked = self.check_settings({"temperature": temperature, "chunk_mb": chunk_mb, "k": k, "kind": kind})
        temperature, chunk_mb, k = checked["temperature"], checked["chunk_mb"], checked["k"]
        resolved_metric = store.metric if metric is None else metric
        if resolved_metric not in METRICS:
            raise ConfigError(f"attack '{self.name}' metric={resolved_metric!r} is not one of {', '.join(METRICS)}")
        smallest = smallest_class(store)
        if smallest < k:
            raise ConfigError(
                f"attack '{self.name}' k={k} but the smallest class of the reference pool has {smallest} points; "
                "lower k or enlarge knn.pool_per_class"
            )
        self.layers = layer_list
        self.kappa = dict(zip(layer_list, kappa_list, strict=True))
        self.temperature = float(temperature)
        self.k = k
        self.kind = kind
        self.include_self = include_self
        self.targeted = targeted
        self.keep_best = keep_best
        self.metric = resolved_metric
        self.chunk_bytes = max(1, int(chunk_mb * _MB))

    @classmethod
    def check_settings(cls, settings: Mapping[str, Any]) -> dict[str, Any]:
        checked = {
            "temperature": check_positive(cls.name, "temperature", settings["temperature"], example="0.01"),
            "chunk_mb": check_positive(cls.name, "chunk_mb", settings["chunk_mb"], example="1024"),
            "k": check_int(cls.name, "k", settings["k"]),
        }
        if settings["kind"] not in KINDS:
            raise ConfigError(f"attack '{cls.name}' kind={settings['kind']!r} is not one of {', '.join(KINDS)}")
        return checked

    @property
    def summed(self) -> bool:
        """The steps use per-class sums of unit references (the class-wise cosine loss)."""
        return self.kind == "class" and self.metric == "cosine"

    @torch.no_grad()
    def neighbours(self, images: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(rows, clean_features)`` per layer: the pool rows [B, C, k] of the in-class references
        of clean ``images`` (the k nearest pool points of every class to h_l(x)) and the flattened
        h_l(x), [B, D]."""
        feats = self.model.forward_features(images, self.layers)
        rows: dict[str, Tensor] = {}
        clean: dict[str, Tensor] = {}
        for layer in self.layers:
            query = feats[layer].flatten(1).detach()
            pool = self.store.features[layer]
            if query.shape[1] != pool.shape[1]:
                raise ConfigError(
                    f"layer '{layer}' gives {query.shape[1]}-dim features but the reference store holds "
                    f"{pool.shape[1]}-dim ones; rebuild the store with this model"
                )
            # Queries stay on their device: the store picks a GPU index for CUDA queries.
            _, idx = self.store.search_per_class(layer, query, self.k)
            rows[layer] = torch.as_tensor(idx).long()
            clean[layer] = query
        return rows, clean

    @torch.no_grad()
    def references(self, images: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The in-class references of clean ``images`` and their clean features, per layer.

        Returns ``(references, clean_features)``: references[l] is [B, C, k, D] on the images'
        device (the k nearest pool points of every class to h_l(x), gathered from
        ``store.features[l]``), clean_features[l] is the flattened h_l(x), [B, D]. The attack's
        steps use :meth:`step_references`, the same references in the form the loss needs.
        """
        rows, clean = self.neighbours(images)
        refs = {layer: gather_references(self.store.features[layer], rows[layer], device=images.device,
                                         chunk_bytes=self.chunk_bytes) for layer in self.layers}
        return refs, clean

    @torch.no_grad()
    def step_references(self, images: Tensor) -> tuple[dict[str, Tensor | ClassSums], dict[str, Tensor]]:
        """:meth:`references` as the steps use them, formed once per batch: for the class-wise
        cosine loss the per-class sums of unit references (:class:`ClassSums`, [B, C, D]), for the
        instance-wise cosine loss the unit references, for L2 the references as they are."""
        rows, clean = self.neighbours(images)
        refs: dict[str, Tensor | ClassSums] = {}
        for layer in self.layers:
            gathered = gather_references(self.store.features[layer], rows[layer], device=images.device,
                                         unit=self.metric == "cosine", summed=self.summed,
                                         chunk_bytes=self.chunk_bytes)
            refs[layer] = ClassSums(gathered, self.k) if self.summed else gathered
        return refs, clean

    def perturb(self, images: Tensor, labels: Tensor) -> Tensor:
        refs, clean = self.step_references(images)
        check_labels(labels, self.store.num_classes)
        self_features = clean if self.include_self else None
        sign = -1.0 if self.targeted else 1.0

        def objective(x_adv: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            feats = self.model.forward_features(x_adv, self.layers)
            loss, direction = multi_layer_ask_objective(
                feats, refs, y, kappa=self.kappa, metric=self.metric, temperature=self.temperature,
                kind=self.kind, self_features=self_features, references_normalized=self.metric == "cosine",
                max_chunk_bytes=self.chunk_bytes,
            )
            # Steps follow `direction` (same sign steps as the loss, no float32 underflow).
            return sign * loss, sign * direction

        return self.maximise(objective, images, labels, keep_best=self.keep_best)


@register_attack
class ASKInstanceAttack(ASKAttack):
    """ASK-Atk with the instance-wise (soft kNN probability) loss, as a separate attack option.

    The same attack as :class:`ASKAttack` with ``kind="instance"`` by default, registered under
    its own name so that one run reports both losses side by side (``attack=[ask,ask_instance]``).
    """

    name = "ask_instance"
    default_kind = "instance"
