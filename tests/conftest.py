"""Shared test settings and fixtures.

Hypothesis: no per-example deadline (the first call into torch is slow and timing
on shared CI machines is noisy); a modest number of examples keeps the suite fast.
``pytest --hypothesis-profile=thorough`` runs many more examples.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "msdda",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("msdda"), max_examples=1000)
settings.load_profile("msdda")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors (many threads stall on a busy shared CPU).

    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
