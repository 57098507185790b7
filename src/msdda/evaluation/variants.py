"""The sweep's method names: a sampling method, or a tuned method's variant per tuning rule.

``rgg`` / ``code`` are the variants tuned by the ``reward`` rule, ``rgg-matched`` /
``code-matched`` by ``matched``, ``rgg-regularised`` ... (see :mod:`.tuning`).
"""

from __future__ import annotations

from ..methods import METHODS, MethodInfo

__all__ = [
    "TUNED",
    "TUNING_RULES",
    "check_rule",
    "known_rule",
    "method_info",
    "method_of",
    "rule_of",
    "variant_name",
]

#: rule -> what it picks (see :mod:`msdda.evaluation.tuning`)
TUNING_RULES: dict[str, str] = {
    "reward": "the highest mean weighted reward on the tuning seeds",
    "matched": "the mean KL to the base closest to the match method's (MSDDA's)",
    "regularised": "the highest mean weighted reward - beta * KL to the base",
}

#: method -> the MethodSettings fields tuning picks for it
TUNED: dict[str, tuple[str, ...]] = {
    "rgg": ("rgg_scale",),
    "code": ("code_candidates", "code_block"),
}


def check_rule(rule: str) -> str:
    if rule not in TUNING_RULES:
        known = "; ".join(f"{r} ({what})" for r, what in TUNING_RULES.items())
        raise ValueError(f"unknown tuning rule {rule!r}; known: {known}")
    return rule


def variant_name(method: str, rule: str) -> str:
    """The sweep's name for ``method`` tuned by ``rule``: 'rgg' (reward) or 'rgg-matched'."""
    return method if check_rule(rule) == "reward" else f"{method}-{rule}"


def method_of(name: str) -> str:
    """The sampling method behind a sweep method name: 'rgg-matched' -> 'rgg'."""
    if name in METHODS:
        return name
    method, _, rule = name.rpartition("-")
    if method in TUNED and rule in TUNING_RULES and rule != "reward":
        return method
    if method in TUNED:
        check_rule(rule)
    variants = [variant_name(m, r) for m in TUNED for r in TUNING_RULES if r != "reward"]
    raise ValueError(f"unknown method {name!r}; known: {', '.join([*METHODS, *variants])}")


def rule_of(name: str) -> str | None:
    """The tuning rule of a sweep method name ('rgg' -> 'reward'), None for untuned methods."""
    method = method_of(name)
    if method not in TUNED:
        return None
    return "reward" if name == method else name.rpartition("-")[2]


def method_info(name: str) -> MethodInfo | None:
    """The sampling method behind a results' method name ('rgg-matched': rgg), None if unknown."""
    try:
        return METHODS[method_of(name)]
    except ValueError:
        return None


def known_rule(name: str) -> str | None:
    """The tuning rule of a results' method name, None if untuned or unknown."""
    try:
        return rule_of(name)
    except ValueError:
        return None
