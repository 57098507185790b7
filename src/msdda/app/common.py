"""What both apps (digits and Stable Diffusion) share: the exponents shown, refusals."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["refusal", "describe_lambdas", "MAX_UI_SEED"]

#: Seeds the browser can hold exactly (JavaScript numbers are exact below 2**53).
MAX_UI_SEED = 2**53 - 1


def refusal(weights: Sequence[float]) -> str:
    """The message for weights the app refuses before sampling ("" when they are fine)."""
    if not any(w > 0 for w in weights):
        return (
            "Refused: every weight is 0, so no expert contributes. Raise at least one slider "
            "(the base model alone is the baseline 'base')."
        )
    return ""


def describe_lambdas(lambdas: Mapping[str, float]) -> str:
    """The exponents as one Markdown line, and whether the reference joins the product."""
    if not lambdas:
        return ""
    parts = [f"λ_{n} = {v:.3g}" for n, v in lambdas.items() if n != "lambda_0"]
    lam0 = lambdas.get("lambda_0", 0.0)
    joins = (
        "the reference (base) model is not evaluated"
        if lam0 == 0.0
        else "the reference (base) model joins the product"
        + (" (extrapolation: stronger than the experts)" if lam0 < 0 else "")
    )
    return f"Fusion exponents: {', '.join(parts)}; **λ_0 = {lam0:.3g}**: {joins}."
