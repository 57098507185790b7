"""Pareto fronts and their 2-D hypervolume (both objectives maximised)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..validation import check_number, check_sequence

__all__ = ["pareto_front", "hypervolume_2d", "default_reference_point"]

Point = tuple[float, float]


def _point(p, name: str) -> Point:
    """``p`` as two finite numbers (a bool or a string is not a number)."""
    items = check_sequence(p, name)
    if len(items) != 2:
        raise ValueError(f"{name} = {p!r} must be two finite numbers, got {len(items)}")
    return (check_number(items[0], f"{name}[0]"), check_number(items[1], f"{name}[1]"))


def _points(points: Sequence[Sequence[float]]) -> list[Point]:
    return [_point(p, f"points[{i}]") for i, p in enumerate(check_sequence(points, "points"))]


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
    rx, ry = _point(reference, "reference")
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
    margin = check_number(margin, "margin", low=0.0)
    pts = _points(points)
    if not pts:
        raise ValueError("no points to place a reference point under")
    ref = []
    for c in range(2):
        lo, hi = min(p[c] for p in pts), max(p[c] for p in pts)
        ref.append(lo - margin * ((hi - lo) or 1.0))
    return (ref[0], ref[1])
