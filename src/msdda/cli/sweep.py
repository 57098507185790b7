"""``msdda sweep``: every method x preference weights x prompts x seeds, into a results file."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer
from rich.console import Console

from ..methods.strategies import MAX_CANDIDATES
from . import app
from .common import (
    MAX_THREADS,
    check_kind,
    checked,
    fail,
    input_file,
    input_folder,
    integer,
    integers,
    number,
    numbers,
    nxb_pairs,
    parse_floats,
    parse_ints,
    parse_seeds,
    progress_bar,
    reads_from,
    results_file,
    seed_list,
    show_warnings,
    split_code_grid,
    split_weight_vectors,
    user_errors,
    weight_vectors,
    writes_to,
)

DEFAULT_METHODS = "base,rs,db,db-ls,rgg,code,target,msdda,oracle,student"
DEFAULT_RGG_SCALES = "0.05,0.1,0.15,0.2,0.25,0.3,0.5,1,2,3,5"
DEFAULT_CODE_GRID = ",".join(f"{n}x{b}" for n in (2, 4, 8) for b in (1, 5, 10, 25, 50))
TUNE_RULES_HELP = (
    "Tuning rules, one variant of rgg and code each: reward (highest weighted reward: rgg, "
    "code), matched (KL to the base closest to MSDDA's: rgg-matched, code-matched), "
    "regularised (highest weighted reward - beta KL: rgg-regularised, code-regularised)."
)
ORACLE_WEIGHTS_HELP = "Also sample every method at the trained oracles' weights."
EXECUTOR_OPTIONS = ("executor", "ray_address", "ray_workers", "ray_cpus")
EXECUTOR_HELP = "Where units run: local (this process) or ray (a Ray cluster; the ray extra)."
RAY_ADDRESS_HELP = "ray: address of a running cluster (default: start a local one, loopback only)."
RAY_WORKERS_HELP = "ray: worker actors (default: one per GPU, else one per --ray-cpus CPUs)."
THREADS_HELP = "torch threads (0: torch's default; 1 is robust on a busy shared CPU)."
CONFIG_HELP = (
    "A TOML sweep config (examples/*.toml): domain, models, rewards, judges, prompts, "
    "weights, seeds, methods, settings, tuning. Only --threads and the --executor/--ray-* options may be given beside it."
)


def _refuse_options_beside_config(ctx: typer.Context) -> None:
    """With --config, every sweep option but --threads and the executor's comes from the file."""
    given = [
        p for p in ctx.command.params
        if p.param_type_name == "option" and p.name not in ("config_file", "threads", *EXECUTOR_OPTIONS)
        and getattr(ctx.get_parameter_source(p.name), "name", None) == "COMMANDLINE"
    ]  # fmt: skip
    if given:
        fail(
            f"{given[0].opts[0]} cannot be combined with --config: set it in the config file "
            "(only --threads and the --executor/--ray-* options may be given beside it)"
        )


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_weights(grid: int, weights: str | None) -> list[tuple[float, ...]]:
    """``--weights "0.3,0.7;0.5,0.5"`` or an evenly spaced 2-objective grid of ``--grid`` points."""
    from ..evaluation import simplex_grid

    if weights:
        return split_weight_vectors(weights, "--weights")
    return list(simplex_grid(grid))


def _domain_options(domain: str, weights_dir: str | None, expert_kind: str, objectives: str):
    """The domain's keyword options (only digits takes any)."""
    if domain != "digits":
        return ()
    options = {
        "weights_dir": weights_dir,
        "expert_kind": check_kind(expert_kind),
        "objectives": _names(objectives),
    }
    return tuple(options.items())


def _tuning(tune: bool, rules: str, seeds: str, images: int, rgg_scales: str, code_grid: str):
    """The tuning step of the options (None: ``--no-tune``)."""
    from ..evaluation import TuningConfig

    if not tune:
        return None
    return TuningConfig(
        seeds=tuple(parse_seeds(seeds, "--tune-seeds")),
        images_per_prompt=images,
        rules=_names(rules),
        rgg_scales=tuple(parse_floats(rgg_scales, "--rgg-scales", low=0.0)),
        code_grid=tuple(split_code_grid(code_grid, "--code-grid", MAX_CANDIDATES)),
    )


def load_config(path: Path):
    """The checked config of a TOML file (nothing loaded yet)."""
    from ..evaluation.config import load_config as load

    return load(path)


