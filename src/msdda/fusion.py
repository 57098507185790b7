"""Closed-form fusion of Gaussian reverse steps: the MSDDA optimum.

For preference weights w_1..w_K, experts' KL coefficients beta_1..beta_K and a
target coefficient beta, the step-level optimum of sum_i w_i r_i is

    p_w ∝ prod_{i=0..K} p_i^(lambda_i),  lambda_i = w_i beta_i / beta,  lambda_0 = 1 - sum lambda_i

with p_0 the reference step. For Gaussians N(mu_i, var_i) this is Gaussian with

    precision P = sum_i lambda_i / var_i,   variance = 1 / P,   mean = (sum_i lambda_i mu_i / var_i) / P

element-wise. See docs/design.md.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .gaussian import Gaussian
from .validation import check_int, check_positive, show_value

__all__ = [
    "simplex_form",
    "Gaussian",
    "LAMBDA0_TOLERANCE",
    "FusionCoefficients",
    "fusion_coefficients",
    "fuse_gaussians",
    "fuse_with_coefficients",
]

#: |lambda_0| at or below this counts as 0: the reference is then neither needed nor used.
LAMBDA0_TOLERANCE = 1e-6


class FusionCoefficients(NamedTuple):
    """Exponents of the weighted product of experts.

    ``lambdas[i] = w_i * beta_i / beta`` for each expert and ``lambda0 = 1 - sum(lambdas)``
    for the reference (0 when within :data:`LAMBDA0_TOLERANCE`).
    """

    lambdas: tuple[float, ...]
    lambda0: float


def _as_float_list(values, name: str) -> list[float]:
    if isinstance(values, Tensor):
        if values.ndim != 1:
            raise ValueError(
                f"{name} must be a 1-D sequence, got a tensor of shape {tuple(values.shape)}"
            )
        if values.dtype == torch.bool or values.is_complex():
            raise TypeError(f"{name} must hold real numbers, got a {values.dtype} tensor")
        return [float(v) for v in values.detach().cpu().double()]
    if hasattr(values, "tolist") and not isinstance(values, (str, bytes)):  # numpy arrays
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    out = []
    for i, v in enumerate(values):
        is_scalar_tensor = (
            isinstance(v, Tensor)
            and v.numel() == 1
            and v.dtype != torch.bool
            and not v.is_complex()
        )
        if isinstance(v, bool) or not (isinstance(v, numbers.Real) or is_scalar_tensor):
            raise TypeError(
                f"{name} must hold numbers: {name}[{i}] is {show_value(v)} ({type(v).__name__})"
            )
        try:
            out.append(float(v))
        except OverflowError:  # an int beyond the float range
            raise ValueError(
                f"{name}[{i}] = {show_value(v)} is too large: it must be a finite number"
            ) from None
    return out


def fusion_coefficients(
    weights,
    kl_coefs=None,
    kl_coef: float | None = None,
    *,
    num_experts: int | None = None,
) -> FusionCoefficients:
    """Exponents lambda_i = w_i beta_i / beta and lambda_0 = 1 - sum_i lambda_i.

    Args:
        weights: K non-negative, finite preference weights.
        kl_coefs: the experts' KL coefficients beta_i (K positive numbers); default all
            equal to ``kl_coef`` (or 1 when both are omitted).
        kl_coef: the target coefficient beta; default the experts' common coefficient.
        num_experts: K, to check the counts against.
    """
    w, betas, beta = _check_coefficient_arguments(weights, kl_coefs, kl_coef, num_experts)
    lambdas = _expert_exponents(w, betas, beta)
    total = _exponent_sum(lambdas)
    _check_exponents(lambdas, total)
    return FusionCoefficients(lambdas, _reference_exponent(total))


def _expert_exponents(
    weights: Sequence[float], kl_coefs: Sequence[float], kl_coef: float
) -> tuple[float, ...]:
    """lambda_i = w_i beta_i / beta, one per expert."""
    return tuple(wi * bi / kl_coef for wi, bi in zip(weights, kl_coefs, strict=True))


def _reference_exponent(lambda_sum: float) -> float:
    """lambda_0 = 1 - sum_i lambda_i, 0 when within :data:`LAMBDA0_TOLERANCE`."""
    lambda0 = 1.0 - lambda_sum
    return 0.0 if abs(lambda0) <= LAMBDA0_TOLERANCE else lambda0


def _exponent_sum(lambdas: Sequence[float]) -> float:
    try:
        return math.fsum(lambdas)
    except OverflowError:  # finite exponents whose sum is not
        return math.inf


def _check_exponents(lambdas: Sequence[float], total: float) -> None:
    if not (math.isfinite(total) and all(math.isfinite(lam) for lam in lambdas)):
        raise ValueError(
            f"weights, kl_coefs and kl_coef give non-finite exponents lambda = {list(lambdas)}: "
            "the weights are too large or kl_coef too small"
        )


def _check_coefficient_arguments(
    weights, kl_coefs, kl_coef, num_experts
) -> tuple[list[float], list[float], float]:
    """The weights, the experts' betas and the target beta of :func:`fusion_coefficients`."""
    w = _check_weights(weights, num_experts)
    kl_coef = _check_kl_coef(kl_coef)
    if kl_coefs is None:
        betas = [kl_coef if kl_coef is not None else 1.0] * len(w)
    else:
        betas = _check_kl_coefs(kl_coefs, len(w))
    if kl_coef is None:
        if max(betas) - min(betas) > 1e-12 * max(betas):
            raise ValueError(
                "kl_coef (the target beta) is required when the experts' kl_coefs differ: "
                f"got kl_coefs = {betas}"
            )
        kl_coef = betas[0]
    return w, betas, kl_coef


