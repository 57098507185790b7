"""Shared test settings.

Hypothesis: no per-example deadline (the first call into torch is slow and timing
on shared CI machines is noisy); a modest number of examples keeps the suite fast.
``pytest --hypothesis-profile=thorough`` runs many more examples.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile(
    "msdda",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", parent=settings.get_profile("msdda"), max_examples=1000)
settings.load_profile("msdda")
