"""The Hugging Face Hub, decided in seconds: is it reachable from here?

huggingface_hub retries a refused connection for about 50 s before it gives up; a cluster
node without the network should hear at once why a Hub name cannot be used and what to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Optional
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def unreachable(timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """Why the Hub cannot be reached (offline mode, no route), or None when it may be. Behind a
    proxy the direct probe says nothing, so it is not made."""
    if _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or type(e).__name__})"
    return None


@contextlib.contextmanager
def quiet():
    """huggingface_hub's and transformers' warnings (retries) held back: a failure is said in
    one line by the caller."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "transformers", "datasets")]
    levels = [g.level for g in loggers]
    for g in loggers:
        g.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for g, level in zip(loggers, levels):
            g.setLevel(level)


@contextlib.contextmanager
def cache_only(on: bool):
    """datasets and huggingface_hub in offline mode for one call (the cache, no retries)."""
    if not on:
        yield
        return
    import datasets
    import huggingface_hub.constants as hub

    saved = datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE = saved
