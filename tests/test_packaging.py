"""The installed console scripts find their configs from a built wheel, not only from a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib

from tests.conftest import REPO


def test_every_package_is_listed_for_the_wheel() -> None:
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "ask").rglob("__init__.py")}
    conf = REPO / "conf"
    # Every folder on the way to a config file, nested groups (hydra/launcher) included.
    conf_groups = {".".join(("ask", "conf", *folder.parts))
                   for path in conf.rglob("*.yaml") for folder in path.relative_to(conf).parents[:-1]}
    assert on_disk | conf_groups | {"ask.conf"} == listed


def test_wheel_install_finds_configs(tmp_path: Path) -> None:
    dist, site = tmp_path / "dist", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)],
        check=True, capture_output=True, text=True,
    )
    (wheel,) = dist.glob("*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True,
    )
    # Run from an empty directory with only the wheel's copy of `ask` first on the path.
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import ask, ask.config as c; print(ask.__file__); print(c.config_dir())"],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True,
    ).stdout.split()
    assert all(line.startswith(str(site)) for line in where), where
    report = subprocess.run([sys.executable, str(site / "bin" / "ask-report"), "--help"],
                            cwd=tmp_path, env=env, capture_output=True, text=True)
    assert report.returncode == 0 and "PATH" in report.stdout, report.stderr
    for program in ("ask-attack", "ask-train"):
        shown = subprocess.run(
            [sys.executable, str(site / "bin" / program), "--cfg", "job",
             "dataset=cifar10_folder", "dataset.root=/data/cifar", "model=vgg16", "attack=[ask,pgd]"],
            cwd=tmp_path, env=env, capture_output=True, text=True,
        )
        assert shown.returncode == 0, shown.stderr
        assert "name: cifar10_folder" in shown.stdout and "- block4" in shown.stdout
    # The nested packaged group: the SLURM launcher config ships in the wheel.
    compose_slurm = (
        "from hydra import compose, initialize_config_dir\n"
        "from ask.config import config_dir, register_configs\n"
        "register_configs()\n"
        "with initialize_config_dir(config_dir(), version_base='1.3'):\n"
        "    cfg = compose('attack', overrides=['hydra/launcher=slurm'], return_hydra_config=True)\n"
        "print(config_dir(), cfg.hydra.launcher._target_)\n"
    )
    shown = subprocess.run([sys.executable, "-c", compose_slurm], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.startswith(str(site)) and "SlurmLauncher" in shown.stdout


def test_faiss_comes_from_one_extra_and_torch_is_capped_at_a_minor_release() -> None:
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = [Requirement(line) for line in project["dependencies"]]
    # faiss-cpu and a GPU build both install the module faiss: the base install must pull neither.
    assert not [r.name for r in base if r.name.startswith("faiss")]
    extras = project["optional-dependencies"]
    assert [Requirement(line).name for line in extras["cpu"]] == ["faiss-cpu"]
    assert [Requirement(line).name for line in extras["gpu"]] == ["faiss-gpu-cu12"]
    assert "-e '.[dev,cpu]'" in (REPO / "Makefile").read_text()  # the README's two commands get faiss
    for name in ("torch", "torchvision"):
        (requirement,) = [r for r in base if r.name == name]
        caps = [spec for spec in requirement.specifier if spec.operator in ("<", "<=")]
        # "<2.15", not "<=2.14.1": a patch release of the tested minor version must install.
        assert [(spec.operator, spec.version.count(".")) for spec in caps] == [("<", 1)], requirement
