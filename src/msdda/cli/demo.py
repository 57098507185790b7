"""``msdda demo``: the digits MSDDA sweep on the shipped weights, with a table and figures."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from ..errors import check_output_path
from . import app
from .common import (
    MAX_THREADS,
    check_kind,
    check_output_folder,
    checked,
    fail,
    input_folder,
    integer,
    number,
    option_errors,
    output_folder,
    progress_bar,
    seed_value,
    user_errors,
    writes_to,
)


def _results_table(rows, cfg) -> Table:
    """The demo's table: one row per method and weight (rewards standardised on base samples)."""
    first, second = cfg.objectives
    table = Table(
        title=(
            f"MSDDA on digits ({cfg.expert_kind} experts, {cfg.samples_per_prompt} images per "
            f"digit, seed {cfg.seed}); rewards standardised on base samples"
        )
    )
    for col in ("method", f"w {first}", f"{first}", f"{second}", "accuracy", "ms / image"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(
            r.method,
            "-" if r.weight is None else f"{r.weight:.2f}",
            f"{r.rewards[first]:+.3f}",
            f"{r.rewards[second]:+.3f}",
            f"{r.accuracy:.3f}",
            f"{1000 * r.seconds_per_image:.2f}",
        )
    return table


def _methods_table(out: Path, preset: str) -> Table:
    """The preset's comparison of msdda, db, rs and the oracle (from ``results.json``)."""
    import json

    rows = json.loads((out / "results.json").read_text())["methods"]
    table = Table(title=f"preset {preset}: w = (0.5, 0.5), same prompts and noise; paired vs msdda")
    cols = ("method", "weighted reward", "KL to base", "reward - beta KL", "vs msdda (reward)")
    for col in (*cols, "vs msdda (reward - beta KL)"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(
            r["method"],
            f"{r['weighted_reward']:+.3f}",
            f"{r['kl']:.2f}",
            f"{r['objective']:+.3f}",
            f"{r['reward_minus_msdda']:+.4f} ± {r['reward_minus_msdda_se']:.4f}",
            f"{r['objective_minus_msdda']:+.4f} ± {r['objective_minus_msdda_se']:.4f}",
        )
    return table


@app.command()
def demo(
    out: Path = checked(
        None,
        check=output_folder(empty=True),
        help="Output folder (new or empty) (default: msdda-out/demo-<timestamp>).",
    ),
    seed: int = checked(0, check=seed_value, help="Noise seed, shared by every weight."),
    samples_per_prompt: int = checked(100, check=integer(1), help="Images per digit and weight."),
    num_weights: int = checked(
        11, check=integer(2), help="Weights from legibility-only to boldness-only."
    ),
    expert_kind: str = typer.Option("fixed", help="Experts' variance: fixed or learned."),
    kl_coef: float = checked(
        None,
        check=number(0.0, above=True),
        help="Target beta (default: the experts' common beta).",
    ),
    compare: bool = typer.Option(True, help="Also run the base and the shipped oracles."),
    weights_dir: Path = checked(
        None, check=input_folder(), help="Weights folder (default: the shipped weights)."
    ),
    threads: int = checked(
        1,
        check=integer(1, MAX_THREADS),
        help="torch threads (the models are small: 1 is fastest).",
    ),
    preset: str = typer.Option(
        None,
        help="Experts of a stress setting instead of the shipped ones, and msdda, db, rs and the "
        "oracle compared at w = 0.5 (reward, KL to the base): beta0.25.",
    ),
) -> None:
    """MSDDA on the digits: legibility vs boldness over a sweep of preference weights."""
    from ..digits.bundle import load_digits_bundle
    from ..digits.demo import PRESETS, DemoConfig, weight_grid, write_demo
    from ..digits.sampling import torch_threads

    check_kind(expert_kind)
    if preset is not None and preset not in PRESETS:
        fail(f"--preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if preset is not None and expert_kind != "fixed":
        fail("--preset experts have fixed variances: leave --expert-kind at fixed")
    console = Console(width=max(Console().width, 100))
    with option_errors("--out"):  # before anything is loaded: the output can be written
        if out is None:
            out = Path("msdda-out") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
            check_output_path(out, directory=True)  # msdda-out/ is made if missing
        else:
            check_output_folder(out, empty=True)
    with user_errors(), torch_threads(threads):
        cfg = DemoConfig(
            num_weights=num_weights,
            samples_per_prompt=samples_per_prompt,
            seed=seed,
            expert_kind=expert_kind,
            kl_coef=kl_coef,
            compare=compare,
            methods=preset is not None,
        )
        bundle = load_digits_bundle(weights_dir)
        if preset is not None:
            from ..digits.demo import load_preset

            bundle = load_preset(bundle, preset)
        oracles = [o for o in bundle.oracles if o.kind == expert_kind]
        runs = len(weight_grid(num_weights)) + (1 + len(oracles) if compare else 0)
        steps = len(bundle.schedule.timesteps)
        with progress_bar(console) as bar:
            task = bar.add_task("sampling", total=runs * steps)

            def progress(label: str, step: int, total: int) -> None:
                bar.update(task, advance=1, description=label)

            with writes_to(out):
                out.parent.mkdir(exist_ok=True)
                rows = write_demo(bundle, cfg, out, progress)
            bar.update(task, completed=runs * steps, description="done")
    console.print(_results_table(rows, cfg))
    if preset is not None:
        console.print(_methods_table(out, preset))
    console.print(f"wrote {out}/ (pareto.png, samples-w*.png, results.json)")
