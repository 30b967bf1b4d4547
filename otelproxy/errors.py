"""The one exception tree of otelproxy.

    OtelproxyError                  base of everything we raise on purpose
    ├── ConfigError                 bad configuration: one clear line, exit status 2
    ├── RouteError                  a request the proxy refuses before sending anything upstream
    │   ├── InvalidTarget           400: the request target is not a path (absolute-form, ``*``)
    │   ├── RequestTimeout          408: the request body did not arrive in time
    │   ├── UnknownProvider         404: the first path segment names no provider
    │   ├── UpstreamNotAllowed      403: the upstream origin is not on the allowlist
    │   └── RequestTooLarge         413: the request body exceeds ``max_request_bytes``
    └── UpstreamError               the upstream could not be reached or failed before headers (502)
        ├── UpstreamConnectError    connection refused / DNS / TLS
        └── UpstreamTimeout         no response within the configured time

aiohttp's own exceptions are translated at the boundary (``otelproxy.upstream``) with
``raise ... from exc`` so the proxy handler only ever sees this tree. A ``RouteError`` or
``UpstreamError`` carries the HTTP status the client receives; the body is written in the
provider's error shape by ``error_body``. Messages never contain a secret.
"""

from __future__ import annotations

import json


def error_body(provider: str | None, error_type: str, message: str) -> bytes:
    """A JSON error in the provider's own shape, so SDKs surface ``message`` to the user.
    Written with the standard library's ``json``: the proxy process, which answers errors,
    does not load orjson (0.2 MiB resident) for them."""
    if provider == "openai":
        error: dict[str, object] = {"error": {"message": message, "type": error_type,
                                              "param": None, "code": error_type}}
    else:
        error = {"type": "error", "error": {"type": error_type, "message": message}}
    return json.dumps(error, separators=(",", ":")).encode()


class OtelproxyError(Exception):
    """Base class of every error otelproxy raises on purpose."""


class ConfigError(OtelproxyError):
    """Invalid configuration; the CLI prints the message on one line and exits with status 2."""


class RouteError(OtelproxyError):
    """The proxy refuses the request; nothing is sent upstream."""

    status = 400
    error_type = "invalid_request_error"


class InvalidTarget(RouteError):
    """The request target does not start with ``/``: absolute-form (``GET http://host/…``),
    asterisk-form (``OPTIONS *``) and anything else a proxy for API clients never needs."""


class RequestTimeout(RouteError):
    status = 408
    error_type = "timeout_error"


class UnknownProvider(RouteError):
    status = 404
    error_type = "not_found_error"


class UpstreamNotAllowed(RouteError):
    status = 403
    error_type = "permission_error"


class RequestTooLarge(RouteError):
    status = 413
    error_type = "request_too_large"


class UpstreamError(OtelproxyError):
    """The upstream failed before the response head arrived; the client gets a 502."""

    status = 502
    error_type = "api_error"


class UpstreamConnectError(UpstreamError):
    pass


class UpstreamTimeout(UpstreamError):
    status = 504
    error_type = "timeout_error"
