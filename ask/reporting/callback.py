"""A Hydra callback that turns a finished ``-m`` sweep into ``report.md`` in its sweep directory.

Registered for every console script in ``conf/run.yaml`` (``hydra.callbacks.report``). After an
``ask-attack`` sweep it writes the report beside the job directories; after an ``ask-train`` sweep
there is nothing to report and it returns quietly. It never raises: a sweep whose jobs all
finished must not end in an error because its summary could not be written. It also notes the
jobs that failed (:data:`FAILED_JOBS`), so that the console script can end the sweep non-zero.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ask.utils.runfiles import FAILURE_FILE

log = logging.getLogger(__name__)

#: The job directories of the sweep that just ended that hold a ``failure.json``.
FAILED_JOBS: list[Path] = []


class ReportCallback(Callback):
    """Run :func:`ask.reporting.report.write_report` on ``hydra.sweep.dir`` when a multirun ends.

    ``enabled=false`` (``hydra.callbacks.report.enabled=false``) switches it off.
    """

    def __init__(self, enabled: bool = True, plots: bool = True) -> None:
        self.enabled = enabled
        self.plots = plots

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
        except Exception as error:  # an odd config must not fail the sweep
            log.warning("no sweep report: cannot read hydra.sweep.dir (%s)", error)
            return
        # Whatever the launcher, a failed job left failure.json; the console script exits non-zero on them.
        started = getattr(self, "_started", 0.0) - 1.0  # a reused sweep.dir holds older failures
        try:
            FAILED_JOBS[:] = sorted(path.parent for path in sweep_dir.glob(f"**/{FAILURE_FILE}")
                                    if path.stat().st_mtime >= started)
        except OSError as error:
            log.warning("cannot look for failed jobs under %s: %s", sweep_dir, error)
        if not self.enabled:
            return
        try:
            from ask.reporting.report import write_report
            from ask.reporting.runs import find_runs

            if not sweep_dir.is_dir() or find_runs([sweep_dir]).empty:
                log.info("no ask-attack results under %s; no sweep report written", sweep_dir)
                return
            report = write_report([sweep_dir], sweep_dir, plots=self.plots)
        except Exception as error:  # the sweep's results stay valid without their summary
            log.warning("could not write the sweep report in %s: %s: %s", sweep_dir, type(error).__name__, error)
            return
        log.info("sweep report: %s (%d runs, %d failed jobs; also report.csv%s)", report.markdown,
                 len(report.collection.runs), len(report.collection.failures),
                 "".join(f", {p.name}" for p in report.plots))
