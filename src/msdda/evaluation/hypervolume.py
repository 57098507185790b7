"""Pareto fronts and their 2-D hypervolume (both objectives maximised)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["pareto_front", "hypervolume_2d", "default_reference_point"]

Point = tuple[float, float]


def _points(points: Sequence[Sequence[float]]) -> list[Point]:
    out = []
    for i, p in enumerate(points):
        if len(p) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in p):
            raise ValueError(f"points[{i}] = {p!r} must be two finite numbers")
        out.append((float(p[0]), float(p[1])))
    return out


def pareto_front(points: Sequence[Sequence[float]]) -> list[Point]:
    """The non-dominated points (maximising both coordinates), sorted by the first, descending."""
    front: list[Point] = []
    best_y = -math.inf
    for x, y in sorted(set(_points(points)), key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front


def hypervolume_2d(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Area dominated by ``points`` and dominating ``reference`` (maximising both coordinates).

    The union of the rectangles [r_x, x] x [r_y, y]; points not better than the
    reference in both coordinates add nothing.
    """
    ((rx, ry),) = _points([reference])
    area, best_y = 0.0, ry
    for x, y in pareto_front(points):
        if x <= rx:
            break
        if y > best_y:
            area += (x - rx) * (y - best_y)
            best_y = y
    return area


def default_reference_point(points: Sequence[Sequence[float]], margin: float = 0.1) -> Point:
    """The componentwise minimum of ``points``, less ``margin`` times the range (1 if flat)."""
    pts = _points(points)
    if not pts:
        raise ValueError("no points to place a reference point under")
    ref = []
    for c in range(2):
        lo, hi = min(p[c] for p in pts), max(p[c] for p in pts)
        ref.append(lo - margin * ((hi - lo) or 1.0))
    return (ref[0], ref[1])
