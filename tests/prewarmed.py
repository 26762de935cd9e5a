"""Console scripts started from a process that has already imported torch, Hydra and ask.

Each command the suite ran spent about 2.5 s of the 2-core CI machine importing torch before it
read its first argument, and the suite runs a few hundred of them (the bad-input table alone, ~70).
A zygote process imports everything once and forks one child per command. From the command's
point of view the child is a fresh process: its own pid, working directory, environment, umask,
standard streams, signals and exit status (an uncaught KeyboardInterrupt still ends it by SIGINT),
and the interpreter exits as usual (atexit, logging shutdown, non-daemon threads joined). Only its
imports are already done.

What a fork cannot give, the tests that need it keep using ``subprocess``: torchrun and its
workers, shell scripts, and the console scripts' own ``bin/`` wrappers (tests/test_packaging.py).

The zygote stays single-threaded and never computes, so forking it is safe (no OpenMP pool, no
lock held by another thread). ``OMP_NUM_THREADS`` is read when libgomp loads, long before a child
exists, so the child applies the variable itself through ``torch.set_num_threads``.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from tests.machine_load import THREAD_VARIABLES

# The console scripts that the zygote serves; anything else goes through subprocess.
PROGRAMS = ("ask-attack", "ask-train", "ask-report")
_ENV = "ASK_TEST_ZYGOTE"  # the zygote's socket path, for the test process that started it
# Variables that act while Python starts or a library loads: a command whose environment sets them
# otherwise than the zygote's (a PYTHONPATH that hides faiss, say) needs a process of its own.
# Not KMP_*: scikit-learn sets two of them in every process that imports it, the tests' included.
_STARTUP_PREFIXES = ("PYTHON", "LD_")
# The environment the test session started with: a test that patches os.environ and happens to
# start the zygote must not give it that patch.
_SESSION_ENV = dict(os.environ)


# ------------------------------------------------------------------------------- the zygote side
def _warm_imports() -> dict[str, Any]:
    """Import what a command imports, and return each console script's entry function."""
    import importlib
    import pkgutil
    from importlib.metadata import entry_points

    import torch  # noqa: F401

    import ask

    for module in pkgutil.walk_packages(ask.__path__, "ask."):
        importlib.import_module(module.name)
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name in PROGRAMS}
    return {name: scripts[name].load() for name in PROGRAMS}


def _receive(connection: socket.socket) -> tuple[dict[str, Any], list[int]]:
    chunks, fds = [], []
    while True:
        data, new_fds, _, _ = socket.recv_fds(connection, 1 << 16, 4)
        fds.extend(new_fds)
        if not data:
            raise ConnectionError("the test process closed the connection before its request ended")
        chunks.append(data)
        if data.endswith(b"\n"):
            return json.loads(b"".join(chunks)), fds


def serve(path: str) -> tuple[dict[str, Any], list[int], Any] | None:
    """Answer requests until stdin closes; returns only in a forked child, with the child's request."""
    entry = _warm_imports()
    default_threads = _default_threads()
    assert threading.active_count() == 1, "an import started a thread: forking would copy its locks"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", flush=True)
    children: dict[int, socket.socket] = {}
    while True:
        readable, _, _ = select.select([listener, sys.stdin], [], [], 0.05)
        if sys.stdin in readable and not sys.stdin.readline():  # the test process is gone
            for pid in children:
                _kill_quietly(pid)
            return None
        if listener in readable:
            connection, _ = listener.accept()
            request, fds = _receive(connection)
            pid = os.fork()
            if pid == 0:
                listener.close()
                for other in children.values():
                    other.close()
                request["default_threads"] = default_threads
                return request, fds, (connection, entry[request["program"]])
            for fd in fds:
                os.close(fd)
            connection.sendall(f"{pid}\n".encode())
            children[pid] = connection
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                connection = children.pop(pid)
                try:
                    connection.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:  # the waiting test gave up (a timeout) and closed its end
                    pass
                connection.close()


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def become(request: dict[str, Any], fds: list[int], connection: socket.socket, main: Any) -> None:
    """Turn the forked child into the requested command, then run it as its console script would."""
    connection.close()
    stdin = os.open(os.devnull, os.O_RDONLY)
    for target, fd in zip((0, 1, 2), (stdin, *fds), strict=True):
        os.dup2(fd, target)
    for fd in {stdin, *fds}:
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    import torch

    threads = next((request["env"][name] for name in THREAD_VARIABLES if name in request["env"]), None)
    torch.set_num_threads(int(threads) if threads else request["default_threads"])
    sys.argv = [request["argv0"], *request["args"]]
    os._exit(_run_as_the_interpreter_would(main))


def _run_as_the_interpreter_would(main: Any) -> int:
    """Run a console script's entry point and end as ``python`` ends, less the module teardown.

    Tearing down torch's modules takes about a second of every process, and nothing a command
    writes depends on it: threads are joined, atexit handlers (logging's flush among them) run and
    the streams are flushed, then the process leaves with ``os._exit``.
    """
    interrupted = False
    try:
        sys.exit(main())
    except SystemExit as stop:
        code = _exit_code(stop)
    except KeyboardInterrupt:
        traceback.print_exc()
        code, interrupted = 1, True
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if interrupted:  # what python does after an uncaught KeyboardInterrupt: it dies of SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def _exit_code(stop: SystemExit) -> int:
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


