"""``msdda sweep``: every method x preference weights x prompts x seeds, into a results file."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import app


def fail(message: str) -> None:
    """One clear line on stderr and a non-zero exit, no traceback."""
    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def show_warnings(caught) -> None:
    console = Console(stderr=True)
    for w in caught:
        console.print(f"[yellow]warning:[/] {w.message}", highlight=False, soft_wrap=True)


def _floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{name} must be comma-separated numbers, got {text!r}")


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{name} must be comma-separated integers, got {text!r}")


def parse_weights(grid: int, weights: str | None) -> list[tuple[float, ...]]:
    """``--weights "0.3,0.7;0.5,0.5"`` or an evenly spaced 2-objective grid of ``--grid`` points."""
    from ..evaluation import simplex_grid

    if weights:
        return [tuple(_floats(part, "--weights")) for part in weights.split(";") if part.strip()]
    return list(simplex_grid(grid))


def parse_code_grid(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            n, b = part.lower().split("x")
            out.append((int(n), int(b)))
        except ValueError:
            fail(f"--code-grid must be NxB pairs like '2x1,4x5', got {text!r}")
    return out


@app.command()
def sweep(
    results: Path = typer.Argument(..., help="Results file (JSON lines); resumed if it exists."),
    domain: str = typer.Option("digits", help="Domain: digits or toy."),
    weights_dir: str = typer.Option(None, help="digits: weights folder (default: shipped)."),
    expert_kind: str = typer.Option("fixed", help="digits: expert kind, fixed or learned."),
    objectives: str = typer.Option("legibility,boldness", help="digits: the K objectives."),
    methods: str = typer.Option(
        "base,rs,db,db-ls,rgg,code,target,msdda,oracle", help="Comma-separated methods."
    ),
    grid: int = typer.Option(11, help="Evenly spaced weights (w, 1 - w) for 2 objectives."),
    weights: str = typer.Option(None, help="Explicit weights, e.g. '0.3,0.7;0.5,0.5'."),
    oracle_weights: bool = typer.Option(
        True, help="Also sample every method at the trained oracles' weights."
    ),
    prompts: str = typer.Option(None, help="Comma-separated prompts (default: the domain's)."),
    seeds: str = typer.Option("0,1", help="Comma-separated evaluation seeds."),
    images: int = typer.Option(64, help="Images per (prompt, seed) row."),
    tune: bool = typer.Option(True, help="Tune rgg's scale and code's (N, B) on tuning seeds."),
    tune_rules: str = typer.Option(
        "reward,matched",
        help="Tuning rules, one variant of rgg and code each: reward (highest weighted reward: "
        "rgg, code), matched (KL to the base closest to MSDDA's: rgg-matched, code-matched), "
        "regularised (highest weighted reward - beta KL: rgg-regularised, code-regularised).",
    ),
    tune_seeds: str = typer.Option("10000", help="Tuning seeds (disjoint from --seeds)."),
    tune_images: int = typer.Option(8, help="Images per (prompt, tuning seed)."),
    rgg_scales: str = typer.Option(
        "0.05,0.1,0.15,0.2,0.25,0.3,0.5,1,2,3,5", help="rgg scales tried when tuning."
    ),
    code_grid: str = typer.Option(
        ",".join(f"{n}x{b}" for n in (2, 4, 8) for b in (1, 5, 10, 25, 50)),
        help="code (N x B) tried when tuning.",
    ),
    rgg_scale: float = typer.Option(1.0, help="rgg scale when not tuning."),
    rgg_schedule: str = typer.Option("constant", help="rgg step schedule of the scale."),
    code_n: int = typer.Option(4, help="code: candidates N when not tuning."),
    code_b: int = typer.Option(5, help="code: block length B when not tuning."),
    target_m: int = typer.Option(8, help="target: candidates M per step."),
    threads: int = typer.Option(
        1, help="torch threads (0: torch's default; 1 is robust on a busy shared CPU)."
    ),
) -> None:
    """Sample every method over preference weights, prompts and seeds; append rows as they finish."""
    import torch

    from ..evaluation import ResultsError, SweepConfig, TuningConfig, method_of, run_sweep
    from ..methods import METHODS, MethodSettings

    if threads:
        torch.set_num_threads(threads)
    options: dict = {}
    if domain == "digits":
        names = tuple(n.strip() for n in objectives.split(",") if n.strip())
        options = {"weights_dir": weights_dir, "expert_kind": expert_kind, "objectives": names}
    try:
        tuning = None
        if tune:
            tuning = TuningConfig(
                seeds=tuple(_ints(tune_seeds, "--tune-seeds")),
                images_per_prompt=tune_images,
                rules=tuple(r.strip() for r in tune_rules.split(",") if r.strip()),
                rgg_scales=tuple(_floats(rgg_scales, "--rgg-scales")),
                code_grid=tuple(parse_code_grid(code_grid)),
            )
        prompt_list = None
        if prompts:
            prompt_list = tuple(_ints(prompts, "--prompts"))
        config = SweepConfig(
            domain=domain,
            domain_options=tuple(options.items()),
            methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
            weights=tuple(parse_weights(grid, weights)),
            oracle_weights=oracle_weights,
            prompts=prompt_list,
            seeds=tuple(_ints(seeds, "--seeds")),
            images_per_prompt=images,
            settings=MethodSettings(
                rgg_scale=rgg_scale,
                rgg_schedule=rgg_schedule,
                code_candidates=code_n,
                code_block=code_b,
                target_candidates=target_m,
            ),
            tuning=tuning,
        )
        console = Console(stderr=True)
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with Progress(*columns, console=console, transient=not sys.stderr.isatty()) as bar:
                task = bar.add_task("sweep", total=None)

                def progress(what: str, done: int, total: int) -> None:
                    bar.update(task, description=what, completed=done, total=total)

                summary = run_sweep(config, results, progress=progress)
        show_warnings(caught)
    except (ValueError, TypeError, ResultsError) as err:
        fail(str(err))
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
