"""Stop cleanly when the scheduler asks: SIGTERM (SLURM's pre-emption and ``scancel`` signal),
SIGUSR1 (``sbatch --signal=USR1@120``) and SIGUSR2 (what submitit asks SLURM to send ahead of the
time limit) set a flag; the trainer checks it after every step, saves a mid-epoch checkpoint and
exits, and the same command later resumes at the next step. A handler that was installed before
(submitit's, which requeues the job) is then called with the signal, so requeueing still works.

The handler only sets a flag because a signal can land inside ``torch.save``; writing the
checkpoint from the training loop keeps every write atomic and complete.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StopRequest:
    """Context manager: while active, the stop signals set :attr:`signal_name` instead of killing."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signal_name = signal.Signals(signum).name
        self._signum, self._frame = signum, frame

    def forward(self) -> None:
        """Call the handler the caught signal had before (e.g. submitit's requeue), once the
        checkpoint is safe; default and ignore dispositions are not replayed."""
        previous = self._previous.get(getattr(self, "_signum", -1))
        if callable(previous):
            previous(self._signum, self._frame)

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be installed from the main thread (not in a launcher's worker thread).
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()


class RunStopped(BaseException):
    """A run stopped on a signal with its progress on disk; the message says where and how to resume.

    A BaseException, as KeyboardInterrupt is: :func:`stop_on_sigterm` raises it from a signal
    handler, so it can land inside library code that catches ``Exception``. Logging does, and with
    ``logging.raiseExceptions`` off (the console scripts' setting) it dropped the stop without a
    word: a SIGTERM that arrived while ``ask-attack`` logged a batch let the evaluation run on.
    """


class TrainingStopped(RunStopped):
    """Training stopped on a signal after writing a resumable checkpoint; the message says where."""


@contextmanager
def stop_on_sigterm(describe: Callable[[str], str]) -> Iterator[None]:
    """While active, SIGTERM raises :class:`RunStopped` with ``describe(signal name)`` as Ctrl-C would.

    For work that writes its progress atomically as it goes (``ask-attack``'s per-batch state):
    stopping it at any point loses at most the unfinished batch, so the exception can land
    anywhere, and the scheduler gets a message and status 143 instead of a silent kill.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be installed from the main thread
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise RunStopped(describe(signal.Signals(signum).name))

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