# ------------------------------------------------------------------------------ the test side
class Zygote:
    """The running zygote, started once per test session (see :func:`zygote`)."""

    def __init__(self) -> None:
        self._folder = tempfile.mkdtemp(prefix="ask-zygote-")
        self.path = os.path.join(self._folder, "socket")
        env = {k: v for k, v in _SESSION_ENV.items() if k not in THREAD_VARIABLES}
        repo = str(Path(__file__).resolve().parents[1])
        self._process = subprocess.Popen([sys.executable, "-m", "tests.prewarmed", self.path], cwd=repo,
                                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = self._process.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"the test zygote did not start (said {ready!r})")

    def start(self, program: str, args: list[str], cwd: Path, env: dict[str, str],
              stdout: int, stderr: int) -> Child:
        return _connect(self.path, program, args, cwd, env, stdout, stderr)

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=60)
        self._process.stdout.close()
        if os.path.exists(self.path):
            os.unlink(self.path)
        os.rmdir(self._folder)


def _connect(path: str, program: str, args: list[str], cwd: Path, env: dict[str, str],
             stdout: int, stderr: int) -> Child:
    umask = os.umask(0)
    os.umask(umask)
    request = {"program": program, "argv0": str(Path(sys.executable).parent / program), "args": args,
               "cwd": str(cwd), "env": env, "umask": umask}
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(path)
    socket.send_fds(connection, [json.dumps(request).encode() + b"\n"], [stdout, stderr])
    return Child(connection)


class Child:
    """A command forked by the zygote: its pid, and its exit status once it has one (Popen's terms)."""

    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection
        self._received = b""  # the zygote's lines (pid, then exit status), as they arrive
        self.pid = int(self._line(None))
        self.returncode: int | None = None

    def _line(self, timeout: float | None) -> bytes:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._received:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._connection], [], [], left)[0]:
                raise subprocess.TimeoutExpired(f"child {getattr(self, 'pid', '?')}", timeout)
            data = self._connection.recv(4096)
            if not data:
                raise RuntimeError(f"the test zygote lost child {getattr(self, 'pid', '?')}")
            self._received += data
        line, self._received = self._received.split(b"\n", 1)
        return line

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self.returncode = int(self._line(timeout))
            self._connection.close()
        return self.returncode

    def kill(self) -> None:
        _kill_quietly(self.pid)


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def zygote() -> Zygote:
    """The session's zygote, started on first use (threads of one test may ask at once)."""
    global _zygote
    with _zygote_lock:
        if _zygote is None:
            _zygote = Zygote()
        return _zygote


def stop_zygote() -> None:
    global _zygote
    with _zygote_lock:
        if _zygote is not None:
            _zygote.close()
            _zygote = None


def _startup(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_STARTUP_PREFIXES)}


def _startup_differences(env: dict[str, str], zygote_startup: dict[str, str]) -> list[str]:
    """The start-up variables that ``env`` sets otherwise than the zygote's environment did."""
    startup = _startup(env)
    return sorted(k for k in startup.keys() | zygote_startup.keys() if startup.get(k) != zygote_startup.get(k))


def can_fork(program: str, env: dict[str, str]) -> bool:
    """Whether a fork of the zygote runs ``program`` in ``env`` as a fresh process would."""
    if program not in PROGRAMS:
        return False
    differ = _startup_differences(env, _startup(_SESSION_ENV))
    if differ and os.environ.get("ASK_TEST_FORK_LOG"):  # which commands went the slow way, and why
        with open(os.environ["ASK_TEST_FORK_LOG"], "a") as log:
            print(os.environ.get("PYTEST_CURRENT_TEST", "?"), *differ, file=log)
    return not differ


def run(program: str, args: list[str], cwd: Path, env: dict[str, str],
        timeout: float | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(capture_output=True, text=True)`` for a console script, through the zygote."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = zygote().start(program, args, cwd, env, out.fileno(), err.fileno())
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess([program, *args], child.returncode,
                                           out.read().decode(errors="replace"), err.read().decode(errors="replace"))


# ---------------------------------------------------------------- console scripts for shell scripts
_SHIM = """#!{python} -I
import sys
sys.path.insert(0, {repo!r})
from tests.prewarmed import shim
sys.exit(shim({program!r}, {real!r}, sys.argv[1:]))
"""


def shim_bin(folder: Path) -> Path:
    """A ``bin/`` for shell scripts (``ASK_BIN``): each console script there forwards to the zygote.

    A forwarder is a small Python without torch; it hands the zygote its arguments, working
    directory, environment and standard streams, and exits with the command's status.
    """
    folder.mkdir(parents=True, exist_ok=True)
    real_bin = Path(sys.executable).parent
    repo = str(Path(__file__).resolve().parents[1])
    for entry in real_bin.iterdir():
        if entry.name not in PROGRAMS:
            (folder / entry.name).symlink_to(entry)
    for program in PROGRAMS:
        script = folder / program
        script.write_text(_SHIM.format(python=sys.executable, repo=repo, program=program,
                                       real=str(real_bin / program)))
        script.chmod(0o755)
    return folder


def shim_env() -> dict[str, str]:
    """What a forwarder needs to find the zygote, for the environment of a shell script."""
    return {_ENV: zygote().path, f"{_ENV}_STARTUP": json.dumps(_startup(_SESSION_ENV))}


def shim(program: str, real: str, args: list[str]) -> int:
    path = os.environ.get(_ENV)
    startup = json.loads(os.environ.get(f"{_ENV}_STARTUP", "null"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV)}
    if not path or _startup_differences(env, startup):
        os.execv(real, [real, *args])
    child = _connect(path, program, args, Path.cwd(), env, sys.stdout.fileno(), sys.stderr.fileno())
    code = child.wait()
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    forked = serve(sys.argv[1])
    if forked is None:
        sys.exit(0)
    request, fds, (connection, main) = forked
    become(request, fds, connection, main)