def _run(config, results: Path, threads: int, executor=None):
    """Run the sweep on ``threads`` torch threads (0: torch's default) under a progress bar,
    its units on ``executor`` (None: here)."""
    import torch

    from ..evaluation import load_domain, read_results, run_sweep

    if results.is_file() and results.stat().st_size > 0:  # a resume: a results file first
        with reads_from(results):  # (an unreadable one is refused here, before any work)
            read_results(results, warn=False)
    if threads:
        torch.set_num_threads(threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # the domain's files (a weights folder) are read and checked before the sweep starts
        domain = load_domain(config.domain, **dict(config.domain_options))
        with progress_bar(Console(stderr=True)) as bar:
            task = bar.add_task("sweep", total=None)

            def progress(what: str, done: int, total: int) -> None:
                bar.update(task, description=what, completed=done, total=total)

            summary = run_sweep(
                config, results, domain=domain, progress=progress, executor=executor
            )
    show_warnings(caught)
    return summary


def _print_summary(summary) -> None:
    from ..evaluation import method_of
    from ..methods import METHODS

    tuned = {
        m: {k: getattr(v, k) for k in METHODS[method_of(m)].parameters}
        for m, v in summary.settings.items()
        if METHODS[method_of(m)].parameters
    }
    Console().print(
        f"{summary.path}: {summary.rows_written} row(s) written by {summary.units_run} of "
        f"{summary.units} unit(s), {summary.rows_total} in the file; "
        f"{summary.seconds:.1f} s; settings {tuned}",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def sweep(
    ctx: typer.Context,
    results: Path = typer.Argument(
        ..., callback=results_file(), help="Results file (JSON lines); resumed if it exists."
    ),
    domain: str = typer.Option("digits", help="Domain: digits or toy (sd: with --config)."),
    weights_dir: str = checked(
        None, check=input_folder(), help="digits: weights folder (default: shipped)."
    ),
    expert_kind: str = typer.Option("fixed", help="digits: expert kind, fixed or learned."),
    objectives: str = typer.Option("legibility,boldness", help="digits: the K objectives."),
    methods: str = typer.Option(DEFAULT_METHODS, help="Comma-separated methods."),
    grid: int = checked(
        11, check=integer(2), help="Evenly spaced weights (w, 1 - w) for 2 objectives."
    ),
    weights: str = checked(
        None, check=weight_vectors(), help="Explicit weights, e.g. '0.3,0.7;0.5,0.5'."
    ),
    oracle_weights: bool = typer.Option(True, help=ORACLE_WEIGHTS_HELP),
    prompts: str = checked(
        None, check=integers(), help="Comma-separated prompts (default: the domain's)."
    ),
    seeds: str = checked("0,1", check=seed_list, help="Comma-separated evaluation seeds."),
    images: int = checked(64, check=integer(1), help="Images per (prompt, seed) row."),
    tune: bool = typer.Option(True, help="Tune rgg's scale and code's (N, B) on tuning seeds."),
    tune_rules: str = typer.Option("reward,matched", help=TUNE_RULES_HELP),
    tune_seeds: str = checked(
        "10000", check=seed_list, help="Tuning seeds (disjoint from --seeds)."
    ),
    tune_images: int = checked(8, check=integer(1), help="Images per (prompt, tuning seed)."),
    rgg_scales: str = checked(
        DEFAULT_RGG_SCALES, check=numbers(0.0), help="rgg scales tried when tuning."
    ),
    code_grid: str = checked(
        DEFAULT_CODE_GRID, check=nxb_pairs(MAX_CANDIDATES), help="code (N x B) tried when tuning."
    ),
    rgg_scale: float = checked(1.0, check=number(0.0), help="rgg scale when not tuning."),
    rgg_schedule: str = typer.Option("constant", help="rgg step schedule of the scale."),
    code_n: int = checked(
        4, check=integer(1, MAX_CANDIDATES), help="code: candidates N when not tuning."
    ),
    code_b: int = checked(5, check=integer(1), help="code: block length B when not tuning."),
    target_m: int = checked(
        8, check=integer(1, MAX_CANDIDATES), help="target: candidates M per step."
    ),
    threads: int = checked(1, check=integer(0, MAX_THREADS), help=THREADS_HELP),
    config_file: Path = checked(
        None, "--config", check=input_file(), help=CONFIG_HELP, show_default=False
    ),
    executor: str = typer.Option("local", help=EXECUTOR_HELP),
    ray_address: str = typer.Option(None, help=RAY_ADDRESS_HELP, show_default=False),
    ray_workers: int = checked(None, check=integer(1), help=RAY_WORKERS_HELP, show_default=False),
    ray_cpus: int = checked(
        1, check=integer(1, MAX_THREADS), help="ray: CPUs per worker where there are no GPUs."
    ),
) -> None:
    """Sample every method over preference weights, prompts and seeds; append rows as they finish."""
    from ..evaluation import SweepConfig
    from ..evaluation.executors import make_executor
    from ..methods import MethodSettings

    with user_errors():  # a missing Ray or a bad executor option, before anything is loaded
        runner = make_executor(
            executor, address=ray_address, workers=ray_workers, cpus_per_worker=ray_cpus
        )

    if config_file is not None:
        with user_errors():
            config = load_config(config_file)  # its errors name the file first
        _refuse_options_beside_config(ctx)
        with user_errors():
            with writes_to(results):
                summary = _run(config, results, threads, runner)
        _print_summary(summary)
        return
    if domain == "sd":
        fail("the sd domain is described by a config file: --config FILE.toml (examples/)")
    with user_errors():
        settings = MethodSettings(
            rgg_scale=rgg_scale, rgg_schedule=rgg_schedule, code_candidates=code_n,
            code_block=code_b, target_candidates=target_m,
        )  # fmt: skip
        config = SweepConfig(
            domain=domain,
            domain_options=_domain_options(domain, weights_dir, expert_kind, objectives),
            methods=_names(methods),
            weights=tuple(parse_weights(grid, weights)),
            oracle_weights=oracle_weights,
            prompts=tuple(parse_ints(prompts, "--prompts")) if prompts else None,
            seeds=tuple(parse_seeds(seeds, "--seeds")),
            images_per_prompt=images,
            settings=settings,
            tuning=_tuning(tune, tune_rules, tune_seeds, tune_images, rgg_scales, code_grid),
        )
        with writes_to(results):
            summary = _run(config, results, threads, runner)
    _print_summary(summary)
