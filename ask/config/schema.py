"""Typed schemas for every config group.

Hydra merges the YAML files of ``conf/`` into these dataclasses, so a wrong type (``knn.k=five``)
fails at composition time. Range checks live in ``__post_init__`` and run when
:func:`ask.config.resolve` turns the composed config into objects, before any compute starts.

Perturbation sizes (``eps``, ``step_size``) accept numbers or fractions such as ``8/255``.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from ask.config.settings import SettingsSection, parse_size
from ask.constants import AMP_SETTINGS, FEATURE_DTYPES, INDEX_KINDS, METRICS, NORMS, VICTIMS
from ask.errors import ConfigError

# How a folder's images reach dataset.image_size: the shorter side resized to image_size, or to
# image_size x 256/224 (the usual ImageNet evaluation: 256, then the centre 224), then centre-cropped.
RESIZE_RECIPES = {"short_side_crop": 1.0, "resize256_crop224": 256 / 224}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    _require(value in choices, f"{name}={value!r} is not one of {', '.join(choices)}")


def _amp_setting(value: Any, name: str) -> str:
    # Hydra hands a boolean over to a str field as "True"/"False"
    setting = {"true": "auto", "false": "off"}.get(str(value).strip().lower(), str(value).strip().lower())
    _check_choice(setting, AMP_SETTINGS, name)
    return setting


# ------------------------------------------------------------ settings that change no number
# Why a setting may differ between two configs that count as the same (a field's
# metadata["ignored_by"]); each comparison leaves out the settings marked with its purpose, and
# ignored_settings() is the only list of them.
#: Cannot change a number of an evaluation: left out of its resumable state's key (the
#: checkpoint's content digest stands in for its path).
EVALUATION_KEY = "evaluation_key"
#: A run directory holding results of another value is still this run's: it resumes, or is found
#: finished (a run saved on a GPU resumes on the CPU).
SAME_RUN = "same_run"
#: Never splits ask-report's rows: no effect on metrics.json, or part of the row's key already.
REPORT_ROWS = "report_rows"
IGNORED_PURPOSES = (EVALUATION_KEY, SAME_RUN, REPORT_ROWS)


def ignored_by(*purposes: str) -> dict[str, frozenset[str]]:
    """Field metadata: the comparisons (:data:`IGNORED_PURPOSES`) that leave this setting out."""
    assert set(purposes) <= set(IGNORED_PURPOSES), purposes
    return {"ignored_by": frozenset(purposes)}


def ignored_settings(purpose: str, schema: type | None = None, prefix: str = "") -> tuple[str, ...]:
    """Dotted paths of the :class:`RunConfig` settings marked ``ignored_by`` ``purpose``, in field order."""
    assert purpose in IGNORED_PURPOSES, purpose
    found: list[str] = []
    hints = typing.get_type_hints(schema or RunConfig)
    for f in fields(schema or RunConfig):
        if purpose in f.metadata.get("ignored_by", ()):
            found.append(prefix + f.name)
        nested = [a for a in (hints[f.name], *typing.get_args(hints[f.name])) if is_dataclass(a)]
        if nested:
            found.extend(ignored_settings(purpose, nested[0], f"{prefix}{f.name}."))
    return tuple(found)


@dataclass
class DatasetConfig:
    name: str = field(default="digits", metadata=ignored_by(REPORT_ROWS))
    # MISSING, not None: "???" in a dataset file cannot override a schema default in a merge.
    root: str | None = MISSING
    download: bool = field(default=False, metadata=ignored_by(EVALUATION_KEY, SAME_RUN, REPORT_ROWS))
    image_size: int | None = None  # resize side for folder datasets; None keeps the native size
    train_per_class: int | None = None  # class-balanced subset of the training split
    test_per_class: int | None = None
    val_per_class: int = 0  # held out from train for model selection, never used for fitting
    calib_per_class: int = 0  # held out from train for DkNN calibration
    augment: str = "none"  # none | crop | crop_flip
    auto_train: bool = False  # ask-attack may train a model on the fly when no checkpoint is given
    # keep decoded tensors on disk so JPEG folders are decoded once
    cache: bool = field(default=True, metadata=ignored_by(EVALUATION_KEY, SAME_RUN, REPORT_ROWS))
    # Image folders: the training and test folders under root (null: the preset's, [train, test]
    # for dataset=folder), the per-channel statistics (null: the preset's; for dataset=folder,
    # computed from the training split) and how images reach image_size
    splits: list[str] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    resize: str = "short_side_crop"  # short_side_crop | resize256_crop224 (what RESIZE_RECIPES says)

    def __post_init__(self) -> None:
        _check_choice(self.augment, ("none", "crop", "crop_flip"), "dataset.augment")
        _check_choice(self.resize, tuple(RESIZE_RECIPES), "dataset.resize")
        _require(self.splits is None or (len(self.splits) == 2 and len(set(self.splits)) == 2),
                 f"dataset.splits={self.splits} must name two folders, training then test, e.g. [train,val]")
        _require((self.mean is None) == (self.std is None), "give dataset.mean and dataset.std together, or neither")
        for name in ("train_per_class", "test_per_class", "image_size"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"dataset.{name}={value} must be positive or null")
        _require(self.val_per_class >= 0, "dataset.val_per_class must be >= 0")
        _require(self.calib_per_class >= 0, "dataset.calib_per_class must be >= 0")


# Model options that wrap a network ask did not define (ask.models.external): a torchvision
# architecture by name, or any importable nn.Module class.
EXTERNAL_MODELS = ("torchvision", "module")


@dataclass
class ModelConfig:
    name: str = field(default="smallcnn", metadata=ignored_by(REPORT_ROWS))
    # a best.pt / last.pt written by ask-train
    checkpoint: str | None = field(default=None, metadata=ignored_by(EVALUATION_KEY, REPORT_ROWS))
    width: int = 64  # base channel count; 64 is the standard VGG16 / ResNet18, smallcnn uses 32 on CPU
    default_layers: list[str] = field(default_factory=lambda: ["block3"])
    # (x - mean) / std inside the network; null = the architecture's default (false only for vgg16_authors)
    normalize: bool | None = None
    # model=torchvision: the architecture (torchvision.models.get_model's name, e.g. resnet50)
    arch: str | None = None
    # model=module: the class to build, "package.module.Class", with its keyword arguments
    target: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    # A plain state_dict file (torch.save(model.state_dict())), or a dict holding one under
    # state_dict_key; keys starting with strip_prefix (DataParallel's "module.") lose it.
    weights: str | None = None
    state_dict_key: str | None = None
    strip_prefix: str = "module."
    # The normalisation the network was trained with; null = the dataset's statistics
    mean: list[float] | None = None
    std: list[float] | None = None

    def __post_init__(self) -> None:
        _require(self.width > 0, f"model.width={self.width} must be positive")
        _require(not (self.checkpoint and self.weights),
                 "model.checkpoint and model.weights are both set; give one (checkpoint: a file written by "
                 "ask-train; weights: a plain state_dict)")
        _require((self.mean is None) == (self.std is None), "give model.mean and model.std together, or neither")
        if self.name == "torchvision":
            _require(bool(self.arch), "model=torchvision needs model.arch, e.g. model.arch=resnet18")
        if self.name == "module":
            _require(bool(self.target), "model=module needs model.target, e.g. model.target=mypackage.nets.Net")


@dataclass
class KnnConfig:
    layers: list[str] = field(default_factory=lambda: ["block3"])
    dknn_layers: list[str] = field(default_factory=lambda: ["block3"])  # DkNN victims vote on these
    k: int = 5
    metric: str = "cosine"  # cosine | l2 (similarity is minus the Euclidean distance)
    pool_per_class: int | None = None  # reference pool size per class; None = every training point
    index: str = "flat"  # flat: exact search | ivf: approximate (changes robustness numbers; recall is reported)
    nlist: int | None = None  # ivf cells; None = about 4 sqrt(N)
    nprobe: int = 32  # ivf cells scanned per query
    feature_dtype: str = "float32"  # float16 halves the feature cache on disk and in memory
    # use faiss on the GPU when the build and a device are present
    use_gpu: bool = field(default=True, metadata=ignored_by(REPORT_ROWS))
    batch_size: int = field(default=256, metadata=ignored_by(REPORT_ROWS))
    cache: bool = field(default=True, metadata=ignored_by(EVALUATION_KEY, SAME_RUN, REPORT_ROWS))

    def __post_init__(self) -> None:
        _require(self.k >= 1, f"knn.k={self.k} must be >= 1")
        _check_choice(self.metric, METRICS, "knn.metric")
        _check_choice(self.index, INDEX_KINDS, "knn.index")
        _check_choice(self.feature_dtype, FEATURE_DTYPES, "knn.feature_dtype")
        _require(self.nlist is None or self.nlist >= 1,
                 f"knn.nlist={self.nlist} must be >= 1 or null (null: about 4 sqrt(N) cells)")
        _require(self.nprobe >= 1, f"knn.nprobe={self.nprobe} must be >= 1, e.g. 32")
        _require(len(self.layers) > 0, "knn.layers is empty; name at least one layer, e.g. [block3]")
        _require(len(self.dknn_layers) > 0, "knn.dknn_layers is empty; name at least one layer")
        _require(
            self.pool_per_class is None or self.pool_per_class > 0,
            f"knn.pool_per_class={self.pool_per_class} must be positive or null",
        )
        _require(self.batch_size > 0, "knn.batch_size must be positive")


def _check_budget(config: Any, group: str) -> None:
    """Parse ``eps`` and ``step_size`` (``8/255`` allowed) and range-check them with ``steps``."""
    config.eps = parse_size(config.eps, f"{group}.eps")
    config.step_size = parse_size(config.step_size, f"{group}.step_size")
    _require(config.eps >= 0, f"{group}.eps={config.eps} must be >= 0")
    _require(config.step_size > 0, f"{group}.step_size={config.step_size} must be > 0")
    _require(config.steps >= 0, f"{group}.steps={config.steps} must be >= 0")


@dataclass
class AttackConfig:
    """The shared threat model plus each selected attack's own hyperparameters."""

    eps: Any = field(default="8/255", metadata=ignored_by(REPORT_ROWS))
    norm: str = field(default="linf", metadata=ignored_by(REPORT_ROWS))
    steps: int = 20
    step_size: Any = "2/255"
    random_start: bool = True
    # option name -> its hyperparameters, as composed (the keys of evaluations and of cached models
    # are built from these values); settings(name) is the same typed, checked here at resolve
    methods: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_budget(self, "attack")
        _check_choice(self.norm, NORMS, "attack.norm")
        _require(
            len(self.methods) > 0,
            "no attack selected; choose some with attack=[ask,pgd]",
        )
        for name in self.methods:
            self.settings(name)

    def settings(self, name: str) -> Any:
        """The attack ``name``'s settings (:mod:`ask.config.settings`), from ``methods[name]``."""
        return SettingsSection.of_attack(name).typed(self.methods[name])


