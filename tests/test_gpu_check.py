"""scripts/gpu_check.sh: its dry run on a CPU machine finds every piece the GPU run needs (and
names a missing one); the runner gives each step its time limit, stops at the first failure and
leaves the JSON of what ran."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import CIFAR10_JPEG

REPO = Path(__file__).resolve().parents[1]
STEP_NAMES = ["environment", "gpu_tests", "vgg16_epoch", "faiss", "attacks", "torchrun"]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def _dry_run(tmp_path: Path, cifar: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ASK_PYTHON": sys.executable, "ASK_GPU_CHECK_CIFAR": str(cifar), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out",
                           str(tmp_path / "out" / "gpu_check.json")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture
def cifar(tmp_path: Path) -> Path:
    """The shared CIFAR-10 folder where it exists; else an empty tree of the same shape (only its
    presence is checked)."""
    if (CIFAR10_JPEG / "train").is_dir():
        return CIFAR10_JPEG
    for split in ("train", "test"):
        (tmp_path / "cifar" / split).mkdir(parents=True)
    return tmp_path / "cifar"


def test_the_dry_run_finds_every_piece_and_lists_the_steps(tmp_path: Path, cifar: Path) -> None:
    done = _dry_run(tmp_path, cifar)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    listed = re.findall(r"^step (\w+) +limit +(\d+) s", done.stdout, re.MULTILINE)
    assert [name for name, _ in listed] == STEP_NAMES
    assert sum(int(limit) for _, limit in listed) <= 480
    assert f"dataset.root={cifar}" in done.stdout and "-m pytest -m gpu" in done.stdout
    assert "every step's modules, configs, gpu tests and data are in place" in done.stdout
    assert not (tmp_path / "out").exists()  # a dry run runs and writes nothing


def test_the_dry_run_names_a_missing_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # In process: the shell wrapper and the gpu marker's collection (~10 s) are the test above's.
    gpu_check = _load()
    monkeypatch.setattr(gpu_check, "_marker_problems", lambda ctx: [])
    status = gpu_check.main(["--dry-run", "--cifar-root", str(tmp_path / "nowhere"),
                             "--out", str(tmp_path / "out" / "gpu_check.json")])
    assert status == 1
    assert (f"gpu_check: missing: CIFAR-10 folder {tmp_path / 'nowhere' / 'train'} does not exist "
            "(--cifar-root or ASK_GPU_CHECK_CIFAR)") in capsys.readouterr().err.splitlines()
    assert not (tmp_path / "out").exists()


def test_a_step_override_that_no_longer_composes_is_named() -> None:
    gpu_check = _load()
    assert gpu_check.check_overrides("train", ["model=vgg16", "train.epochs=1"]) is None
    problem = gpu_check.check_overrides("train", ["model=vgg99"])
    assert problem.startswith("train model=vgg99: ") and "vgg99" in problem.split(": ", 1)[1]
    assert "train.ampp" in gpu_check.check_overrides("train", ["train.ampp=true"])


def _fake_step(gpu_check: ModuleType, name: str, code: str, timeout: int = 60, read=None):
    def read_log(ctx, log: Path) -> dict:
        text = log.read_text().strip()
        if text.startswith("bad"):
            raise gpu_check.CheckFailed(f"{name} found {text}")
        return {"printed": text}
    return gpu_check.Step(name, timeout, f"fake {name}", lambda ctx: [sys.executable, "-c", code], read or read_log)


def test_the_runner_stops_at_the_first_failure_and_keeps_what_ran(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_check = _load()
    out = tmp_path / "out" / "gpu_check.json"
    # The second step reads the JSON the runner wrote after the first: evidence is on disk at once.
    peek = f"import json; print(json.load(open({str(out)!r}))['steps'][0]['status'])"
    # The slow step's child runs in the same process group and, like a torchrun worker saving its
    # state, takes a second to end after SIGTERM: the runner must wait for it too, not only for the
    # step's own process (once in about 20 runs under load it did not, and the child outlived it).
    pid_file = tmp_path / "child.pid"
    child = tmp_path / "child.sh"
    child.write_text(f"trap 'sleep 1; exit 0' TERM\necho $$ > '{pid_file}'\nwhile :; do sleep 0.1; done\n")
    slow = gpu_check.Step("slow", 3, "fake slow", lambda ctx: ["sh", "-c", f"sh '{child}' & sleep 60"],
                          lambda ctx, log: {})
    steps = [_fake_step(gpu_check, "first", "print('one')"), _fake_step(gpu_check, "peek", peek),
             slow, _fake_step(gpu_check, "late", "print('late')")]
    monkeypatch.setattr(gpu_check, "STEPS", steps)
    ctx = gpu_check.Context(python=sys.executable, cifar=tmp_path, work=tmp_path / "work", logs=out.parent / "logs")
    ctx.work.mkdir()
    ctx.logs.mkdir(parents=True)

    assert gpu_check.run_all(ctx, out, keep_going=False) == 1
    report = json.loads(out.read_text())
    assert report["status"] == "failed" and report["failed_step"] == "slow"
    assert [(s["name"], s["status"]) for s in report["steps"]] == [
        ("first", "passed"), ("peek", "passed"), ("slow", "timeout"), ("late", "not run")]
    assert report["steps"][1]["result"] == {"printed": "passed"}
    assert report["steps"][2]["error"] == "still running after 3 s; stopped"
    assert not _running(int(pid_file.read_text()))  # the grandchild went with the step

    # --keep-going: a failed check is recorded with its message and the later steps still run.
    monkeypatch.setattr(gpu_check, "STEPS", [_fake_step(gpu_check, "wrong", "print('bad value')"),
                                             _fake_step(gpu_check, "crash", "raise SystemExit(3)"),
                                             _fake_step(gpu_check, "late", "print('late')")])
    assert gpu_check.run_all(ctx, out, keep_going=True) == 1
    report = json.loads(out.read_text())
    assert [(s["name"], s["status"], s.get("error")) for s in report["steps"]] == [
        ("wrong", "failed", "wrong found bad value"), ("crash", "failed", "exit status 3"), ("late", "passed", None)]
    assert report["failed_step"] == "wrong"


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a killed orphan may linger as a zombie until it is reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _junit(tmp_path: Path, cases: str) -> Path:
    (tmp_path / "gpu_tests.xml").write_text(
        f'<testsuites><testsuite name="pytest" tests="2" failures="{cases.count("<failure")}" errors="0" '
        f'skipped="{cases.count("<skipped")}">{cases}</testsuite></testsuites>')
    return tmp_path


@pytest.mark.parametrize(("cases", "message"), [
    ('<testcase classname="tests.test_a" name="test_x"/><testcase classname="tests.test_a" name="test_y">'
     '<skipped message="faiss has no GPU support in this build"/></testcase>',
     "1 gpu test(s) skipped: tests.test_a::test_y (faiss has no GPU support in this build)"),
    ('<testcase classname="tests.test_a" name="test_x"><failure message="boom"/></testcase>'
     '<testcase classname="tests.test_a" name="test_y"/>',
     "1 gpu test(s) failed: tests.test_a::test_x"),
])
def test_a_failed_or_skipped_gpu_test_fails_the_step(tmp_path: Path, cases: str, message: str) -> None:
    gpu_check = _load()
    ctx = gpu_check.Context(python=sys.executable, cifar=tmp_path, work=_junit(tmp_path, cases), logs=tmp_path)
    with pytest.raises(gpu_check.CheckFailed) as failed:
        gpu_check._read_gpu_tests(ctx, tmp_path / "log")
    assert str(failed.value) == message
    passing = _junit(tmp_path, '<testcase classname="t" name="a"/><testcase classname="t" name="b"/>')
    assert gpu_check._read_gpu_tests(ctx, passing / "log")["passed"] == 2
