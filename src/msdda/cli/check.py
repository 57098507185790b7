"""``msdda check``: the exactness testbed, with bounds."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ..testbed import run_check
from . import app
from .common import checked, integer, number, seed_value

BOUND = 1e-9


@app.command()
def check(
    samples: int = checked(256, check=integer(1), help="Samples per chain."),
    steps: int = checked(50, check=integer(2), help="Reverse steps per chain."),
    seed: int = checked(0, check=seed_value, help="Seed of the mixture, rewards and noise."),
    bound: float = checked(BOUND, check=number(0.0), help="Largest error allowed (float64)."),
) -> None:
    """Prove the closed form on the analytic testbed: fused step vs direct optimum."""
    console = Console(width=max(Console().width, 110))
    results = run_check(num_samples=samples, num_inference_steps=steps, seed=seed)
    table = Table(
        title=f"MSDDA exactness testbed (float64, {steps}-step DDPM chains, {samples} samples)"
    )
    for col in (
        "case",
        "lambda_0",
        "step mean rel err",
        "step var rel err",
        "chain max |diff|",
        "ok",
    ):
        table.add_column(col, justify="right" if col != "case" else "left")
    failed = False
    for r in results:
        ok = r.step_rel_err <= bound and r.chain_max_abs_diff <= bound
        failed |= not ok
        table.add_row(
            r.case.name,
            f"{r.lambda0:+.3f}",
            f"{r.step_mean_rel_err:.2e}",
            f"{r.step_var_rel_err:.2e}",
            f"{r.chain_max_abs_diff:.2e}",
            "yes" if ok else "NO",
        )
    console.print(table)
    worst_step = max(r.step_rel_err for r in results)
    worst_chain = max(r.chain_max_abs_diff for r in results)
    console.print(
        f"largest step relative error {worst_step:.2e}, largest chain difference "
        f"{worst_chain:.2e} (bound {bound:.0e}): {'FAIL' if failed else 'ok'}"
    )
    if failed:
        raise typer.Exit(code=1)
