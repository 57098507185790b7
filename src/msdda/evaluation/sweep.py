"""The Pareto sweep: methods x preference weights x prompts x seeds, resumable.

The sweep is a plan of units (:mod:`.units`: one method at one weight for one seed,
all prompts in one batch, on noise shared by every method). Each finished unit's rows
(one per prompt) are appended to the results file at once, durably; a sweep started
again on the same file skips the rows already there.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import check_output_path
from ..methods import METHODS, MethodSettings, check_method, weight_key
from ..validation import check_int, check_number, check_seeds, check_sequence
from .domains import SweepDomain, load_domain
from .executors import LocalExecutor, RayExecutor, UnitWork, write_pictures
from .results import Results, ResultsError, check_same_configuration, open_results, read_results
from .tuning import TuningConfig, sweep_methods, tune_settings
from .units import ImageSink, SweepUnit, unit_keys
from .variants import method_of

__all__ = [
    "SweepConfig",
    "SweepSummary",
    "simplex_grid",
    "plan_units",
    "run_sweep",
]


def simplex_grid(points: int) -> tuple[tuple[float, float], ...]:
    """``points`` evenly spaced weights (w, 1 - w) from (0, 1) to (1, 0)."""
    check_int(points, "points (of a weight grid)", low=2, high=MAX_GRID)
    return tuple(
        (round(i / (points - 1), 12), round(1 - i / (points - 1), 12)) for i in range(points)
    )


def _check_grid(weights) -> tuple[tuple[float, ...], ...]:
    grid = []
    for n, w in enumerate(check_sequence(weights, "weights")):
        items = check_sequence(w, f"weights[{n}]")
        w = tuple(check_number(x, f"weights[{n}][{i}]", low=0.0) for i, x in enumerate(items))
        if abs(math.fsum(w) - 1) > 1e-6:
            raise ValueError(f"weights[{n}] = {list(w)} is outside the simplex (w >= 0, sum 1)")
        grid.append(w)
    if not grid:
        raise ValueError("the weight grid is empty")
    if len({len(w) for w in grid}) != 1:
        raise ValueError("every weight vector of the grid must have the same length")
    if len({weight_key(w) for w in grid}) != len(grid):
        raise ValueError("the weight grid repeats a weight vector")
    return tuple(grid)


#: The most points a weight grid may have, and the most images per (prompt, seed) row.
MAX_GRID = 10_001
MAX_IMAGES = 1_000_000


def _check_seeds(values, name: str) -> tuple[int, ...]:
    out = tuple(check_seeds(values, name))
    if len(set(out)) != len(out):
        raise ValueError(f"{name} repeats a value: {list(out)}")
    return out


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep runs; recorded in the results header and compared on resume."""

    domain: str = "digits"  # see DOMAINS
    domain_options: tuple[tuple[str, Any], ...] = ()  # keyword options of the domain
    methods: tuple[str, ...] = tuple(METHODS)  # methods to compare
    weights: tuple[tuple[float, ...], ...] = simplex_grid(11)  # preference weights
    oracle_weights: bool = True  # also sample every method at the oracles' weights
    prompts: tuple[Any, ...] | None = None  # None: the domain's prompts
    seeds: tuple[int, ...] = (0, 1)  # evaluation seeds
    images_per_prompt: int = 64  # images per (prompt, seed) row
    settings: MethodSettings = field(default_factory=MethodSettings)  # untuned defaults
    tuning: TuningConfig | None = field(default_factory=TuningConfig)  # None: no tuning
    # a method tuned by several rules runs once per rule: "rgg" (reward), "rgg-matched", ...

    def __post_init__(self) -> None:
        methods = tuple(self.methods)
        if not methods:
            raise ValueError("methods is empty")
        for m in methods:
            if m not in METHODS and method_of(m) != m:  # a variant name, e.g. "rgg-matched"
                raise ValueError(
                    f"{m!r} is {method_of(m)!r} tuned by the {m.rpartition('-')[2]!r} rule: list "
                    f"{method_of(m)!r} in methods and the rule in the tuning rules"
                )
            check_method(m)
        if len(set(methods)) != len(methods):
            raise ValueError(f"methods repeats a method: {list(methods)}")
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "weights", _check_grid(self.weights))
        object.__setattr__(self, "seeds", _check_seeds(self.seeds, "seeds"))
        object.__setattr__(self, "domain_options", tuple(sorted(dict(self.domain_options).items())))
        if self.prompts is not None:
            object.__setattr__(self, "prompts", tuple(self.prompts))
            if not self.prompts or len(set(map(repr, self.prompts))) != len(self.prompts):
                raise ValueError("prompts must be non-empty and without repeats")
        check_int(self.images_per_prompt, "images_per_prompt", low=1, high=MAX_IMAGES)
        if not isinstance(self.oracle_weights, bool):
            raise TypeError(f"oracle_weights must be a bool, got {self.oracle_weights!r}")
        if not isinstance(self.settings, MethodSettings):
            raise TypeError(f"settings must be MethodSettings, got {type(self.settings).__name__}")
        if self.tuning is not None and not isinstance(self.tuning, TuningConfig):
            raise TypeError(f"tuning must be a TuningConfig or None, got {self.tuning!r}")
        if self.tuning is not None:
            clash = set(self.tuning.seeds) & set(self.seeds)
            if clash:
                raise ValueError(
                    f"tuning seeds {sorted(clash)} are also evaluation seeds: tune on separate seeds"
                )

    @property
    def sweep_methods(self) -> tuple[str, ...]:
        """The method names of the results: each tuned method once per tuning rule."""
        return sweep_methods(self.methods, self.tuning)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["domain_options"] = dict(self.domain_options)
        return d


