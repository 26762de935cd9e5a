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
    """conftest pins ASK_DEVICE=cpu; conf/train.yaml's default follows it, here and in spawned console scripts."""
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
