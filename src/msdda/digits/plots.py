"""Figures of the digits domain (matplotlib, Agg backend): sample grids and Pareto fronts.

Files are written whole or not at all (:func:`msdda.io.atomic_path`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from ..errors import check_output_path, writing
from ..io import atomic_path
from ..validation import check_int, check_number, check_sequence

__all__ = ["image_grid", "save_grid", "save_pareto_plot", "save_npy"]


def image_grid(images: Tensor, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """Tile (N, 1, 8, 8) images in [0, 1] into one (H, W) array, ``ncols`` per row, pad 1."""
    if not isinstance(images, Tensor) or images.ndim < 3 or images.shape[0] < 1:
        raise ValueError("images must be a non-empty (N, 1, H, W) tensor")
    if ncols is not None:
        check_int(ncols, "ncols", low=1, high=10_000)
    check_int(pad, "pad", low=0, high=100)
    arr = images.detach().cpu().float().numpy().reshape(images.shape[0], *images.shape[-2:])
    n, h, w = arr.shape
    ncols = ncols or int(np.ceil(np.sqrt(n)))
    nrows = int(np.ceil(n / ncols))
    grid = np.ones((nrows * (h + pad) + pad, ncols * (w + pad) + pad), dtype=np.float32) * 0.5
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + c * (w + pad) : pad + c * (w + pad) + w,
        ] = arr[i]
    return grid


def save_grid(
    images: Tensor, path: Path, ncols: int | None = None, title: str | None = None, scale: int = 12
) -> None:
    """Save (N, 1, 8, 8) images in [0, 1] as a PNG grid (white ink on black, nearest pixels)."""
    check_int(scale, "scale", low=1, high=100)
    path = check_output_path(path)
    grid = image_grid(images, ncols)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = grid.shape
    fig = plt.figure(figsize=(w * scale / 100, (h * scale + (40 if title else 0)) / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, h * scale / (h * scale + (40 if title else 0))))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10, y=0.995, va="top")
    try:
        with writing(path), atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)


def save_pareto_plot(
    x: Sequence[float],
    y: Sequence[float],
    labels: Sequence[str],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    extra: dict[str, tuple[float, float]] | None = None,
) -> None:
    """Save a Pareto-front plot: points (x_i, y_i) joined in order and labelled."""
    x = [check_number(v, f"x[{i}]") for i, v in enumerate(check_sequence(x, "x"))]
    y = [check_number(v, f"y[{i}]") for i, v in enumerate(check_sequence(y, "y"))]
    if not (len(x) == len(y) == len(labels)):
        raise ValueError(
            f"x, y and labels must have equal lengths, got {len(x)}, {len(y)}, {len(labels)}"
        )
    for name, (xi, yi) in (extra or {}).items():
        check_number(xi, f"extra[{name!r}] x")
        check_number(yi, f"extra[{name!r}] y")
    path = check_output_path(path)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    ax.plot(x, y, "-o", color="tab:blue", label="MSDDA", markersize=5)
    for xi, yi, lab in zip(x, y, labels, strict=True):
        ax.annotate(lab, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
    for name, (xi, yi) in (extra or {}).items():
        ax.plot([xi], [yi], "s", label=name, markersize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        with writing(path), atomic_path(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)


def save_npy(array: np.ndarray, path: Path) -> None:
    """Save ``array`` as .npy atomically."""
    path = check_output_path(path)
    with writing(path), atomic_path(path, suffix=".npy") as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
