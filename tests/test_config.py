"""The config tree composes for every option, and wrong values fail before any compute."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from ask.config import config_dir, parse_size
from ask.errors import ConfigError
from tests.conftest import compose_run, run_cli

GROUPS = ["dataset", "model", "knn", "attack", "defense", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (Path(config_dir()) / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group: str, cache_dir: Path) -> None:
    options = _options(group)
    assert options, f"conf/{group} has no options"
    for option in options:
        override = f"{group}=[{option}]" if group == "attack" else f"{group}={option}"
        required = ["model.target=package.module.Net", "knn.layers=[fc]"] if (group, option) == ("model", "module") else []
        run = compose_run("attack", [override, "dataset.root=/some/where", *required], cache_dir)
        if group == "attack":
            assert list(run.attack.methods) == [option]
        elif group in ("dataset", "model"):
            assert getattr(run, group).name == option


def test_model_module_without_its_target_is_refused(cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="model=module needs model.target"):
        compose_run("attack", ["model=module"], cache_dir)


def test_defaults_follow_the_authors(cache_dir: Path) -> None:
    run = compose_run("attack", ["dataset=cifar10_folder", "dataset.root=x", "model=vgg16"], cache_dir)
    assert run.knn.layers == ["block4"]
    assert run.knn.metric == "cosine" and run.knn.k == 5
    assert run.attack.eps == pytest.approx(8 / 255) and run.attack.step_size == pytest.approx(2 / 255)
    assert run.attack.steps == 20
    assert run.attack.methods["ask"]["temperature"] == 0.01
    assert run.attack.methods["ask"]["layers"] == ["block4"]


@pytest.mark.parametrize("config", ["train", "attack"])
def test_paper_preset_is_the_authors_setup(config: str, cache_dir: Path) -> None:
    run = compose_run(config, ["experiment=defenses_cifar10_vgg16", "dataset.root=/some/where",
                               "defense=ask_def"], cache_dir)
    assert run.model.name == "vgg16_authors" and run.model.width == 64 and run.model.normalize is False
    assert run.knn.layers == ["block4"] and run.defense.params["layer"] == "block4"
    t = run.train
    assert (t.epochs, t.batch_size, t.optimizer, t.lr, t.momentum, t.nesterov) == (200, 128, "sgd", 0.1, 0.9, True)
    assert t.weight_decay == pytest.approx(2e-4)
    assert (t.schedule, t.step_milestones, t.step_gamma) == ("step", [100], 0.1)
    assert t.amp == "off" and t.channels_last is False and t.label_smoothing == 0.0
    assert run.dataset.augment == "crop_flip" and run.dataset.name == "cifar10_folder"
    assert (run.knn.k, run.knn.metric, run.knn.pool_per_class) == (5, "cosine", 2000)
    assert run.eval.n_points == 5000
    assert run.attack.eps == pytest.approx(8 / 255) and run.attack.step_size == pytest.approx(2 / 255)
    assert run.attack.steps == 20 and run.attack.methods["ask"]["temperature"] == 0.01
    assert (run.defense.eps, run.defense.steps) == (pytest.approx(4 / 255), 10)

    short = compose_run(config, ["experiment=defenses_cifar10_vgg16_1h", "dataset.root=x"], cache_dir)
    assert short.model.name == "vgg16_authors" and short.train.amp == "off"
    assert (short.train.epochs, short.train.schedule, short.train.step_milestones) == (30, "step", [15])
    assert short.train.weight_decay == pytest.approx(2e-4) and short.train.nesterov


def test_fractions_parse(cache_dir: Path) -> None:
    run = compose_run("attack", ["attack.eps=4/255", "attack.step_size=0.01"], cache_dir)
    assert run.attack.eps == pytest.approx(4 / 255)
    assert parse_size("8/255", "x") == pytest.approx(0.0313725, rel=1e-5)
    with pytest.raises(ConfigError, match="not a number"):
        parse_size("eight", "attack.eps")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("attack.eps=-0.1", "attack.eps=-0.1 must be >= 0"),
        ("attack.step_size=0", "attack.step_size=0.0 must be > 0"),
        ("attack.norm=l1", "attack.norm='l1' is not one of linf, l2"),
        ("knn.k=0", "knn.k=0 must be >= 1"),
        ("knn.metric=manhattan", "knn.metric='manhattan' is not one of cosine, l2"),
        ("train.lr=-1", "train.lr=-1.0 must be > 0"),
        ("eval.victims=[dnn,oracle]", "eval.victims entry='oracle'"),
        ("attack=[]", "no attack selected"),
    ],
)
def test_out_of_range_values_fail(override: str, message: str, cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        compose_run("attack", [override], cache_dir)


def test_wrong_type_fails_at_composition(cache_dir: Path) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_run("attack", ["knn.k=five"], cache_dir)


def test_unknown_option_lists_choices(cache_dir: Path) -> None:
    with pytest.raises(MissingConfigException) as error:
        compose_run("attack", ["model=alexnet"], cache_dir)
    assert "smallcnn" in str(error.value) and "vgg16" in str(error.value)


def test_missing_root_is_named(cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset.root is not set"):
        compose_run("train", ["dataset=cifar10_folder"], cache_dir)


def test_the_suite_composes_device_cpu_unless_a_test_names_a_device(
        tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """conftest pins ASK_DEVICE=cpu; conf/run.yaml's default follows it, here and in spawned console scripts."""
    assert os.environ["ASK_DEVICE"] == "cpu"
    assert compose_run("train", [], cache_dir).device == "cpu"
    assert compose_run("attack", [], cache_dir).device == "cpu"
    assert compose_run("attack", ["device=cuda:1"], cache_dir).device == "cuda:1"
    printed = run_cli("ask-attack", ["--cfg", "job", "--resolve"], tmp_path, cache_dir, timeout=120)
    assert printed.returncode == 0, printed.stderr[-2000:]
    assert "\ndevice: cpu\n" in printed.stdout

    monkeypatch.delenv("ASK_DEVICE")
    assert compose_run("train", [], cache_dir).device == "auto"
    monkeypatch.setenv("ASK_DEVICE", "gpu")
    with pytest.raises(ConfigError, match=r"^device='gpu' \(from ASK_DEVICE\) must be auto, cpu, cuda or cuda:N$"):
        compose_run("train", [], cache_dir)


