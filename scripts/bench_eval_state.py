"""Cost of ask-attack's per-batch resumable state, measured inside a real run.

    python scripts/bench_eval_state.py                 # the digits demo (make demo's job)
    python scripts/bench_eval_state.py attack.eps=0.2  # any ask-attack overrides

Wraps the atomic save of ``eval_state.pt`` and prints, per batch, the file's size, the time the
save took and the time the batch took before it; then the medians (the first batch, which
includes start-up, is left out of the batch median). The run writes into ``outputs/bench_eval_state``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import ask.evaluation.evaluate as evaluate_module
from ask.cli.attack import main


def run(overrides: list[str]) -> None:
    saves: list[float] = []
    batches: list[float] = []
    last = [time.perf_counter()]
    atomic_save = evaluate_module.atomic_save

    def timed_save(obj: Any, path: Path) -> Path:
        start = time.perf_counter()
        batches.append(start - last[0])
        written = atomic_save(obj, path)
        saves.append(time.perf_counter() - start)
        last[0] = time.perf_counter()
        print(f"batch {len(saves)}: state {path.stat().st_size / 1024:.1f} KB, save {saves[-1] * 1000:.1f} ms, "
              f"batch {batches[-1]:.2f} s", file=sys.stderr)
        return written

    evaluate_module.atomic_save = timed_save
    sys.argv = ["ask-attack", "progress=false", "hydra.run.dir=outputs/bench_eval_state", *overrides]
    try:
        main()
    except SystemExit as stopped:
        if stopped.code:
            raise
    finally:
        evaluate_module.atomic_save = atomic_save
    if saves:
        later = batches[1:] or batches
        print(f"median save {statistics.median(saves) * 1000:.1f} ms over {len(saves)} batches; "
              f"median batch {statistics.median(later):.2f} s", file=sys.stderr)


if __name__ == "__main__":
    run(sys.argv[1:])