@dataclass
class EvalConfig:
    victims: list[str] = field(default_factory=lambda: ["dnn", "knn", "dknn", "dknn_vote"], metadata=ignored_by(REPORT_ROWS))
    n_points: int | None = None  # evaluate the first n test points (after test_per_class)
    batch_size: int = field(default=128, metadata=ignored_by(REPORT_ROWS))
    # the attacks' forward/backward passes (victims always judge in fp32); as train.amp
    amp: str = "auto"
    channels_last: bool = True

    def __post_init__(self) -> None:
        self.amp = _amp_setting(self.amp, "eval.amp")
        _require(len(self.victims) > 0, f"eval.victims is empty; name at least one, e.g. eval.victims=[knn] "
                                        f"(available: {', '.join(VICTIMS)})")
        for victim in self.victims:
            _check_choice(victim, VICTIMS, "eval.victims entry")
        repeated = next((v for i, v in enumerate(self.victims) if v in self.victims[:i]), None)
        # Listed twice, a victim is evaluated twice and its rows look like two replicates in a report.
        _require(repeated is None, f"eval.victims names '{repeated}' twice; name each victim once, e.g. "
                                   f"eval.victims=[{','.join(dict.fromkeys(self.victims))}]")
        _require(self.n_points is None or self.n_points > 0,
                 f"eval.n_points={self.n_points} must be positive, or null for the whole test split")
        _require(self.batch_size > 0, f"eval.batch_size={self.batch_size} must be positive")


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | step | constant
    # schedule=step: the lr is multiplied by step_gamma after each of these epochs (the authors'
    # StepLR; per-epoch semantics of torch's MultiStepLR)
    step_milestones: list[int] = field(default_factory=list)
    step_gamma: float = 0.1
    label_smoothing: float = 0.0
    # bf16 autocast: auto (where the GPU or CPU has bf16 units) | bf16 (always) | off; see ask.utils.precision
    amp: str = "auto"
    channels_last: bool = True  # NHWC kernels, CPU and CUDA alike (fp32 results equal to rounding)
    resume: str | None = field(default=None, metadata=ignored_by(EVALUATION_KEY, SAME_RUN, REPORT_ROWS))
    eval_every: int = field(default=1, metadata=ignored_by(REPORT_ROWS))
    eval_batch_size: int = field(default=512, metadata=ignored_by(REPORT_ROWS))
    # best.pt follows this metric on the val split: clean accuracy, or robust accuracy of the DNN
    # under PGD-CE / of the kNN victim under ASK-Atk (the run's attack settings).
    select_metric: str = "val_acc"  # val_acc | val_robust_dnn | val_robust_knn
    # A clean-accuracy floor for best.pt, as the authors' selection has (83 %): only epochs whose
    # val_acc is at least this compete; until one reaches it, every epoch does. 0 = no floor.
    select_min_val_acc: float = 0.0
    val_points: int | None = 500  # robust val metrics on at most this many points; null = all, 0 = none

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, f"train.epochs={self.epochs} must be >= 1")
        _require(self.batch_size >= 1, f"train.batch_size={self.batch_size} must be >= 1")
        _require(self.lr > 0, f"train.lr={self.lr} must be > 0")
        _require(0 <= self.momentum < 1, f"train.momentum={self.momentum} must be in [0, 1)")
        _require(self.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check_choice(self.optimizer, ("sgd",), "train.optimizer")
        _check_choice(self.schedule, ("onecycle", "cosine", "step", "constant"), "train.schedule")
        _require(0 < self.step_gamma <= 1, f"train.step_gamma={self.step_gamma} must be in (0, 1], e.g. 0.1")
        if self.schedule == "step":
            self._check_milestones()
        _require(0 <= self.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
        _require(self.eval_every >= 1, "train.eval_every must be >= 1")
        self.amp = _amp_setting(self.amp, "train.amp")
        _check_choice(self.select_metric, ("val_acc", "val_robust_dnn", "val_robust_knn"),
                      "train.select_metric")
        _require(0 <= self.select_min_val_acc <= 1,
                 f"train.select_min_val_acc={self.select_min_val_acc} must be a fraction in [0, 1], e.g. 0.83")
        _require(self.val_points is None or self.val_points >= 0,
                 f"train.val_points={self.val_points} must be >= 0 or null")
        _require(self.val_points != 0 or self.select_metric == "val_acc",
                 f"train.select_metric={self.select_metric} needs robust val metrics; set train.val_points > 0 or null")
        # Checked here, before any data is loaded: a mistyped resume path should not cost a dataset decode.
        resume = Path(self.resume).expanduser() if self.resume else None
        _require(resume is None or not resume.is_symlink() or resume.exists(),
                 f"train.resume='{self.resume}' is a broken link or a loop of links; point it at a real last.pt")
        _require(not self.resume or Path(self.resume).expanduser().is_file(),
                 f"train.resume='{self.resume}' does not exist; point it at a last.pt written by ask-train, "
                 "or drop train.resume to start afresh")

    def _check_milestones(self) -> None:
        milestones = list(self.step_milestones)
        _require(self.epochs >= 2, f"train.schedule=step needs train.epochs >= 2 (train.epochs={self.epochs}) so that "
                 "a milestone falls inside the run; use train.schedule=constant")
        _require(len(milestones) > 0, "train.schedule=step needs train.step_milestones, the epochs after which "
                 f"the lr drops, e.g. [{max(1, self.epochs // 2)}]; or use train.schedule=constant")
        for m in milestones:
            _require(0 < m < self.epochs, f"train.step_milestones={_int_list(milestones)}: every milestone must be "
                     f"an epoch in 1..{self.epochs - 1} (train.epochs={self.epochs})")
        _require(all(a < b for a, b in zip(milestones, milestones[1:], strict=False)),
                 f"train.step_milestones={_int_list(milestones)} must be strictly ascending")


def _int_list(values: list[int]) -> str:
    """``[15,30]``: a list as it is written on the command line."""
    return "[" + ",".join(str(v) for v in values) + "]"


@dataclass
class DefenseConfig:
    """The training loss (``name``) and its settings.

    ``eps``, ``steps`` and ``step_size`` are the inner-maximisation budget that every adversarial
    defence shares (``conf/defense/*.yaml`` refer to them), so one experiment sets the budget of
    at, ask_def and trades alike; ``eps`` is the PGD-CE radius of AT and of ASK-Def's CE term. The
    radius of ASK-Def's ASK term and of TRADES is the threat model's ``attack.eps``.
    """

    name: str = field(default="none", metadata=ignored_by(REPORT_ROWS))
    eps: Any = "4/255"
    steps: int = 10
    step_size: Any = "2/255"
    params: dict[str, Any] = field(default_factory=dict)  # as composed; settings() is the same typed

    def __post_init__(self) -> None:
        _check_budget(self, "defense")
        self.settings()

    def settings(self) -> Any:
        """The defence's settings (:mod:`ask.config.settings`), from ``params``."""
        return SettingsSection.of_defense(self.name).typed(self.params)


@dataclass
class RunConfig:
    task: str = field(default="train", metadata=ignored_by(REPORT_ROWS))
    seed: int = field(default=0, metadata=ignored_by(REPORT_ROWS))
    device: str = field(default="auto", metadata=ignored_by(SAME_RUN, REPORT_ROWS))  # auto | cpu | cuda | cuda:N
    deterministic: bool = field(default=False, metadata=ignored_by(REPORT_ROWS))
    # CUDA only: TF32 in float32 matmuls and convolutions. Faster, but features move by ~1e-3
    # relative, which the ASK loss at T = 0.01 magnifies; off unless asked for.
    tf32: bool = False
    progress: bool = field(default=True, metadata=ignored_by(EVALUATION_KEY, SAME_RUN, REPORT_ROWS))
    cache_dir: str = field(default="~/.cache/ask", metadata=ignored_by(EVALUATION_KEY, SAME_RUN, REPORT_ROWS))
    # A run directory holding results of other settings is refused; overwrite=true deletes them
    # and runs afresh there (see ask.utils.rundir).
    overwrite: bool = field(default=False, metadata=ignored_by(EVALUATION_KEY, SAME_RUN, REPORT_ROWS))
    # Where run directories go (<output_root>/<task>/<date>/<time>) when hydra.run.dir names none.
    output_root: str = field(default="outputs", metadata=ignored_by(EVALUATION_KEY, SAME_RUN, REPORT_ROWS))
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    knn: KnnConfig = field(default_factory=KnnConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    defense: DefenseConfig = field(default_factory=DefenseConfig)
    attack: AttackConfig | None = None
    eval: EvalConfig | None = None

    def __post_init__(self) -> None:
        # conf/run.yaml takes the default from $ASK_DEVICE: a bad value there must say so.
        source = " (from ASK_DEVICE)" if os.environ.get("ASK_DEVICE") == self.device else ""
        _require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
                 f"device={self.device!r}{source} must be auto, cpu, cuda or cuda:N")


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (called before ``hydra.main`` composes)."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
