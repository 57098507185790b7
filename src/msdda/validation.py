"""Argument checks: the one home of the rules every public entry point applies.

Each check returns the value in its canonical form or raises a ``TypeError`` (wrong
kind of thing) or ``ValueError`` (right kind, wrong value) whose message names the
argument and says what was expected. A bool is never a number; a string is never a
number; NaN and infinity are refused unless asked for. Where msdda once documented a
``ValueError`` for a wrong kind of argument, it raises :class:`ArgumentKindError`, which
is both (see :func:`compat_check`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = [
    "MAX_SEED",
    "ArgumentKindError",
    "compat_check",
    "check_number",
    "check_positive",
    "check_int",
    "check_seed",
    "check_seeds",
    "check_callable",
    "check_sequence",
    "check_simplex_weights",
    "check_instance",
    "check_floating_tensor",
    "show_value",
]

#: Seeds are integers in [0, MAX_SEED]: every generator msdda uses (torch, numpy's
#: SeedSequence) accepts them, and so does every domain.
MAX_SEED = 2**63 - 1


class ArgumentKindError(TypeError, ValueError):
    """A wrong kind of argument (a bool or a string for a number, ...) where msdda once
    raised ``ValueError``: a ``TypeError``, and still a ``ValueError`` for code that
    catches that."""


def compat_check(check, *args, **kwargs):
    """``check(*args, **kwargs)``, its ``TypeError`` re-raised as :class:`ArgumentKindError`
    (same message): for arguments whose wrong kinds were documented as ``ValueError``."""
    try:
        return check(*args, **kwargs)
    except ArgumentKindError:
        raise
    except TypeError as err:
        raise ArgumentKindError(str(err)) from None


def show_value(value: Any) -> str:
    """``repr(value)``, but an integer too long to read as its bit length."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**80:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _is_number(value: Any) -> bool:
    """A real number: a Python/numpy scalar or a 0-d tensor, but not a bool."""
    if isinstance(value, bool) or str(getattr(value, "dtype", "")).endswith("bool"):
        return False
    if isinstance(value, numbers.Real):  # int, float, numpy scalars
        return True
    is_tensor = hasattr(value, "is_floating_point") and getattr(value, "ndim", None) == 0
    return bool(is_tensor and not value.is_complex())


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    finite: bool = True,
) -> float:
    """``value`` as a float, checked for type, finiteness and the range [low, high]."""
    if not _is_number(value):
        raise TypeError(
            f"{name} must be a number, got {show_value(value)} ({type(value).__name__})"
        )
    try:
        v = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(
            f"{name} must be a finite number, got an integer of {int(value).bit_length()} bits"
        ) from None
    if math.isnan(v) or (finite and math.isinf(v)):
        raise ValueError(f"{name} must be a finite number, got {v}")
    if low is not None and (v < low or (v == low and not low_inclusive)):
        op = ">=" if low_inclusive else ">"
        raise ValueError(f"{name} must be {op} {low:g}, got {v:g}")
    if high is not None and (v > high or (v == high and not high_inclusive)):
        op = "<=" if high_inclusive else "<"
        raise ValueError(f"{name} must be {op} {high:g}, got {v:g}")
    return v


def check_positive(value: Any, name: str) -> float:
    """A positive finite number (a KL coefficient, a scale)."""
    return check_number(value, name, low=0.0, low_inclusive=False)


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int (a bool or a float is refused), in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an integer, got {show_value(value)} ({type(value).__name__})"
        )
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {show_value(v)}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {show_value(v)}")
    return v


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed: an integer in [0, :data:`MAX_SEED`]."""
    return check_int(value, name, low=0, high=MAX_SEED)


def check_seeds(values: Any, name: str = "seeds") -> list[int]:
    """A non-empty sequence of seeds."""
    items = check_sequence(values, name)
    if not items:
        raise ValueError(f"{name} must not be empty")
    return [check_seed(s, f"{name}[{i}]") for i, s in enumerate(items)]


def check_callable(value: Any, name: str, what: str = "a callable") -> Any:
    if not callable(value):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def check_sequence(value: Any, name: str) -> list:
    """``value`` as a list: a sequence (or a 1-D array/tensor), never a string or a mapping."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        if getattr(value, "ndim", 1) != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(getattr(value, 'shape', ()))}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence, got {type(value).__name__}")
    return list(value)


def check_simplex_weights(weights: Any, k: int, name: str = "weights") -> tuple[float, ...]:
    """K finite, non-negative preference weights summing to 1, as floats."""
    items = check_sequence(weights, name)
    if len(items) != k:
        raise ValueError(f"{name} must hold one weight per objective (K = {k}), got {len(items)}")
    out = tuple(check_number(w, f"{name}[{i}]", low=0.0) for i, w in enumerate(items))
    if abs(math.fsum(out) - 1.0) > 1e-6:
        raise ValueError(
            f"{name} = {list(out)} must lie on the simplex (sum to 1), sum = {math.fsum(out):.6g}"
        )
    return out


def check_instance(value: Any, cls: type | tuple[type, ...], name: str, what: str) -> Any:
    """``value`` if it is a ``cls``, else a TypeError naming ``name`` and ``what`` it must be."""
    if not isinstance(value, cls):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    return value


def check_floating_tensor(value: Any, name: str) -> Any:
    """A floating-point ``torch.Tensor`` (a state, a mean, a variance)."""
    if not (hasattr(value, "is_floating_point") and hasattr(value, "shape")):
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    return value
