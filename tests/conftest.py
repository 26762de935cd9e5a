"""Shared fixtures: the real config tree, composed and shrunk for tests; the shared CIFAR-10 folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from tests import machine_load

# Before anything below imports torch: cuBLAS reads it at the first GEMM, and tests on a GPU may
# switch deterministic=true on in this process long after that (see ask/cli/__init__.py).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# Every run the tests start, in this process or in a console script or torchrun worker they spawn,
# composes device=cpu unless it names a device: on a CUDA machine device=auto would put the CPU
# suite's bit-identical and two-rank tests on the GPU, where they cannot hold. The gpu-marked
# tests ask for device=cuda explicitly.
os.environ["ASK_DEVICE"] = "cpu"
# A background job of a script (`bash .ci/run &`, nohup, no job control) starts with SIGINT
# ignored, and an ignored signal stays ignored across exec: every command the suite starts would
# then shrug off the Ctrl-C that the interruption tests send (a loaded CI failed that way). A
# Python handler is reset to the default at exec, so the commands start as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from ask.config import RunConfig, config_dir, register_configs, resolve
from tests import prewarmed

# On a loaded machine, fewer torch threads per process (tests/machine_load.py). None of the imports
# above loads torch, which reads the setting once (test_machine_load checks that it took).
SUITE_THREADS, IDLE_CORES_AT_START = machine_load.choose_suite_threads()

REPO = Path(__file__).resolve().parents[1]
CIFAR10_JPEG = REPO.parent / "shared" / "data" / "cifar10-jpeg"
BIN = Path(sys.executable).parent


def compose_run(config_name: str, overrides: list[str], cache_dir: Path) -> RunConfig:
    """Compose the real ``conf/`` tree as the console scripts do, with test-friendly defaults."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose(config_name, overrides=[f"cache_dir={cache_dir}", "progress=false", *overrides])
    return resolve(cfg)


def pytest_report_header() -> str | None:
    if SUITE_THREADS is None:
        return None
    return (f"torch threads: {SUITE_THREADS} (other processes left {IDLE_CORES_AT_START:.1f} of "
            f"{os.cpu_count()} cores idle at the start; OMP_NUM_THREADS overrides)")


@pytest.fixture(scope="session", autouse=True)
def _zygote_ends_with_the_session() -> Iterator[None]:
    yield
    prewarmed.stop_zygote()


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the whole session, so the digits model is trained once."""
    return tmp_path_factory.mktemp("ask-cache")


@pytest.fixture(scope="session")
def cifar10_root() -> Path:
    if not (CIFAR10_JPEG / "train").is_dir():
        pytest.skip(f"CIFAR-10 folder not found at {CIFAR10_JPEG}")
    return CIFAR10_JPEG


# A guard against a hung command, not a speed limit: whichever command first needs the digits model
# trains it (30 epochs), which took over 600 s on the 2-core machine at a load of 4.
CLI_TIMEOUT_S = 1800


def run_cli(program: str, args: list[str], cwd: Path, cache: Path,
            timeout: int = CLI_TIMEOUT_S, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run an installed console script the way a user would: a process of its own, its output captured.

    The process is forked from a zygote that has imported torch already (tests/prewarmed.py);
    ``ASK_TEST_FORK=0`` starts each one from its ``bin/`` wrapper instead, as a user's shell does.
    """
    env = {**os.environ, "ASK_CACHE_DIR": str(cache), "HYDRA_FULL_ERROR": "0", **(env or {})}
    if os.environ.get("ASK_TEST_FORK", "1") != "0" and prewarmed.can_fork(program, env):
        return prewarmed.run(program, args, cwd, env, timeout)
    return subprocess.run(
        [str(BIN / program), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def script_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment for a shell script that runs the console scripts from ``$ASK_BIN``."""
    if os.environ.get("ASK_TEST_FORK", "1") == "0":
        return {"ASK_BIN": str(BIN)}
    return {"ASK_BIN": str(prewarmed.shim_bin(tmp_path_factory.mktemp("bin"))), **prewarmed.shim_env()}


def start_cli(program: str, args: list[str], cwd: Path, cache: Path) -> subprocess.Popen:
    """Start a console script in the background, on one thread, stdout and stderr merged (to be signalled)."""
    env = {**os.environ, "ASK_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen([str(BIN / program), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish_cli(process: subprocess.Popen, timeout: int = CLI_TIMEOUT_S) -> str:
    """Wait for a process from :func:`start_cli` and insist it succeeded; its output."""
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def kill_when_it_prints(script: str, marker: str) -> None:
    """Run ``python -c script`` and SIGKILL it as soon as it prints the line ``marker`` (a build caught mid-way)."""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == marker
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


def zero_in_place(path: Path, start: int, stop: int | None = None) -> None:
    """Overwrite bytes ``start:stop`` of ``path`` with zeros, keeping its size and inode.

    What a bad disk, a stray ``dd`` or a truncate-and-extend leaves behind: the size checks of
    the caches cannot see it, only their checksums can.
    """
    size = path.stat().st_size
    stop = size if stop is None else stop
    assert 0 <= start < stop <= size
    with open(path, "r+b") as handle:
        handle.seek(start)
        handle.write(bytes(stop - start))
    assert path.stat().st_size == size


def npy_data_offset(path: Path) -> int:
    """Where the array's bytes start in a ``.npy`` file (after its header)."""
    import numpy as np

    return int(np.load(path, mmap_mode="r").offset)


def zero_torch_record(path: Path) -> str:
    """Zero the largest tensor record of a ``torch.save`` zip file in place; returns its name."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = max((r for r in archive.infolist() if "/data/" in r.filename), key=lambda r: r.file_size)
    with open(path, "rb") as handle:
        handle.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", handle.read(4))
    start = record.header_offset + 30 + name_length + extra_length
    zero_in_place(path, start, start + record.file_size)
    return record.filename
