"""The composition root: the parts of a run, built from its :class:`RunConfig`.

``ask-train`` and ``ask-attack`` both assemble their network, reference store, threat model,
attacks and victims here, so each part is built from the config in one place and neither
``ask.training`` nor ``ask.evaluation`` needs the other. This module wires; the parts themselves
live in the packages below it (models, knn, attacks), and what a run does with them lives above.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ask.attacks import Attack, ThreatModel, attack_class, attack_seed, build_attack
from ask.config.schema import EXTERNAL_MODELS, RunConfig
from ask.config.settings import settings_values
from ask.data import DataBundle, ImageSplit, balanced_indices
from ask.defenses import defense_class
from ask.errors import CheckpointError, ConfigError
from ask.knn import (
    DkNNClassifier,
    DkNNVoteClassifier,
    IndexSettings,
    KNNClassifier,
    ReferenceStore,
    store_cache_key,
)
from ask.models import FeatureModel, build_model
from ask.models.checkpoint import check_compatible, load_checkpoint, load_plain_weights, load_weights
from ask.utils.runtime import float32_precision

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ the settings
def check_run_settings(run: RunConfig) -> None:
    """Check every selected attack's and the defence's settings that need no data and no model
    (``check_settings`` of each class), so a value out of range stops the run before any dataset
    loads or any model trains; :class:`ConfigError` names the first bad one."""
    if run.attack is not None:
        for name in run.attack.methods:
            attack_class(name).check_settings(settings_values(run.attack.settings(name)))
    defense_class(run.defense.name).check_settings(settings_values(run.defense.settings()))


# ------------------------------------------------------------------------------------ the network
def build_model_for(run: RunConfig, data: DataBundle) -> FeatureModel:
    """The untrained network ``run.model`` names, for ``data``'s classes and images; with
    ``model.weights``, loaded from that plain state_dict."""
    if run.model.name in EXTERNAL_MODELS:
        from ask.models.external import build_external

        model = build_external(
            run.model.name, num_classes=data.num_classes, in_channels=data.in_channels,
            image_size=data.image_size, mean=run.model.mean or data.mean, std=run.model.std or data.std,
            normalize=run.model.normalize, arch=run.model.arch, target=run.model.target, kwargs=run.model.kwargs,
        )
    else:
        model = build_model(
            run.model.name,
            num_classes=data.num_classes,
            in_channels=data.in_channels,
            image_size=data.image_size,
            mean=run.model.mean or data.mean,
            std=run.model.std or data.std,
            width=run.model.width,
            normalize=run.model.normalize,
        )
    if run.model.weights:
        load_plain_weights(getattr(model, "network", model), run.model.weights, run.model.state_dict_key,
                           run.model.strip_prefix)
    return model


def load_model(path: str | Path, run: RunConfig, data: DataBundle, device: torch.device,
               checkpoint: dict[str, Any] | None = None) -> FeatureModel:
    """The checkpoint's network on ``device`` in eval mode; ``checkpoint`` if already loaded from ``path``."""
    checkpoint = checkpoint if checkpoint is not None else load_checkpoint(path)
    spec = checkpoint["model"]
    check_compatible(spec, path, model_name=run.model.name, num_classes=data.num_classes,
                     in_channels=data.in_channels, image_size=data.image_size)
    # The checkpoint, not the config, says how its network was built (None: written before
    # normalize was recorded, so the architecture's default, which those runs all used).
    built = replace(run.model, width=spec["width"], normalize=spec.get("normalize"), weights=None)
    if spec["name"] in EXTERNAL_MODELS:
        for field in ("arch", "target"):
            if getattr(run.model, field) and spec.get(field) and getattr(run.model, field) != spec[field]:
                raise CheckpointError(f"checkpoint '{path}' holds a {spec[field]} but model.{field}="
                                      f"{getattr(run.model, field)}; set model.{field}={spec[field]}")
        built = replace(built, arch=spec.get("arch"), target=spec.get("target"), kwargs=spec.get("kwargs") or {},
                        mean=spec["mean"], std=spec["std"])
    model = build_model_for(replace(run, model=built), data)
    load_weights(model, checkpoint["state_dict"], path)
    return model.to(device).eval()


