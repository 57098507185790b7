"""Serving the app locally: loopback by default, analytics off, nothing fetched from outside.

Gradio is imported only through :func:`gradio_offline`, which first switches its
telemetry off (``GRADIO_ANALYTICS_ENABLED=False``, Hugging Face Hub telemetry off). The
default theme's fonts are served by the app itself, so the page loads with no network.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import warnings
from typing import Any

from ..validation import check_int

__all__ = [
    "DEFAULT_HOST",
    "BeyondLoopbackWarning",
    "beyond_loopback",
    "gradio_offline",
    "is_loopback",
    "free_port",
    "launch",
]

DEFAULT_HOST = "127.0.0.1"

_OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def gradio_offline():
    """The ``gradio`` module, imported with analytics and telemetry off."""
    os.environ.update(_OFFLINE_ENV)
    import gradio

    return gradio


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) reaches this machine only."""
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"host must be a host name or an IP address, got {host!r}")
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip()).is_loopback
    except ValueError:
        return False


class BeyondLoopbackWarning(UserWarning):
    """The app is bound to an address other machines may reach."""


def beyond_loopback(host: str) -> str:
    """The warning for an app bound to ``host``, beyond loopback."""
    return (
        f"msdda app is bound to {host}, beyond loopback: anyone who can reach this machine "
        "on that address can use it (the default is 127.0.0.1)"
    )


def free_port(host: str = DEFAULT_HOST) -> int:
    """A TCP port free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def launch(
    page: Any,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    *,
    block: bool = True,
    quiet: bool = False,
) -> str:
    """Serve ``page`` (a ``gradio.Blocks``) on ``host:port``; returns its local URL.

    A host beyond loopback gets a warning: anyone who can reach it can use the app. With
    ``block=False`` the server runs in a background thread until ``page.close()``.
    """
    if not is_loopback(host):
        warnings.warn(beyond_loopback(host), BeyondLoopbackWarning, stacklevel=2)
    if port is not None:
        check_int(port, "port", low=1, high=65535)
    gradio_offline()
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        share=False,
        inbrowser=False,
        quiet=quiet,
        ssr_mode=False,
        show_error=False,
    )
    return str(page.local_url)
