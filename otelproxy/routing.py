"""Map an incoming request path to (provider, upstream origin, upstream path).

    /{provider}/{upstream_host[:port]}/{original_path}  →  {scheme}://{host[:port]}/{original_path}

The scheme comes from the allowlist entry, never from the client, so the proxy is no open relay.
With a default upstream configured, a path whose first segment is not a provider goes there whole
(``ANTHROPIC_BASE_URL=http://proxy:8000`` then works without the prefix).

Only origin-form targets are routed: a target that does not start with ``/`` (absolute-form
``GET http://other/x``, ``evil://…``, asterisk-form ``*``) is refused with a 400, never glued
onto an upstream origin.
"""

from __future__ import annotations

from dataclasses import dataclass

from otelproxy.config import PROVIDERS, Config, Origin
from otelproxy.errors import InvalidTarget, UnknownProvider, UpstreamNotAllowed


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    origin: Origin
    path: str
    """The raw (still percent-encoded) path on the upstream, starting with ``/``."""


def resolve(raw_path: str, config: Config) -> Route:
    """Route a raw request path (without the query string)."""
    if not raw_path.startswith("/"):
        raise InvalidTarget(
            "request target must be a path starting with '/' (absolute-form and other targets "
            "are not accepted); point the client's base URL at this proxy instead"
        )
    segments = raw_path.split("/", 3)  # "", provider, host, rest
    first = segments[1] if len(segments) > 1 else ""
    if first in PROVIDERS:
        authority = segments[2] if len(segments) > 2 else ""
        rest = "/" + segments[3] if len(segments) > 3 else "/"
        origin = config.origin_for(authority) if authority else None
        if origin is None:
            allowed = ", ".join(o.url for o in config.upstreams)
            raise UpstreamNotAllowed(
                f"upstream {authority!r} is not on this proxy's allowlist (allowed: {allowed}); "
                "add it with --upstream URL"
            )
        return Route(first, origin, rest)
    if config.default_upstream is not None and config.default_provider is not None:
        return Route(config.default_provider, config.default_upstream, raw_path or "/")
    raise UnknownProvider(
        f"unknown provider {first!r} in path; use /{{provider}}/{{upstream_host}}/{{path}} "
        f"with provider one of: {', '.join(PROVIDERS)}"
    )
