"""``msdda app``: a local web app with a slider per objective (the ``app`` extra, Gradio).

- :func:`build_app` returns the ``gradio.Blocks`` (digits by default; Stable Diffusion
  with ``base`` and ``experts``), to launch or to mount in another server;
  :func:`launch` serves it on 127.0.0.1 by default (a warning beyond loopback).
- :mod:`.digits` and :mod:`.sd` hold what the pages compute, with no web framework:
  :class:`DigitsEngine` / :class:`SDEngine` turn a request into images, the fusion
  exponents lambda_i and lambda_0, and a message when a setting is refused.
"""

from .digits import DigitsEngine, DigitsOutcome, DigitsRequest
from .sd import SDEngine, SDOutcome, SDRequest
from .server import (
    DEFAULT_HOST,
    BeyondLoopbackWarning,
    beyond_loopback,
    free_port,
    gradio_offline,
    is_loopback,
    launch,
)
from .ui import build_app

__all__ = [
    "DEFAULT_HOST",
    "BeyondLoopbackWarning",
    "beyond_loopback",
    "DigitsEngine",
    "DigitsOutcome",
    "DigitsRequest",
    "SDEngine",
    "SDOutcome",
    "SDRequest",
    "build_app",
    "free_port",
    "gradio_offline",
    "is_loopback",
    "launch",
]
