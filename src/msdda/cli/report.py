"""``msdda report``: Pareto plot, hypervolumes, costs and the image grid of a sweep's results."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import app
from .common import (
    check_output_folder,
    checked,
    input_file,
    numbers,
    option_errors,
    output_folder,
    parse_floats,
    reads_from,
    show_warnings,
    user_errors,
    writes_to,
)

COLUMNS = (
    "method",
    "hypervolume",
    "weighted reward {half}",
    "MSDDA - method",
    "KL to base",
    "drift from base",
    "time / base",
    "NFE / base",
)


def _num(x, spec: str = ".3f", se=None) -> str:
    if x is None:
        return "n/a"
    return format(x, spec) + (f" ± {se:.3f}" if se is not None and se == se else "")


def _table(results: Path, rep) -> Table:
    """The summary table: one row per method."""
    table = Table(title=f"{results} ({', '.join(rep.objectives)})")
    half = "(" + ", ".join(f"{w:.2f}" for w in rep.half) + ")"
    for col in COLUMNS:
        table.add_column(col.format(half=half), justify="left" if col == "method" else "right")
    for s in rep.summaries:
        table.add_row(
            s.method,
            _num(s.hypervolume, ".4f"),
            _num(s.weighted_half, ".3f", s.weighted_half_se),
            _num(s.msdda_gain, "+.3f", s.msdda_gain_se),
            _num(s.kl_half, ".4f"),
            _num(s.drift_half, ".4f"),
            _num(s.time_vs_base, ".2f"),
            _num(s.nfe_vs_base, ".2f"),
        )
    return table


def _write(results: Path, out: Path, ref: list[float] | None, axes: tuple[str, ...] | None):
    """Read RESULTS and write pareto.png, grid.png (when the sweep saved images) and
    report.md to ``out``; the report and the paths written."""
    from ..evaluation import build_report, plot_pareto, read_results, write_markdown
    from ..evaluation.render import plot_image_grid

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with reads_from(results):  # its own errors are ResultsErrors, already one line
            data = read_results(results)
    show_warnings(caught)
    rep = build_report(data, ref, axes)
    with writes_to(out):
        png = plot_pareto(rep, out / "pareto.png")
        grid = plot_image_grid(rep, data.rows, out / "grid.png")
        md = write_markdown(
            rep, out / "report.md", plot_name=png.name, grid_name=grid.name if grid else None
        )
    return rep, [p for p in (png, grid, md) if p is not None]


@app.command()
def report(
    results: Path = typer.Argument(
        ..., callback=input_file(), help="Results file written by `msdda sweep`."
    ),
    out: Path = checked(
        None,
        check=output_folder(),
        help="Output folder (default: RESULTS without suffix + '-report').",
    ),
    reference: str = checked(
        None,
        check=numbers(count=2),
        help="Hypervolume reference point 'x,y' (default: below every point by 10%).",
    ),
    axes: str = typer.Option(
        None,
        help="The two rewards of the plot and the hypervolumes, 'x,y' (default: the objectives).",
        show_default=False,
    ),
) -> None:
    """Write pareto.png and report.md for RESULTS and print the summary table."""
    from ..evaluation import standings

    ref = parse_floats(reference, "--reference", count=2) if reference else None
    if out is None:
        with option_errors("--out"):
            out = check_output_folder(results.with_name(results.stem + "-report"))
    names = tuple(a.strip() for a in axes.split(",")) if axes else None
    with user_errors():  # bad input, unwritable output: one line
        rep, written = _write(results, out, ref, names)
    console = Console(width=max(Console().width, 120))
    console.print(_table(results, rep))
    if rep.reference is not None:
        console.print(
            f"hypervolume reference point: ({rep.reference[0]:.4f}, {rep.reference[1]:.4f})"
        )
    for st in standings(rep):
        if st.flagged:
            console.print(
                f"[yellow]note:[/] {st.method} is "
                f"{st.kl_ratio if st.kl_ratio is not None else st.drift_ratio:.1f}x as far from "
                "the base as MSDDA at equal weights (KL, else drift): reward hacking, not "
                "comparable at equal KL",
                highlight=False,
                soft_wrap=True,
            )
    console.print(
        f"wrote {', '.join(map(str, written[:-1]))} and {written[-1]}",
        highlight=False,
        soft_wrap=True,
    )
