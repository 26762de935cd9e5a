"""The zygote that the suite forks its console scripts from behaves as the bin/ wrappers do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import prewarmed
from tests.conftest import BIN, REPO

COMMANDS = [
    ("ask-report", ["--help"]),
    ("ask-report", ["no-such-folder"]),
    ("ask-attack", ["attack.eps=-1"]),
    ("ask-attack", ["attack=[pgd]", "attack.steps=3", "--cfg", "job"]),
    ("ask-train", ["train.lr=0"]),
]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "ASK_CACHE_DIR": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "0"}


@pytest.mark.parametrize(("program", "args"), COMMANDS, ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_a_forked_command_prints_and_exits_as_its_bin_wrapper(tmp_path: Path, program: str, args: list[str]) -> None:
    env = _env(tmp_path)
    assert prewarmed.can_fork(program, env)
    forked = prewarmed.run(program, args, tmp_path, env, timeout=120)
    execed = subprocess.run([str(BIN / program), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert (forked.returncode, forked.stdout, forked.stderr) == (execed.returncode, execed.stdout, execed.stderr)
    assert forked.stdout or forked.stderr  # each command says something: the comparison compares text


def test_a_forked_command_runs_in_its_own_folder_with_the_callers_umask(tmp_path: Path) -> None:
    prewarmed.zygote()  # started before the umask changes: the child must take the caller's, not inherit it
    mask = os.umask(0o027)
    try:
        done = prewarmed.run("ask-attack", ["model.checkpoint=missing.pt", "hydra.run.dir=relative"], tmp_path,
                             _env(tmp_path), 120)
    finally:
        os.umask(mask)
    assert done.returncode == 2, done.stderr
    assert "checkpoint 'missing.pt' does not exist" in done.stderr
    # Hydra's records of a refused run land in the working directory given, with the umask given.
    written = tmp_path / "relative" / "config.yaml"
    assert written.is_file(), sorted(p.name for p in tmp_path.rglob("*"))
    assert written.stat().st_mode & 0o777 == 0o640


def test_a_killed_command_reports_its_signal_as_popen_does(tmp_path: Path) -> None:
    out, err = (os.open(tmp_path / name, os.O_WRONLY | os.O_CREAT) for name in ("out", "err"))
    child = prewarmed.zygote().start("ask-train", ["train.epochs=1000"], tmp_path, _env(tmp_path), out, err)
    os.close(out)
    os.close(err)
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(timeout=0.5)
    child.kill()
    assert child.wait(timeout=60) == -signal.SIGKILL


def test_a_changed_pythonpath_is_not_forked(tmp_path: Path) -> None:
    """What Python reads while it starts cannot reach a fork of a process that started long ago."""
    assert not prewarmed.can_fork("ask-attack", {**_env(tmp_path), "PYTHONPATH": str(tmp_path)})
    assert not prewarmed.can_fork("python", _env(tmp_path))


def test_a_shell_script_reaches_the_zygote_through_its_bin(tmp_path: Path, script_env: dict[str, str]) -> None:
    if "ASK_TEST_ZYGOTE" not in script_env:
        pytest.skip("ASK_TEST_FORK=0: scripts run the real console scripts")
    script = "cd \"$1\" && \"$ASK_BIN/ask-attack\" attack.eps=-1; echo \"status $?\""
    done = subprocess.run(["bash", "-c", script, "bash", str(tmp_path)], env={**_env(tmp_path), **script_env},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout == "status 2\n"
    assert done.stderr == "ask-attack: error: attack.eps=-1.0 must be >= 0\n"
    assert (tmp_path / "outputs").is_dir()  # Hydra's run directory, relative to the script's folder


def test_a_suite_started_with_ctrl_c_ignored_still_starts_commands_that_take_it() -> None:
    # `bash .ci/run &` in a script leaves SIGINT ignored, and exec keeps it so: ask-attack then ran
    # through the Ctrl-C that test_eval_resume sends it and exited 0. conftest puts the handler back.
    probe = ("import subprocess, sys; import tests.conftest; "
             "child = 'import signal; print(signal.getsignal(signal.SIGINT))'; "
             "print(subprocess.run([sys.executable, '-c', child], capture_output=True, text=True).stdout)")
    done = subprocess.run(["bash", "-c", 'trap "" INT; exec "$0" -c "$1"', sys.executable, probe],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "default_int_handler" in done.stdout, done.stdout + done.stderr
