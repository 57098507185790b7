"""``msdda rescore``: a judge column added to a finished sweep from its PNGs, no sampling."""

from __future__ import annotations

import warnings
from pathlib import Path

import typer
from rich.console import Console

from . import app
from .common import (
    checked,
    fail,
    input_file,
    integer,
    progress_bar,
    reads_from,
    show_warnings,
    user_errors,
    writes_to,
)

JUDGE_HELP = "Reward model scoring the images: aesthetic, pickscore, clipscore, imagereward, hpsv2."
WEIGHTS_HELP = "The judge's weights: a local file or folder, or a hub id of the local cache."
COLUMN_HELP = "Name of the new column (default: the judge's name)."


def _missing_images(results) -> tuple[list[str], int]:
    """Rows without image files, and files that are not there: (first few, how many)."""
    missing, count = [], 0
    for row in results.rows:
        files = row.image_files
        if files is None:
            count += 1
            if len(missing) < 3:
                missing.append(f"the row {row.key} lists no image files")
            continue
        for f in files:
            if not (results.path.parent / f).is_file():
                count += 1
                if len(missing) < 3:
                    missing.append(str(results.path.parent / f))
    return missing, count


def _check_column(header: dict, column: str) -> None:
    """A column may be added, or replace one an earlier rescore added; never a sweep's own."""
    rescored = header.get("rescored") or {}
    if column in (header.get("rewards") or []) and column not in rescored:
        fail(
            f"{column!r} is already a column the sweep scored; give the new one another name "
            "with --column"
        )


def _score_rows(results, column: str, judge, batch: int) -> list:
    """Every row with ``column`` scored by ``judge`` on its PNGs."""
    import torch

    from ..evaluation.results import with_reward
    from ..sd.sweep import read_picture

    device = getattr(judge, "device", None)
    rows = []
    with progress_bar(Console(stderr=True)) as bar:
        task = bar.add_task(f"rescore {column}", total=len(results.rows))
        for row in results.rows:
            scores = []
            files = [results.path.parent / f for f in row.image_files]
            for i in range(0, len(files), batch):
                images = torch.stack([read_picture(f) for f in files[i : i + batch]])
                if device is not None:
                    images = images.to(device)
                with torch.no_grad():
                    scores += judge(images, [row.prompt] * len(images)).double().cpu().tolist()
            rows.append(with_reward(row, column, scores))
            bar.advance(task)
    return rows


def _header(header: dict, column: str, judge: str, weights: str | None) -> dict:
    out = dict(header)
    out["rewards"] = [*(r for r in header.get("rewards") or [] if r != column), column]
    out["judges"] = [*(j for j in header.get("judges") or [] if j != column), column]
    out["rescored"] = {**(header.get("rescored") or {}), column: {"model": judge, "path": weights}}
    return out


def _load_judge(judge: str, weights: str | None):
    import torch

    from ..sd.rewards import REWARDS, load_reward

    if judge not in REWARDS:
        fail(f"--judge must be one of {', '.join(REWARDS)}, got {judge!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_reward(judge, weights, device=device)


@app.command()
def rescore(
    results: Path = typer.Argument(
        ..., callback=input_file(), help="Results file of a sweep that saved images (sd)."
    ),
    judge: str = typer.Option(..., help=JUDGE_HELP),
    judge_weights: str = typer.Option(None, help=WEIGHTS_HELP, show_default=False),
    column: str = typer.Option(None, help=COLUMN_HELP, show_default=False),
    batch: int = checked(16, check=integer(1, 4096), help="Images scored per judge call."),
) -> None:
    """Add a judge's column to every row of RESULTS from its saved PNGs (nothing is sampled).

    The file is rewritten whole or not at all; an earlier rescore's column of that name is
    replaced. Rows without images, or images that are missing, are refused before the
    judge loads.
    """
    from ..evaluation import read_results
    from ..evaluation.results import rewrite_results

    column = column or judge
    with user_errors():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with reads_from(results):
                size = results.stat().st_size  # before reading: rows appended later are seen
                data = read_results(results)
        show_warnings(caught)
        if not data.rows:
            fail(f"{results}: the results file has no result rows")
        missing, count = _missing_images(data)
        if count:
            fail(
                f"{results}: {count} image(s) missing, nothing rescored (first: "
                f"{'; '.join(missing)}); rescore needs the PNGs a Stable Diffusion sweep saves "
                "beside its results"
            )
        _check_column(data.header, column)
        scorer = _load_judge(judge, judge_weights)
        rows = _score_rows(data, column, scorer, batch)
        given = judge_weights
        if given is not None and Path(given).expanduser().exists():  # else a hub id
            given = str(Path(given).expanduser().resolve())
        header = _header(data.header, column, judge, given)
        with writes_to(results):
            rewrite_results(results, header, rows, expected_size=size)
    Console().print(
        f"{results}: column {column!r} ({judge}) added to {len(rows)} row(s)",
        highlight=False,
        soft_wrap=True,
    )
