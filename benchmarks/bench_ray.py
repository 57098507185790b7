"""Throughput of the digits sweep with the local executor and with Ray at 1 and 2 workers.

Runs the same small digits sweep (no tuning) three times in one run, into fresh files:
here (``LocalExecutor``), then on one local Ray cluster (started once, loopback only)
with 1 and with 2 worker actors of one CPU each. Prints units per minute, images per
minute and the ratio to the local executor, with the machine's core count. The Ray times
include starting the workers (each builds the digits domain once) but not the cluster.

    .venv/bin/python benchmarks/bench_ray.py                  # 2 seeds x 6 weights x 4 methods
    .venv/bin/python benchmarks/bench_ray.py --seeds 4 --images 16
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from msdda.evaluation import SweepConfig, run_sweep, simplex_grid
from msdda.evaluation.executors import LocalExecutor, RayExecutor, loopback_ray_environment


def config(seeds: int, grid: int, images: int) -> SweepConfig:
    return SweepConfig(
        domain="digits",
        methods=("base", "msdda", "db", "rs"),
        weights=simplex_grid(grid),
        oracle_weights=False,
        seeds=tuple(range(seeds)),
        images_per_prompt=images,
        tuning=None,
    )


def timed(cfg: SweepConfig, folder: Path, name: str, executor) -> tuple[float, int, int]:
    start = time.perf_counter()
    summary = run_sweep(cfg, folder / f"{name}.jsonl", executor=executor)
    return time.perf_counter() - start, summary.units_run, summary.rows_written


def main(
    seeds: int = typer.Option(2, min=1, help="Evaluation seeds."),
    grid: int = typer.Option(6, min=2, help="Weights on the 2-objective grid."),
    images: int = typer.Option(8, min=1, help="Images per (prompt, seed) row."),
) -> None:
    import torch

    torch.set_num_threads(1)  # the same per-process threads as each Ray worker
    loopback_ray_environment()
    import ray

    cfg = config(seeds, grid, images)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows.append(("local", *timed(cfg, folder, "local", LocalExecutor())))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            for n in (1, 2):
                rows.append(
                    (f"ray, {n} worker(s)", *timed(cfg, folder, f"ray{n}", RayExecutor(workers=n)))
                )
        finally:
            ray.shutdown()
    table = Table(title=f"digits sweep, {os.cpu_count()} CPU cores, torch threads 1 per process")
    for col in ("executor", "seconds", "units", "units/min", "images/min", "vs local"):
        table.add_column(col, justify="right")
    local = rows[0][2] / rows[0][1]
    for name, seconds, units, written in rows:
        per_min = 60 * units / seconds
        table.add_row(
            name, f"{seconds:.1f}", str(units), f"{per_min:.1f}",
            f"{60 * written * images / seconds:.0f}", f"{units / seconds / local:.2f}x",
        )  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    typer.run(main)