def _check_weights(weights, num_experts: int | None) -> list[float]:
    w = _as_float_list(weights, "weights")
    k = len(w) if num_experts is None else check_int(num_experts, "num_experts", low=0)
    if k == 0:
        raise ValueError("fusion needs at least one expert (weights is empty, K = 0)")
    if len(w) != k:
        raise ValueError(f"weights has {len(w)} entries, expected one per expert (K = {k})")
    for i, wi in enumerate(w):
        if not math.isfinite(wi) or wi < 0:
            raise ValueError(f"weights[{i}] = {wi} must be a non-negative finite number")
    return w


def _check_kl_coef(kl_coef) -> float | None:
    if kl_coef is None:
        return None
    try:
        return check_positive(kl_coef, "kl_coef")  # a bool or a string is a TypeError
    except ValueError:
        try:
            shown = float(kl_coef)
        except OverflowError:  # check_positive refused it as too large
            shown = show_value(kl_coef)
        raise ValueError(f"kl_coef = {shown} must be a positive finite number") from None


def _check_kl_coefs(kl_coefs, k: int) -> list[float]:
    betas = _as_float_list(kl_coefs, "kl_coefs")
    if len(betas) != k:
        raise ValueError(f"kl_coefs has {len(betas)} entries, expected one per expert (K = {k})")
    for i, b in enumerate(betas):
        if not math.isfinite(b) or b <= 0:
            raise ValueError(f"kl_coefs[{i}] = {b} must be a positive finite number")
    return betas


def _stack(tensors, name: str, k: int | None = None) -> list[Tensor]:
    if isinstance(tensors, Tensor):
        if tensors.ndim == 0:
            raise ValueError(f"{name} as one tensor needs a leading K axis, got a scalar")
        items = list(tensors.unbind(0))
    elif isinstance(tensors, Sequence) and not isinstance(tensors, (str, bytes)):
        items = list(tensors)
    else:
        raise TypeError(f"{name} must be a sequence of tensors or one tensor with a leading K axis")
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name}[{i}] must be a floating-point tensor, got {t.dtype}")
    if k is not None and len(items) != k:
        raise ValueError(f"{name} has {len(items)} entries, expected K = {k}")
    return items


