"""Rewarded soups: one network whose parameters are a weighted sum of others'."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..validation import check_number, check_sequence

__all__ = ["parameter_soup"]


def _check_same_architecture(modules: Sequence[nn.Module]) -> list[dict[str, torch.Tensor]]:
    states = [m.state_dict() for m in modules]
    first_type, first_keys = type(modules[0]), list(states[0])
    for i, (m, sd) in enumerate(zip(modules, states, strict=True)):
        if type(m) is not first_type:
            raise ValueError(
                f"modules[{i}] is a {type(m).__name__}, modules[0] a {first_type.__name__}: "
                "a parameter soup needs one architecture"
            )
        if list(sd) != first_keys:
            missing = sorted(set(first_keys) - set(sd))[:3]
            extra = sorted(set(sd) - set(first_keys))[:3]
            raise ValueError(
                f"modules[{i}] has other parameters than modules[0] (missing {missing}, "
                f"extra {extra}): a parameter soup needs one architecture"
            )
        for key in first_keys:
            a, b = states[0][key], sd[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ValueError(
                    f"modules[{i}].{key} is {b.dtype} {tuple(b.shape)}, modules[0]'s is "
                    f"{a.dtype} {tuple(a.shape)}: a parameter soup needs one architecture"
                )
            if not a.is_floating_point() and not torch.equal(a, b):
                raise ValueError(f"modules[{i}].{key} (not a float tensor) differs from modules[0]")
    return states


def parameter_soup(modules: Sequence[nn.Module], weights: Sequence[float]) -> nn.Module:
    """A copy of ``modules[0]`` with every float parameter and buffer set to sum_i w_i theta_i.

    Args:
        modules: networks of one architecture (same class, same state-dict keys, shapes
            and dtypes; integer buffers must agree).
        weights: one finite coefficient per module (rewarded soups use weights on the
            simplex; any real coefficients are accepted).

    Returns:
        A new module in eval mode; the inputs are not modified. The sum is taken in
        float64 and cast back to each tensor's dtype.
    """
    if isinstance(modules, nn.Module) or not isinstance(modules, Sequence) or not modules:
        raise TypeError("modules must be a non-empty sequence of torch.nn.Module")
    for i, m in enumerate(modules):
        if not isinstance(m, nn.Module):
            raise TypeError(f"modules[{i}] must be a torch.nn.Module, got {type(m).__name__}")
    items = check_sequence(weights, "weights")
    if len(items) != len(modules):
        raise ValueError(f"weights has {len(items)} entries for {len(modules)} modules")
    w = [check_number(x, f"weights[{i}]") for i, x in enumerate(items)]  # finite numbers
    states = _check_same_architecture(modules)
    soup_state = {}
    for key, first in states[0].items():
        if not first.is_floating_point():
            soup_state[key] = first.clone()
            continue
        total = sum(wi * sd[key].to(torch.float64) for wi, sd in zip(w, states, strict=True))
        soup_state[key] = total.to(first.dtype)
    soup = copy.deepcopy(modules[0])
    soup.load_state_dict(soup_state)
    return soup.eval()
