"""The Pareto harness: sweeps of every method over preference weights, and their report."""

from .domains import DOMAINS, SweepDomain, digits_domain, load_domain, toy_domain
from .results import FORMAT, Results, ResultsError, read_results, row_key
from .sweep import SweepConfig, SweepSummary, SweepUnit, plan_units, run_sweep, simplex_grid
from .tuning import (
    TUNED,
    TUNING_RULES,
    TuningConfig,
    choose,
    method_of,
    sweep_methods,
    tune_settings,
)

__all__ = [
    "DOMAINS",
    "FORMAT",
    "Results",
    "ResultsError",
    "SweepConfig",
    "SweepDomain",
    "SweepSummary",
    "SweepUnit",
    "TUNED",
    "TUNING_RULES",
    "TuningConfig",
    "choose",
    "digits_domain",
    "load_domain",
    "method_of",
    "plan_units",
    "read_results",
    "row_key",
    "run_sweep",
    "simplex_grid",
    "sweep_methods",
    "toy_domain",
    "tune_settings",
]
