"""The Pareto harness: sweeps of every method over preference weights, and their report.

Modules, each importing only those before it: ``results`` (the results file and its
rows), ``hypervolume``, ``toy`` and ``domains``, ``variants`` (the sweep's method
names), ``units`` (the unit of work), ``tuning``, ``sweep``, ``aggregate`` (the
report's numbers) and ``render`` (its PNG and markdown).
"""

from .aggregate import (
    DRIFT_FLAG,
    MethodPoint,
    MethodSummary,
    Report,
    Standing,
    build_report,
    regularised_objective,
    standings,
)
from .domains import DOMAINS, SweepDomain, digits_domain, load_domain, toy_domain
from .render import markdown, plot_pareto, write_markdown
from .results import FORMAT, ResultRow, Results, ResultsError, read_results, row_key
from .sweep import SweepConfig, SweepSummary, plan_units, run_sweep, simplex_grid
from .tuning import TuningConfig, choose, sweep_methods, tune_settings
from .units import SweepUnit, run_unit, sample_seeds, score_samples
from .variants import TUNED, TUNING_RULES, method_of

__all__ = [
    "DOMAINS",
    "DRIFT_FLAG",
    "FORMAT",
    "MethodPoint",
    "MethodSummary",
    "Report",
    "ResultRow",
    "Results",
    "ResultsError",
    "Standing",
    "SweepConfig",
    "SweepDomain",
    "SweepSummary",
    "SweepUnit",
    "TUNED",
    "TUNING_RULES",
    "TuningConfig",
    "build_report",
    "choose",
    "digits_domain",
    "load_domain",
    "markdown",
    "method_of",
    "plan_units",
    "plot_pareto",
    "read_results",
    "regularised_objective",
    "row_key",
    "run_sweep",
    "run_unit",
    "sample_seeds",
    "score_samples",
    "simplex_grid",
    "standings",
    "sweep_methods",
    "toy_domain",
    "tune_settings",
    "write_markdown",
]
