"""The process's open-file limit, and the connection limits sized to it.

Every stream through the proxy holds two descriptors (the client's connection and the
upstream's). With the usual soft limit of 1024 open files, 1000 concurrent streams ran out of
descriptors and almost all of them got a 502. So at start the proxy raises its soft limit to
the hard limit (``raise_soft_limit``; the hard limit is the most an unprivileged process may
have), and the defaults of ``max_client_connections`` and ``max_connections`` (upstream) are
``connection_budget()``: half of what the limit leaves after ``RESERVED`` descriptors for
everything else (listening socket, recorder pipe, event loop, DNS, ...), at most ``CEILING``.
"""

from __future__ import annotations

import contextlib
import resource

RESERVED = 128
"""Descriptors kept out of the connection budget for everything but client/upstream sockets."""
CEILING = 10_000
"""The connection budget never exceeds this, however high the limit (memory, not descriptors,
bounds a proxy with that many streams)."""
_UNLIMITED_TARGET = 1 << 20
"""What the soft limit is raised to when the hard limit is unlimited (Linux's default nr_open)."""


def soft_limit() -> int:
    """The current soft limit on open files (``RLIM_INFINITY`` counted as very large)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return _UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def raise_soft_limit() -> int:
    """Raise the soft open-file limit to the hard limit (best effort); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        # e.g. macOS caps it below the hard limit: then the soft limit stays
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return soft_limit()


def connection_budget(limit: int | None = None) -> int:
    """How many client connections (and as many upstream ones) ``limit`` open files carry."""
    files = soft_limit() if limit is None else limit
    return max(1, min(CEILING, (files - RESERVED) // 2))