# ---------------------------------------------------------------------------- the reference store
def reference_pool(run: RunConfig, data: DataBundle) -> Tensor:
    """The training-split indices of the kNN reference pool: all of it, or ``knn.pool_per_class``
    per class drawn with the run's seed (the same pool for training's validation and the attacks)."""
    if run.knn.pool_per_class is None:
        return torch.arange(len(data.train))
    return balanced_indices(data.train.labels, run.knn.pool_per_class, torch.Generator().manual_seed(run.seed),
                            "knn.pool_per_class", data.classes)


def index_settings(run: RunConfig) -> IndexSettings:
    """The run's ``knn.index`` / ``nlist`` / ``nprobe`` / ``feature_dtype`` / ``use_gpu``, as one object."""
    knn = run.knn
    return IndexSettings(kind=knn.index, nlist=knn.nlist, nprobe=knn.nprobe, feature_dtype=knn.feature_dtype,
                         use_gpu=knn.use_gpu)


def feature_cache_key(run: RunConfig, checkpoint_digest: str, layers: list[str], pool: torch.Tensor,
                      image_shape: Sequence[int], device: torch.device) -> dict[str, Any]:
    """What identifies the pool's features in the cache: :func:`store_cache_key` plus the dataset,
    the stored dtype, and the device type and float32 precision they were computed at.

    A GPU's kernels and TF32 (``tf32=true``) give features that differ from the CPU's in the last
    bits or by ~1e-3, so each combination gets its own entry. Entries written before the device and
    precision were in the key are not found any more and are rebuilt once (the old directories
    under ``<cache_dir>/features`` can be deleted).
    """
    return store_cache_key(checkpoint_digest, layers, run.knn.metric, pool, image_shape, extra={
        "dataset": run.dataset.name, "feature_dtype": run.knn.feature_dtype, "device": device.type,
        "float32_precision": float32_precision(device, run.tf32),
    })


def build_store(run: RunConfig, model: FeatureModel, data: DataBundle, checkpoint_digest: str,
                layers: list[str], device: torch.device) -> ReferenceStore:
    """Reference-pool features at every layer any victim or attack needs, cached on disk.

    The cache is a directory per :func:`feature_cache_key` (checkpoint, pool, layers, metric, dtype,
    device type, float32 precision), written chunk by chunk (see :mod:`ask.knn.features`). With
    ``knn.index=ivf`` the recall@k of the approximate index against exact search is measured here
    and logged; ``store.index_report(k=run.knn.k, layers=run.knn.layers)`` returns it (cached) for
    ``metrics.json``.
    """
    pool = reference_pool(run, data)
    labels = data.train.labels[pool]
    counts = torch.bincount(labels, minlength=data.num_classes)
    smallest = int(counts.argmin())
    needed_k = max([run.knn.k] + [getattr(run.attack.settings(name), "k", 0) for name in run.attack.methods])
    if int(counts[smallest]) < needed_k:
        raise ConfigError(
            f"k={needed_k} but class '{data.classes[smallest]}' has only {int(counts[smallest])} reference "
            "points; lower knn.k or raise knn.pool_per_class / dataset.train_per_class"
        )
    key = feature_cache_key(run, checkpoint_digest, layers, pool, data.train.images.shape[1:], device)
    cache_path = None
    if run.knn.cache:
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        cache_path = Path(run.cache_dir).expanduser() / "features" / f"{run.dataset.name}-{digest}"
    store = ReferenceStore.build(
        model, data.train.images_at(pool), labels, layers, run.knn.metric, data.num_classes,
        pool_indices=pool, batch_size=run.knn.batch_size, device=device, cache_path=cache_path,
        cache_key=key, progress=run.progress, settings=index_settings(run),
    )
    if run.knn.index != "flat":
        # Approximate neighbours change robustness numbers: say how approximate, before any attack.
        report = store.index_report(k=run.knn.k, layers=run.knn.layers)
        for layer, entry in report["layers"].items():
            if "recall_at_k" in entry:
                log.warning("knn.index=%s at layer %s: recall@%d %.4f against exact search (%s)", run.knn.index,
                            layer, entry["k"], entry["recall_at_k"], entry["protocol"])
            else:
                log.info("knn.index=%s at layer %s: the pool is too small for IVF, the index is exact",
                         run.knn.index, layer)
    return store