def _compute_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_finite(t: Tensor, name: str, *, positive: bool) -> None:
    if positive:
        bad = ~(torch.isfinite(t) & (t > 0))
        if bool(bad.any()):
            raise ValueError(
                f"{name} must be positive and finite everywhere (a deterministic step, e.g. DDIM "
                f"with eta = 0, has no variance to fuse); found {int(bad.sum())} bad element(s), "
                f"min = {t.min().item():.3g}"
            )
    elif not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite everywhere")


def fuse_gaussians(
    means,
    variances,
    weights,
    *,
    kl_coefs=None,
    kl_coef: float | None = None,
    reference: tuple[Tensor, Tensor] | None = None,
) -> Gaussian:
    """Fuse K experts' Gaussian steps into the weighted step-level RL optimum.

    Args:
        means: K tensors (or one tensor with a leading K axis), the experts' step means.
        variances: K tensors of per-element variances, positive and finite; means and
            variances broadcast to one shape.
        weights: K non-negative preference weights w_i.
        kl_coefs: each expert's KL coefficient beta_i (default: all ``kl_coef``).
        kl_coef: the target coefficient beta (default: the experts' common coefficient).
            lambda_i = w_i beta_i / beta and lambda_0 = 1 - sum_i lambda_i.
        reference: ``(mean, variance)`` of the reference step, required when
            |lambda_0| > :data:`LAMBDA0_TOLERANCE`, ignored otherwise.

    Returns:
        ``Gaussian(mean, variance)`` in the broadcast shape; computed in float64 if any
        input is float64, else float32, and returned in the means' dtype.

    Raises:
        ValueError: naming the argument, for counts, signs, non-finite values, shapes that
            do not broadcast, a missing reference, or a fused precision that is not positive.
    """
    mu = _stack(means, "means")
    var = _stack(variances, "variances", k=len(mu))
    if len(mu) == 0:
        raise ValueError("fusion needs at least one expert (means is empty, K = 0)")
    coefs = fusion_coefficients(weights, kl_coefs, kl_coef, num_experts=len(mu))
    return fuse_with_coefficients(mu, var, coefs, reference=reference)


def fuse_with_coefficients(
    means: Sequence[Tensor],
    variances: Sequence[Tensor],
    coefficients: FusionCoefficients,
    *,
    reference: tuple[Tensor, Tensor] | None = None,
) -> Gaussian:
    """:func:`fuse_gaussians` from precomputed exponents (experts with lambda 0 are skipped)."""
    terms = _check_fusion_terms(means, variances, coefficients, reference)
    shape = _broadcast_shape(terms)
    dtype = _compute_dtype([t for term in terms for t in (term.mean, term.variance)])
    out_dtype = terms[0].mean.dtype
    terms = [_Term(lam, m.to(dtype), v.to(dtype), who) for lam, m, v, who in terms]
    for term in terms:
        _check_finite(term.mean, f"means ({term.who})", positive=False)
        _check_finite(term.variance, f"variances ({term.who})", positive=True)
    precision, weighted_mean = _precision_and_weighted_mean(terms)
    precision = precision.expand(shape)
    _check_precision(precision, coefficients.lambda0)
    variance = 1.0 / precision
    mean = (weighted_mean * variance).expand(shape)
    return Gaussian(mean.to(out_dtype), variance.to(out_dtype))


class _Term(NamedTuple):
    """One factor p_i^(lambda_i) of the product: its exponent, step and who it is."""

    lam: float
    mean: Tensor
    variance: Tensor
    who: str  # "expert i" or "reference", for error messages