def sweep_weights(config: SweepConfig, domain: SweepDomain) -> tuple[tuple[float, ...], ...]:
    """The grid, plus the weights of the domain's oracles when ``config.oracle_weights``."""
    grid = list(config.weights)
    if config.oracle_weights and "oracle" in config.methods:
        have = {weight_key(w) for w in grid}
        grid += [tuple(map(float, k)) for k in domain.context.oracles if weight_key(k) not in have]
    return tuple(sorted(grid))


def plan_units(config: SweepConfig, domain: SweepDomain) -> list[SweepUnit]:
    """Every unit of the sweep, seed by seed, then weight, then method.

    ``base`` runs once per seed; ``oracle`` only at weights with a trained oracle;
    ``student`` only in a domain with a trained student.
    """
    have_oracle = {weight_key(k) for k in domain.context.oracles}
    methods = config.sweep_methods
    units = []
    for seed in config.seeds:
        for m in methods:
            if not METHODS[method_of(m)].uses_weights:
                units.append(SweepUnit(m, None, seed))
        for w in sweep_weights(config, domain):
            for m in methods:
                info = METHODS[method_of(m)]
                if not info.uses_weights or (
                    info.needs_oracle and weight_key(w) not in have_oracle
                ):
                    continue
                if info.needs_student and domain.context.student is None:
                    continue  # no trained student in this domain
                units.append(SweepUnit(m, w, seed))
    return units


@dataclass(frozen=True)
class SweepSummary:
    path: Path
    units: int  # units in the plan
    units_run: int  # units sampled by this call
    rows_written: int  # rows appended by this call
    rows_total: int  # rows in the file now
    seconds: float
    settings: dict[str, MethodSettings]  # the hyperparameters used per method (tuned or given)


Progress = Callable[[str, int, int], None]  # (what, done, total)


def _kl_coef(domain: SweepDomain) -> float | None:
    """The target beta of the domain's problem, None where the experts' betas differ."""
    try:
        return domain.context.target_kl_coef()
    except ValueError:
        return None