def build_exact_store(run: RunConfig, model: FeatureModel, data: DataBundle, layers: list[str],
                      device: torch.device) -> ReferenceStore:
    """The pool's features with the model's current weights: exact search, in memory, never cached
    (training's weights change every epoch, so a cache entry would never be read again)."""
    pool = reference_pool(run, data)
    return ReferenceStore.build(
        model, data.train.images_at(pool), data.train.labels[pool], layers, run.knn.metric, data.num_classes,
        pool_indices=pool, batch_size=run.knn.batch_size, device=device, progress=False,
        settings=IndexSettings(use_gpu=run.knn.use_gpu),
    )


# ----------------------------------------------------------------------------------- the attacks
def build_threat_model(run: RunConfig) -> ThreatModel:
    """The ball and step budget every attack of the run shares (``attack.eps``, ``norm``, ``steps``, ...)."""
    assert run.attack is not None
    settings = run.attack
    return ThreatModel(eps=settings.eps, norm=settings.norm, steps=settings.steps,
                       step_size=settings.step_size, random_start=settings.random_start)


def build_attacks(run: RunConfig, model: nn.Module, threat: ThreatModel, store: ReferenceStore | None,
                  device: torch.device, settings: Mapping[str, Any] | None = None) -> dict[str, Attack]:
    """One attack per entry of ``settings`` (name -> its typed settings or a mapping of hyperparameters;
    default every attack of ``attack.methods``, typed), each drawing its random starts from a
    generator of its own, seeded by the run's seed and its name."""
    assert run.attack is not None
    if settings is None:
        settings = {name: run.attack.settings(name) for name in run.attack.methods}
    return {
        name: build_attack(name, model, threat, given, store=store,
                           generator=torch.Generator(device=device).manual_seed(attack_seed(run.seed, name)))
        for name, given in settings.items()
    }


# ----------------------------------------------------------------------------------- the victims
@dataclass
class Victim:
    """A classifier under attack: a name and a batch -> (predicted labels, credibility or None)."""

    name: str
    judge: Callable[[Tensor], tuple[Tensor, Tensor | None]]


def _labels_only(predict: Callable[[Tensor], Tensor]) -> Callable[[Tensor], tuple[Tensor, None]]:
    return lambda x: (predict(x), None)


class _OneForwardPerInput(nn.Module):
    """The victims' view of the network: one forward pass per input serves every victim.

    Scoring a batch, the DNN wants the logits, the kNN its layer and both DkNN victims their
    layers: four passes through the same network on the same images. The first request runs
    through every layer a victim taps (and the logits, with ``logits``), and later requests for
    the same tensor (same memory, shape, strides and version) are answered from that pass. The
    values are those of a pass of their own, since a stage's output does not depend on where
    the pass stops. Only without gradients (victims need none); one input is kept at a time.
    """

    def __init__(self, model: FeatureModel, layers: list[str], logits: bool) -> None:
        super().__init__()
        self.model = model
        self.layers = list(dict.fromkeys(layers))
        self.logits = logits
        self._last: tuple[tuple, Tensor, dict[str, Tensor]] | None = None
        # Victims restore the training flag they found on this wrapper, and that reaches the model.
        self.train(model.training)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x, [], with_logits=True)["logits"]

    def forward_features(self, x: Tensor, layers: str | list[str], with_logits: bool = False) -> dict[str, Tensor]:
        wanted = [layers] if isinstance(layers, str) else list(layers)
        if torch.is_grad_enabled() or not set(wanted) <= set(self.layers) or (with_logits and not self.logits):
            return self.model.forward_features(x, wanted, with_logits=with_logits)
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device, x._version, self.model.training)
        if self._last is None or self._last[0] != key:
            # Holding x keeps its memory alive, so no other tensor can come with the same key.
            self._last = (key, x, self.model.forward_features(x, self.layers, with_logits=self.logits))
        out = self._last[2]
        return {name: out[name] for name in wanted + (["logits"] if with_logits else [])}

    def check_layers(self, layers: str | list[str]) -> None:
        self.model.check_layers(layers)