def _precision_and_weighted_mean(terms: Sequence[_Term]) -> tuple[Tensor, Tensor]:
    """P = sum_i lambda_i / var_i and sum_i lambda_i mu_i / var_i, in the terms' order."""
    precision = None
    weighted_mean = None
    for lam, m, v, _ in terms:
        p = lam / v
        precision = p if precision is None else precision + p
        weighted_mean = p * m if weighted_mean is None else weighted_mean + p * m
    return precision, weighted_mean


def _check_fusion_terms(means, variances, coefficients, reference) -> list[_Term]:
    """The factors with a nonzero exponent (the reference last), every argument checked."""
    if not isinstance(coefficients, FusionCoefficients):
        raise TypeError(
            "coefficients must be a FusionCoefficients (from fusion_coefficients), "
            f"got {type(coefficients).__name__}"
        )
    mu = _stack(means, "means")
    var = _stack(variances, "variances", k=len(mu))
    if len(coefficients.lambdas) != len(mu):
        raise ValueError(
            f"coefficients has {len(coefficients.lambdas)} lambdas for {len(mu)} experts"
        )
    terms = [
        _Term(lam, m, v, f"expert {i}")
        for i, (lam, m, v) in enumerate(zip(coefficients.lambdas, mu, var, strict=True))
        if lam != 0.0
    ]
    if coefficients.lambda0 != 0.0:
        terms.append(_reference_term(reference, coefficients.lambda0))
    if not terms:
        raise ValueError("weights are all 0: no expert contributes and there is no reference")
    return terms


def _reference_term(reference, lambda0: float) -> _Term:
    if reference is None:
        total = 1.0 - lambda0
        raise ValueError(
            f"reference is required: the lambdas sum to {total:.6g}, not 1 "
            f"(lambda_0 = {lambda0:.6g}); pass reference=(mean, variance) of the "
            "reference step, or weights on the simplex with equal kl_coefs"
        )
    if not (isinstance(reference, Sequence) and len(reference) == 2):
        raise TypeError("reference must be a (mean, variance) pair of tensors")
    ref_mean, ref_var = _stack(list(reference), "reference")
    return _Term(lambda0, ref_mean, ref_var, "reference")


def _broadcast_shape(terms: Sequence[_Term]) -> torch.Size:
    """The shape every term broadcasts to: the experts' first, then with the reference."""
    experts = [t for term in terms if term.who != "reference" for t in (term.mean, term.variance)]
    try:
        shape = torch.broadcast_shapes(*(t.shape for t in experts))
    except RuntimeError as err:
        shapes = [tuple(t.shape) for t in experts]
        raise ValueError(f"means and variances must broadcast to one shape, got {shapes}") from err
    ref = terms[-1]
    if ref.who == "reference":
        try:
            shape = torch.broadcast_shapes(shape, ref.mean.shape, ref.variance.shape)
        except RuntimeError as err:
            raise ValueError(
                f"reference (mean {tuple(ref.mean.shape)}, variance {tuple(ref.variance.shape)}) "
                f"does not broadcast with the experts' steps {tuple(shape)}"
            ) from err
    return shape


def _check_precision(precision: Tensor, lambda0: float) -> None:
    if not bool((precision > 0).all() and torch.isfinite(precision).all()):
        raise ValueError(
            "fused precision is not positive everywhere: the extrapolation is too strong for "
            f"these variances (lambda_0 = {lambda0:.4g}); lower the alignment strength "
            "(raise kl_coef) or use experts with compatible variances"
        )


def simplex_form(weights: Sequence[float], kl_coef: float) -> tuple[tuple[float, ...], float]:
    """(w / sum(w), beta / sum(w)): weights on the simplex and the target beta that give the
    same exponents lambda_i = w_i beta_i / beta as ``weights`` (not all 0) and ``kl_coef``
    (the form the methods registry takes); ``weights`` unchanged when already on the
    simplex."""
    total = math.fsum(weights)
    if abs(total - 1.0) <= 1e-6:
        return tuple(float(w) for w in weights), kl_coef
    return tuple(float(w) / total for w in weights), kl_coef / total