# ---------------------------------------------------------------- each attack's and defence's settings
def _yaml(group: str, option: str) -> dict:
    from omegaconf import OmegaConf

    loaded = OmegaConf.to_container(OmegaConf.load(Path(config_dir()) / group / f"{option}.yaml"))
    assert isinstance(loaded, dict)
    return loaded if group == "attack" else loaded["params"]


def test_each_yaml_lists_exactly_its_settings_fields() -> None:
    """One source of defaults: the YAML holds every value, the dataclass every name and type, no default."""
    import dataclasses

    from ask.attacks import ATTACKS
    from ask.config.settings import ATTACK_SETTINGS, DEFENSE_SETTINGS
    from ask.defenses import DEFENSES

    for group, registry, implemented in (("attack", ATTACK_SETTINGS, ATTACKS), ("defense", DEFENSE_SETTINGS, DEFENSES)):
        assert set(registry) == set(_options(group)) == set(implemented), group
        for option, settings in registry.items():
            fields = dataclasses.fields(settings)
            assert list(_yaml(group, option)) == [f.name for f in fields], f"conf/{group}/{option}.yaml"
            assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                       for f in fields), f"{settings.__name__} states a default; the YAML holds the values"


def test_the_python_defaults_of_attacks_and_defences_equal_the_yaml() -> None:
    """From Python an attack or defence may be built with its keyword defaults; they must say what the YAML says."""
    import inspect

    from ask.attacks import ATTACKS
    from ask.defenses import DEFENSES

    compared = 0
    for group, implemented in (("attack", ATTACKS), ("defense", DEFENSES)):
        for option, cls in implemented.items():
            parameters = inspect.signature(cls.__init__).parameters
            for key, value in _yaml(group, option).items():
                assert key in parameters, f"{cls.__name__} takes no '{key}' (conf/{group}/{option}.yaml)"
                default = parameters[key].default
                if isinstance(value, str) and "${" in value or default in (None, inspect.Parameter.empty):
                    continue  # an interpolation, or a default the class resolves itself
                assert (default == value) or (isinstance(value, list) and list(default) == value), \
                    f"{cls.__name__}.{key}={default!r} but conf/{group}/{option}.yaml says {value!r}"
                compared += 1
    assert compared >= 30


