"""``msdda check``: the exactness testbeds (DDPM and flow matching), with bounds."""

from __future__ import annotations

from collections.abc import Sequence

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..flow_testbed import run_flow_check
from ..testbed import CheckResult, run_check
from . import app
from .common import checked, integer, number, seed_value

BOUND = 1e-9
COLUMNS = ("case", "lambda_0", "step mean rel err", "step var rel err", "chain max |diff|", "ok")


def _table(title: str, results: Sequence[CheckResult], bound: float) -> tuple[Table, bool]:
    """The results as a table, and whether every one is within ``bound``."""
    table = Table(title=title)
    for col in COLUMNS:
        table.add_column(col, justify="right" if col != "case" else "left")
    failed = False
    for r in results:
        ok = r.step_rel_err <= bound and r.chain_max_abs_diff <= bound
        failed |= not ok
        table.add_row(
            escape(r.case.name),
            f"{r.lambda0:+.3f}",
            f"{r.step_mean_rel_err:.2e}",
            f"{r.step_var_rel_err:.2e}",
            f"{r.chain_max_abs_diff:.2e}",
            "yes" if ok else "NO",
        )
    return table, failed


@app.command()
def check(
    samples: int = checked(256, check=integer(1), help="Samples per chain."),
    steps: int = checked(50, check=integer(2), help="Reverse steps per chain."),
    seed: int = checked(0, check=seed_value, help="Seed of the mixture, rewards and noise."),
    bound: float = checked(BOUND, check=number(0.0), help="Largest error allowed (float64)."),
) -> None:
    """Prove the closed form on the analytic testbeds: fused step vs direct optimum.

    DDPM experts, then flow-matching experts (Flow-GRPO SDE, CPS and DanceGRPO steps at
    distinct noise levels on diffusers' FlowMatchEulerDiscreteScheduler sigmas).
    """
    console = Console(width=max(Console().width, 120))
    results = run_check(num_samples=samples, num_inference_steps=steps, seed=seed)
    flow = run_flow_check(num_samples=samples, num_inference_steps=steps, seed=seed)
    ddpm_table, ddpm_failed = _table(
        f"MSDDA exactness testbed (float64, {steps}-step DDPM chains, {samples} samples)",
        results,
        bound,
    )
    flow_table, flow_failed = _table(
        f"Flow-matching testbed (float64, {steps}-step flow chains, shift 3, {samples} samples)",
        flow,
        bound,
    )
    console.print(ddpm_table)
    console.print(flow_table)
    failed = ddpm_failed or flow_failed
    every = [*results, *flow]
    worst_step = max(r.step_rel_err for r in every)
    worst_chain = max(r.chain_max_abs_diff for r in every)
    console.print(
        f"largest step relative error {worst_step:.2e}, largest chain difference "
        f"{worst_chain:.2e} (bound {bound:.0e}): {'FAIL' if failed else 'ok'}"
    )
    if failed:
        raise typer.Exit(code=1)
