"""``ask-report``: aggregate ask-attack runs and sweeps into report.md, report.csv and plots.

    ask-report outputs/attack-multirun/2024-05-01/12-00-00
    ask-report outputs/attack/2024-05-01/10-00-00 outputs/attack/2024-05-01/11-00-00 --out reports/cmp
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ask.errors import AskError, os_error_message

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ask-report",
        description="Aggregate the metrics.json of ask-attack runs and sweeps (searched recursively) into "
                    "report.md, report.csv, robust_vs_eps.png and asr_bars.png. Runs that differ only "
                    "in seed are averaged (mean ± sample std, with a 95 % interval: Student's t over seeds, "
                    "Wilson over the points of a single run); failed sweep jobs are listed.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="run or sweep directories")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where to write (default: the single PATH, or the common parent of all)")
    parser.add_argument("--no-plots", action="store_true", help="write report.md and report.csv only")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="ask-report: warning: %(message)s")
    from ask.reporting.report import write_report

    try:
        report = write_report(args.paths, args.out, plots=not args.no_plots)
    except (AskError, OSError) as error:
        problem = str(error) if isinstance(error, AskError) else os_error_message(error)
        if problem is None:
            raise
        print(f"ask-report: error: {problem}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    collection = report.collection
    print(f"{len(collection.runs)} runs, {len(collection.failures)} failed jobs, "
          f"{len(collection.problems)} problems -> {len(report.rows)} rows")
    for path in (report.markdown, report.csv, *report.plots):
        print(f"wrote {path}")
    if not collection.runs:
        # The report lists the failures, but a script or a scheduler must not take it for results.
        print(f"ask-report: error: no usable run under {', '.join(args.paths)} ({len(collection.failures)} failed "
              f"job(s), {len(collection.problems)} problem(s), listed in {report.markdown}); fix and rerun them",
              file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