@pytest.mark.parametrize(("overrides", "message"), [
    (["+attack.methods.ask.temprature=0.1"],
     "attack.methods.ask.temprature: attack 'ask' has no setting 'temprature'; did you mean "
     "attack.methods.ask.temperature? its settings are: layers, kappa, temperature, k, kind, include_self, "
     "keep_best, chunk_mb"),
    (["attack.methods.pgd.keep_best=maybe"], "attack.methods.pgd.keep_best=maybe is not true or false; "
                                            "see conf/attack/pgd.yaml"),
    (["attack.methods.dknn.m=1.5"], "attack.methods.dknn.m=1.5 is not an integer; see conf/attack/dknn.yaml"),
    (["attack.methods.ask.kappa=[one]"], "attack.methods.ask.kappa=['one'] is not a list of numbers or null; "
                                        "see conf/attack/ask.yaml"),
    (["attack.methods.minnorm.layers=block3"], "attack.methods.minnorm.layers=block3 is not a list of strings; "
                                              "see conf/attack/minnorm.yaml"),
    (["~attack.methods.advknn.kl"], "attack.methods.advknn.kl is not set; add attack.methods.advknn.kl=... "
                                    "(the values are in conf/attack/advknn.yaml)"),
    (["defense=at", "+defense.params.epz=0.1"],
     "defense.params.epz: defense 'at' has no setting 'epz'; did you mean defense.params.eps? its settings are: "
     "eps, step_size, steps, norm, random_start"),
    (["defense=trades", "defense.params.eps=big"],
     "defense.params.eps=big is not a number or a fraction such as 8/255; see conf/defense/trades.yaml"),
    (["defense=ask_def", "defense.params.clean_pass=1"],
     "defense.params.clean_pass=1 is not true or false; see conf/defense/ask_def.yaml"),
    (["defense.name=atx"], "unknown defense 'atx'; available: ask_def, ask_def_authors, at, none, trades"),
])
def test_attack_and_defence_settings_are_checked_at_composition(overrides: list[str], message: str,
                                                                cache_dir: Path) -> None:
    # dataset.root names no folder: the error comes from the config alone, before any data is read.
    with pytest.raises(ConfigError) as error:
        compose_run("train", ["dataset=cifar10_folder", "dataset.root=/no/such/folder", *overrides], cache_dir)
    assert str(error.value) == message


def test_the_typed_settings_are_the_composed_values(cache_dir: Path) -> None:
    from ask.config.settings import ASKDefSettings, ASKSettings

    run = compose_run("train", ["attack.methods.ask.temperature=0.25", "knn.k=3", "defense=ask_def_authors",
                                "defense.params.n_ref=2"], cache_dir)
    ask = run.attack.settings("ask")
    assert isinstance(ask, ASKSettings)
    assert (ask.temperature, ask.k, ask.layers, ask.kind, ask.chunk_mb) == (0.25, 3, ["block2"], "class", 1024)
    defense = run.defense.settings()
    assert isinstance(defense, ASKDefSettings)
    assert (defense.n_ref, defense.eps_pgd, defense.reference_draw, defense.clean_pass) == (2, pytest.approx(4 / 255), "cycle", True)


# The hand-written lists the schema's ignored_by metadata replaced, as they stood (wip-wiring):
# ask/evaluation/evaluate.py's _KEY_IGNORED, ask/utils/rundir.py's IGNORED_KEYS and
# ask/reporting/report.py's _IGNORED_SETTINGS; plus output_root (added since: where runs go).
OLD_EVALUATION_KEY = {"progress", "cache_dir", "overwrite", "output_root", "model.checkpoint", "dataset.download",
                      "dataset.cache", "knn.cache", "train.resume"}
OLD_SAME_RUN = {"progress", "cache_dir", "overwrite", "output_root", "device", "train.resume", "dataset.download",
                "dataset.cache", "knn.cache"}
OLD_REPORT_ROWS = {
    "task", "seed", "device", "deterministic", "progress", "cache_dir", "overwrite", "output_root",
    "dataset.name", "dataset.download", "dataset.cache", "model.name", "model.checkpoint", "defense.name",
    "attack.eps", "attack.norm", "knn.use_gpu", "knn.cache", "knn.batch_size",
    "train.resume", "train.eval_every", "train.eval_batch_size", "eval.batch_size", "eval.victims",
}


def test_the_ignored_settings_derived_from_the_schema_are_the_old_lists() -> None:
    from ask.config.schema import EVALUATION_KEY, REPORT_ROWS, SAME_RUN, ignored_settings
    from ask.reporting import runs
    from ask.utils import rundir

    derived = {purpose: ignored_settings(purpose) for purpose in (EVALUATION_KEY, SAME_RUN, REPORT_ROWS)}
    assert all(len(paths) == len(set(paths)) for paths in derived.values())
    assert set(derived[EVALUATION_KEY]) == OLD_EVALUATION_KEY
    assert set(derived[SAME_RUN]) == set(rundir.IGNORED_KEYS) == OLD_SAME_RUN
    assert set(derived[REPORT_ROWS]) == set(runs.IGNORED_SETTINGS) == OLD_REPORT_ROWS
