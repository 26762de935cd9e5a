"""Tables (and, later, plots) of evaluation results."""

from ask.reporting.table import format_results_table

__all__ = ["format_results_table"]
