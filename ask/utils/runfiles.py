"""The names of the files in a run directory, each spelled here and nowhere else in ``ask`` or ``scripts``.

They are an on-disk contract: ``ask-report``, a resumed or continued run, a sweep's failure list
and the scripts all find a run's files by these names, so a name changed in one place only would
leave runs that the rest no longer sees. ``tests/test_architecture.py`` refuses a literal of any of
them elsewhere. Cache files (``ask.knn``, ``ask.data``) are not run files and keep their own names.
No imports: scripts that must start without torch or Hydra read the names from here.
"""

from __future__ import annotations

from dataclasses import dataclass

# Written before the task: the resolved config that says which settings every file beside it came from.
CONFIG_FILE = "config.yaml"
# Hydra's records of the run: its composed (unresolved) config under CONFIG_FILE, and these two.
HYDRA_RECORDS_DIR = ".hydra"
HYDRA_FILE = "hydra.yaml"
OVERRIDES_FILE = "overrides.yaml"

LOCK_FILE = ".lock"  # flock held while a command works in the directory
AUTO_TRAIN_LOCK_FILE = ".auto_train.lock"  # held by ask-attack while it trains or reuses a cached default model
ADOPTED_MARKER = "continued_in.txt"  # in an unfinished run taken over by a new directory: where it went on
FAILURE_FILE = "failure.json"  # a sweep job that stopped: the error, for ask-report

# ask-attack
METRICS_FILE = "metrics.json"
PER_POINT_FILE = "per_point.csv"  # per point and victim, right (1) or wrong (0) on x and each attack's x'
EVAL_STATE_FILE = "eval_state.pt"

# ask-train
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
EPOCH_METRICS_FILE = "metrics.jsonl"
TRAIN_SUMMARY_FILE = "train_summary.json"


@dataclass(frozen=True)
class RunFiles:
    """What a command leaves in its run directory: the file that says it finished, and its progress."""

    done: str
    progress: tuple[str, ...]

    @property
    def resumed_from(self) -> str:
        """The progress file a resume reads; a directory holding it continues by itself."""
        return self.progress[0]

    @property
    def names(self) -> tuple[str, ...]:
        """Results and progress together: what a run of other settings must not leave behind."""
        return (self.done, *self.progress)


RUN_FILES = {
    "attack": RunFiles(METRICS_FILE, (EVAL_STATE_FILE,)),
    "train": RunFiles(TRAIN_SUMMARY_FILE, (LAST_CHECKPOINT, BEST_CHECKPOINT, EPOCH_METRICS_FILE)),
}
