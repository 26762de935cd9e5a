"""A run directory holds one run, and its records describe its results.

Through the installed console scripts: a finished run refuses other settings (``overwrite=true``
replaces it), finds its own results with the same settings (nothing to do), and neither a refused
nor an invalid command touches ``config.yaml`` or ``.hydra/``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ask.utils.rundir import config_differences, run_lock
from tests.conftest import run_cli

TRAIN = ["dataset.train_per_class=20", "train.epochs=1", "train.batch_size=32", "model.width=8", "progress=false"]
ATTACK = ["attack=[pgd]", "eval.victims=[knn]", "eval.n_points=20", "progress=false"]


def _digests(directory: Path) -> dict[str, str]:
    """sha256 of every file a run leaves, its records included (not the log, whose lines accumulate,
    nor the lock, which holds the last holder's pid)."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.suffix != ".log" and p.name != ".lock"}


def _refused(done, directory: Path, program: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"{program}: error: ") and str(directory) in line, line
    return line


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished ask-train run (one epoch, width 8, 20 digits per class) and the cache it used."""
    root = tmp_path_factory.mktemp("rundir")
    cache = root / "cache"
    done = run_cli("ask-train", [*TRAIN, f"hydra.run.dir={root / 'trained'}"], root, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "trained", cache


def test_a_finished_attack_run_is_never_overwritten_silently(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    checkpoint, cache = trained[0] / "best.pt", trained[1]
    run = tmp_path / "run"
    args = [*ATTACK, f"model.checkpoint={checkpoint}", f"hydra.run.dir={run}"]
    assert run_cli("ask-attack", args, tmp_path, cache).returncode == 0
    first = _digests(run)
    assert {"metrics.json", "config.yaml", ".hydra/config.yaml", ".hydra/overrides.yaml"} <= set(first)

    line = _refused(run_cli("ask-attack", [*args, "attack.eps=0.05"], tmp_path, cache), run, "ask-attack")
    assert line.endswith(f"{run} already holds a finished run with other settings (attack.eps: 0.1 -> 0.05); "
                         "add overwrite=true to replace it, or choose another hydra.run.dir")
    assert _digests(run) == first

    # The same settings again (display and cache settings aside): nothing to do, nothing rewritten.
    again = run_cli("ask-attack", [*args, "progress=true"], tmp_path, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already holds the results of these settings; nothing to do" in again.stdout + again.stderr
    assert _digests(run) == first

    replaced = run_cli("ask-attack", [*args, "attack.eps=0.05", "overwrite=true"], tmp_path, cache)
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["eps"] == pytest.approx(0.05)
    assert "eps: 0.05" in (run / "config.yaml").read_text()
    assert "attack.eps=0.05" in (run / ".hydra" / "overrides.yaml").read_text()


def test_a_finished_training_refuses_another_learning_rate(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    run = tmp_path / "trained"
    run.mkdir()
    for path in trained[0].rglob("*"):  # a copy: the module's checkpoint stays what it was
        if path.is_file():
            (run / path.relative_to(trained[0])).parent.mkdir(parents=True, exist_ok=True)
            (run / path.relative_to(trained[0])).write_bytes(path.read_bytes())
    first = _digests(run)
    line = _refused(run_cli("ask-train", [*TRAIN, "train.lr=0.2", f"hydra.run.dir={run}"], tmp_path, trained[1]),
                    run, "ask-train")
    assert "already holds a finished run with other settings (train.lr: 0.05 -> 0.2)" in line
    assert _digests(run) == first
    # Unfinished (no summary yet) it is refused too: resuming would train on with the saved optimiser's lr.
    (run / "train_summary.json").unlink()
    line = _refused(run_cli("ask-train", [*TRAIN, "train.lr=0.2", f"hydra.run.dir={run}"], tmp_path, trained[1]),
                    run, "ask-train")
    assert "already holds an unfinished run with other settings (train.lr: 0.05 -> 0.2)" in line


def test_refused_and_invalid_commands_leave_the_records_alone(tmp_path: Path, trained: tuple[Path, Path]) -> None:
    checkpoint, cache = trained[0] / "best.pt", trained[1]
    run = tmp_path / "run"
    args = [*ATTACK, f"model.checkpoint={checkpoint}", f"hydra.run.dir={run}"]
    assert run_cli("ask-attack", args, tmp_path, cache).returncode == 0
    (run / "metrics.json").unlink()  # as if it were still running: only the records are left to protect
    first = _digests(run)
    with run_lock(run):  # a live run holds the directory
        line = _refused(run_cli("ask-attack", [*args, "attack.eps=0.05"], tmp_path, cache), run, "ask-attack")
    assert line == f"ask-attack: error: another ask run is still working in {run}; wait for it or choose another hydra.run.dir"
    assert _digests(run) == first
    invalid = run_cli("ask-attack", [*args, "attack.steps=-1"], tmp_path, cache)
    assert invalid.returncode == 2 and invalid.stderr.strip().endswith("attack.steps=-1 must be >= 0")
    assert _digests(run) == first


def test_config_differences_names_each_changed_setting_once() -> None:
    none = {"defense": {"name": "none", "params": {}}, "attack": {"eps": 0.1}}
    at = {"defense": {"name": "at", "params": {"eps": 0.03, "steps": 7}}, "attack": {"eps": 0.1}}
    assert config_differences(none, at) == ("defense.name: none -> at, defense.params.eps: (unset) -> 0.03, "
                                            "defense.params.steps: (unset) -> 7")
    assert config_differences(at, none, shown=1) == "defense.name: at -> none and 2 more"
    assert config_differences(none, none) == ""
