"""``msdda train``: reproduce the shipped digits weights from scratch on a CPU.

``msdda toy train`` is the old spelling, kept as a hidden alias (:mod:`msdda.cli.toy`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from . import app
from .common import (
    MAX_THREADS,
    check_output_folder,
    checked,
    fail,
    integer,
    number,
    option_errors,
    output_folder,
    progress_bar,
    seed_value,
    user_errors,
    writes_to,
)


def _check_out(out: Path | None) -> Path:
    """The weights folder to write (default: the shipped one), or :func:`fail`."""
    from ..digits.store import DEFAULT_WEIGHTS_DIR

    with option_errors("--out"):
        return check_output_folder(DEFAULT_WEIGHTS_DIR if out is None else out)


def _stage_progress(bar: Progress):
    """``progress(stage, step, total, loss)`` for :func:`msdda.digits.train_all`: a bar per stage."""
    tasks: dict[str, int] = {}

    def progress(stage: str, step: int, total: int, loss: float) -> None:
        if stage not in tasks:
            for t in tasks.values():
                bar.update(t, completed=bar.tasks[t].total)
            tasks[stage] = bar.add_task(stage, total=total)
        desc = stage if math.isnan(loss) else f"{stage} loss {loss:.4f}"
        bar.update(tasks[stage], completed=step, description=desc)

    return progress


def _summary(manifest: dict, out: Path, elapsed: float, console: Console) -> None:
    table = Table(title=f"msdda train: {out}")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, sec in manifest["timings_s"].items():
        table.add_row(stage, f"{sec:.1f}")
    console.print(table)
    if manifest["experts"] or manifest["oracles"]:
        console.print(gains_table(manifest))
    clf = manifest["classifier"]["metrics"]["heldout_accuracy"]
    acc = manifest["base"]["metrics"]["samples"]["prompt_accuracy"]
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    console.print(
        f"classifier held-out accuracy {clf:.3f}; base samples classified as their prompt "
        f"{acc:.3f}; {len(manifest['experts'])} experts, {len(manifest['oracles'])} oracles; "
        f"{size:.1f} MB; total {elapsed / 60:.1f} min"
    )


def train(
    out: Path = checked(
        None,
        check=output_folder(),
        help="Weights folder to write (default: the shipped msdda/digits/weights).",
    ),
    align: bool = typer.Option(
        True, help="Also train the experts and oracles (msdda.digits.align)."
    ),
    threads: int = checked(
        1,
        check=integer(1, MAX_THREADS),
        help="torch threads (results depend on it; the shipped weights used 1).",
    ),
    seeds: list[int] = checked(
        [0, 1],
        "--seed",
        check=seed_value,
        help="Training seeds of the experts and oracles (repeat; first: default).",
    ),
    beta: float = checked(
        1.0,
        check=number(0.0, above=True),
        help="KL coefficient of the experts and oracles (standardised rewards; smaller: further "
        "from the base).",
    ),
    adapter: str = typer.Option(
        "lora", help="How experts and oracles are fine-tuned: lora (small files) or full."
    ),
) -> None:
    """Train the digits classifier, base, reward normalisation, experts and oracles (seeded)."""
    from ..digits.pipeline import DigitsTrainConfig, train_all
    from ..digits.sampling import torch_threads

    if adapter not in ("lora", "full"):
        fail(f"--adapter must be 'lora' or 'full', got {adapter!r}")
    if align:
        try:
            from ..digits import align as _align  # noqa: F401  (needs peft)
        except ImportError as err:
            fail(
                f"training the experts needs peft ({err}); install it with "
                "pip install 'msdda[sd]', or pass --no-align"
            )
    out = _check_out(out)  # before anything is trained
    console = Console()
    start = time.perf_counter()
    with user_errors(), torch_threads(threads), progress_bar(console) as bar:
        align_config = None
        if align and (beta != 1.0 or adapter != "lora"):
            from ..digits.align import AlignConfig

            lr = 3e-4 if adapter == "full" else AlignConfig.lr  # every weight: a smaller step
            align_config = AlignConfig(kl_coef=beta, adapter=adapter, lr=lr)
        cfg = DigitsTrainConfig(align=align, align_seeds=tuple(seeds), align_config=align_config)
        with writes_to(out):
            manifest = train_all(out, cfg, _stage_progress(bar))
    _summary(manifest, out, time.perf_counter() - start, console)


app.command("train")(train)


def gains_table(manifest: dict) -> Table:
    """Held-out standardised reward gains over the base of every expert and oracle."""
    names = list(manifest["reward_normalisation"])
    table = Table(title="held-out gain over base (standardised rewards, same noise)")
    for col in ("model", "kind", "seed", *names, "accuracy"):
        table.add_column(col, justify="left" if col == "model" else "right")
    rows = [(e["reward"], e) for e in manifest["experts"]]
    rows += [
        (",".join(f"{n}={w:g}" for n, w in e["weights"].items()), e) for e in manifest["oracles"]
    ]
    for label, e in rows:
        gains = e.get("metrics", {}).get("reward_gains", {})
        cells = [f"{gains[n]:+.3f}" if n in gains else "-" for n in (*names, "accuracy")]
        table.add_row(label, e["kind"], str(e.get("seed", 0)), *cells)
    return table
