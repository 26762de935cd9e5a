"""Tables and plots of evaluation results: the console table and ``ask-report``."""

from ask.reporting.table import format_results_table

__all__ = [
    "Report",
    "ReportCallback",
    "ReportError",
    "aggregate",
    "find_runs",
    "format_results_table",
    "write_report",
]


def __getattr__(name: str):
    # The report pulls in yaml and (for plots) matplotlib, and the callback Hydra: loaded on first
    # use so that `import ask.reporting` from the attack job stays light.
    if name in {"Report", "write_report"}:
        from ask.reporting import report

        return getattr(report, name)
    if name in {"ReportError", "find_runs"}:
        from ask.reporting import runs

        return getattr(runs, name)
    if name == "aggregate":
        from ask.reporting.aggregate import aggregate

        return aggregate
    if name == "ReportCallback":
        from ask.reporting.callback import ReportCallback

        return ReportCallback
    raise AttributeError(f"module 'ask.reporting' has no attribute {name!r}")