def _header(config: SweepConfig, domain: SweepDomain, prompts) -> dict:
    return {
        "config": config.to_dict(),
        "identity": {"domain": domain.name, **dict(domain.identity)},
        "objectives": list(domain.objectives),
        "rewards": list(domain.eval_rewards),
        "judges": list(domain.judges),
        "prompts": list(prompts),
        "oracle_weights": sorted(list(weight_key(k)) for k in domain.context.oracles),
        "methods": list(config.sweep_methods),
        "kl_coef": _kl_coef(domain),  # beta of the KL-regularised objective
        "weights": [list(w) for w in sweep_weights(config, domain)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


def _settings(
    config: SweepConfig,
    domain: SweepDomain,
    prompts: tuple[Any, ...],
    header: dict,
    path: Path,
    progress: Progress | None,
) -> tuple[dict[str, MethodSettings], dict | None]:
    """The settings per sweep method and the tuning record: tuned now, or read on resume."""
    if path.exists() and path.stat().st_size > 0:  # resume: the header's tuned settings
        existing = read_results(path, warn=False)
        check_same_configuration(existing, header)
        return _settings_in(existing), existing.header.get("tuning")
    settings = {m: config.settings for m in config.sweep_methods}
    record = None
    if config.tuning is not None:
        tuned, record = tune_settings(
            domain, config.tuning, config.methods, prompts, config.settings, progress=progress
        )
        settings.update(tuned)
    return settings, record


def run_sweep(
    config: SweepConfig,
    path: str | Path,
    *,
    domain: SweepDomain | None = None,
    progress: Progress | None = None,
    executor: LocalExecutor | RayExecutor | None = None,
) -> SweepSummary:
    """Run (or resume) the sweep ``config`` into the results file ``path``.

    Hyperparameters are tuned first (on the tuning seeds) for a new file, or read from
    the header of an existing one; the file must have been written by the same config.
    The units still to run go to ``executor`` (default: :class:`LocalExecutor`, here, in
    plan order); this process alone writes the file, one unit's rows when it finished.
    """
    start = time.perf_counter()
    if not isinstance(config, SweepConfig):
        raise TypeError(f"config must be a SweepConfig, got {type(config).__name__}")
    path = check_output_path(path)
    if path.exists() and path.stat().st_size > 0:  # a bad file is refused before any work
        _settings_in(read_results(path, warn=False))
    domain = domain or load_domain(config.domain, **dict(config.domain_options))
    k = domain.context.num_objectives
    if any(len(w) != k for w in config.weights):
        raise ValueError(
            f"every weight vector needs K = {k} entries (objectives {domain.objectives})"
        )
    prompts = tuple(domain.check_prompt(p) for p in (config.prompts or domain.prompts))
    header = _header(config, domain, prompts)
    settings, record = _settings(config, domain, prompts, header, path, progress)
    header.update(settings={m: v.to_dict() for m, v in settings.items()}, tuning=record)
    sink = image_sink(path, domain, prompts)
    if sink is not None:
        header["images"] = sink.folder
    writer, _ = open_results(path, header)
    units = plan_units(config, domain)
    work = UnitWork(
        config.domain, config.domain_options, prompts, config.images_per_prompt, settings, sink
    )
    units_run = written = 0
    with writer:
        todo = [u for u in units if not unit_keys(u, prompts) <= writer.done]
        skipped = len(units) - len(todo)
        if progress:
            progress("resuming" if skipped else "starting", skipped, len(units))
        for result in (executor or LocalExecutor()).run(work, todo, domain):
            if sink is not None:  # the pictures first: a row never names a missing file
                write_pictures(sink.root, result.pictures)
            units_run += 1
            written += sum(writer.append(r) for r in result.rows)
            if progress:
                progress(_describe(result.unit), skipped + units_run, len(units))
        total = len(writer.done)
    if progress:
        progress("done", len(units), len(units))
    return SweepSummary(
        path, len(units), units_run, written, total, time.perf_counter() - start, settings
    )


def image_sink(path: Path, domain: SweepDomain, prompts) -> ImageSink | None:
    """Where the pictures of a sweep into ``path`` go: ``<stem>-images/`` beside it (None
    for a domain without pictures)."""
    if domain.picture is None:
        return None
    return ImageSink(path.stem + "-images", path.parent, tuple(prompts))


def _settings_in(results: Results) -> dict[str, MethodSettings]:
    """The hyperparameters per method recorded in a results header."""
    recorded = results.header.get("settings")
    methods = results.header.get("methods") or results.config.get("methods", [])
    if not isinstance(recorded, dict) or any(
        not isinstance(recorded.get(m), dict) for m in methods
    ):
        raise ResultsError(results.path, f"the header does not record the settings of {methods}")
    try:
        return {m: MethodSettings(**recorded[m]) for m in methods}
    except (TypeError, ValueError) as err:
        raise ResultsError(results.path, f"the header records bad settings: {err}") from None


def _describe(unit: SweepUnit) -> str:
    return f"{unit.method} w={_fmt_weights(unit.weights)} seed={unit.seed}"


def _fmt_weights(weights) -> str:
    return "-" if weights is None else "(" + ", ".join(f"{w:.2f}" for w in weights) + ")"