def build_victims(names: list[str], model: FeatureModel, store: ReferenceStore, run: RunConfig,
                  calibration: ImageSplit | None = None) -> list[Victim]:
    """The classifiers to score. DkNN is calibrated on ``calibration``, a split held out from the pool.

    They share one forward pass per scored batch (:class:`_OneForwardPerInput`).
    """
    tapped = ([run.knn.layers[0]] if "knn" in names else []) + (
        list(run.knn.dknn_layers) if {"dknn", "dknn_vote"} & set(names) else [])
    model = _OneForwardPerInput(model, tapped, logits="dnn" in names)
    victims = []
    for name in names:
        if name == "dnn":
            victims.append(Victim("dnn", _labels_only(lambda x: model(x).argmax(1))))
        elif name == "knn":
            # The kNN victim votes on the first listed layer; DkNN uses them all.
            knn = KNNClassifier(model, store, run.knn.layers[0], run.knn.k)
            victims.append(Victim("knn", _labels_only(knn.predict)))
        elif name == "dknn":
            dknn = DkNNClassifier(
                model, store, run.knn.dknn_layers, run.knn.k,
                calibration_images=None if calibration is None else calibration.images,
                calibration_labels=None if calibration is None else calibration.labels,
                batch_size=run.knn.batch_size,
            )
            # Its labels equal the summed vote's (p_j falls as alpha_j rises); what DkNN adds is
            # credibility, the p-value of the prediction, which a deployment thresholds to reject.
            victims.append(Victim("dknn", lambda x, dknn=dknn: dknn.predict_with_confidence(x)[:2]))
        elif name == "dknn_vote":
            vote = DkNNVoteClassifier(model, store, run.knn.dknn_layers, run.knn.k)
            victims.append(Victim("dknn_vote", _labels_only(vote.predict)))
        else:
            raise ConfigError(f"unknown victim '{name}'; choose from dnn, knn, dknn, dknn_vote")
    return victims


# ------------------------------------------------------------------------ model selection's parts
def selection_attack_settings(run: RunConfig) -> dict[str, Any]:
    """The attacks model selection runs (``train.select_metric``): PGD-CE against the network and
    ASK-Atk against the kNN victim, with the settings of the run's ``pgd`` and ``ask`` where they
    are among ``attack.methods``, otherwise the attacks' own defaults (ASK-Atk on ``knn.layers``
    with ``knn.k``)."""
    assert run.attack is not None
    selected = run.attack.methods
    ask = run.attack.settings("ask") if "ask" in selected else {"layers": list(run.knn.layers), "k": run.knn.k}
    return {"pgd": run.attack.settings("pgd") if "pgd" in selected else {}, "ask": ask}


@dataclass
class SelectionParts:
    """What robust validation judges with: the attacks by name (``pgd``, ``ask``) and the victims
    they are judged against by name (``dnn``, ``knn``)."""

    attacks: dict[str, Attack]
    victims: dict[str, Victim]


def build_selection_parts(run: RunConfig, model: FeatureModel, data: DataBundle,
                          device: torch.device) -> SelectionParts:
    """Model selection's attacks and victims for the model's current weights, on an exact, uncached
    store of the reference pool (:func:`build_exact_store`) at the kNN victim's and ASK-Atk's layers."""
    settings = selection_attack_settings(run)
    ask_layers = settings["ask"]["layers"] if isinstance(settings["ask"], Mapping) else settings["ask"].layers
    layers = list(dict.fromkeys([run.knn.layers[0], *ask_layers]))
    store = build_exact_store(run, model, data, layers, device)
    victims = build_victims(["dnn", "knn"], model, store, run)
    attacks = build_attacks(run, model, build_threat_model(run), store, device, settings)
    return SelectionParts(attacks=attacks, victims={victim.name: victim for victim in victims})
