"""The listening socket: which client connections the proxy takes and how long it waits on them.

aiohttp's server has no cap on client connections, no timeout for a request head (a client
sending one byte a second kept its connection for ever) and an idle keep-alive timeout of about
an hour. ``Listener`` opens the listening socket itself, so every accepted connection is served
by ``ClientConnection`` (aiohttp's ``RequestHandler`` with these rules) or refused:

- at most ``max_client_connections`` connections at once; one more is answered
  ``503 overloaded_error`` (with ``Retry-After``) and closed, counted in ``/healthz``;
- a request head must be complete ``header_timeout`` seconds after its first byte, else the
  connection gets a ``408`` and is closed (a connection that sends nothing at all is closed by
  the keep-alive timer, as aiohttp does);
- an idle keep-alive connection is closed after ``keepalive_timeout`` seconds.

The request body's own timeout (``body_timeout``) is applied by the handler, which records it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader

from otelproxy.config import Config
from otelproxy.providers import error_body
from otelproxy.proxy import Stats
from otelproxy.http_log import HTTP_LOG

log = logging.getLogger("otelproxy.listener")

WARN_INTERVAL_S = 60.0
"""At most one warning per this many seconds about refused connections."""
REFUSED_LINGER_S = 1.0
"""A refused connection stays open this long for the client to read the 503 (then closed)."""


def _canned_response(status: str, error_type: str, message: str, provider: str | None,
                     extra: str = "") -> bytes:
    body = error_body(provider, error_type, f"otelproxy: {message}")
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class ClientConnection(web.RequestHandler):
    """aiohttp's request handler plus the request-head timeout and the connection count."""

    __slots__ = ("_body", "_head_timer", "_listener")

    def __init__(self, listener: Listener, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._listener = listener
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        """The body of the latest request head; bytes before its end belong to it, not to a
        new head."""

    def data_received(self, data: bytes) -> None:
        if (data and self._head_timer is None
                and (self._body is None or self._body.is_eof())):
            self._head_timer = self._loop.call_later(
                self._listener.config.header_timeout, self._head_too_slow)
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads and self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
            body = self._messages[-1][1] if self._messages else None
            self._body = body if isinstance(body, StreamReader) else None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        self._listener.stats.head_timeouts += 1
        if self.transport is not None:
            self.transport.write(self._listener.head_timeout_response)
        self.force_close()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._listener.stats.client_connections -= 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


class RefusedConnection(asyncio.Protocol):
    """A connection over the cap: it gets the 503 at once and is closed shortly after."""

    def __init__(self, response: bytes) -> None:
        self._response = response
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._response)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def eof_received(self) -> bool:
        return False  # the client is done too: close now


class Listener:
    """The proxy's listening socket; see the module docstring."""

    def __init__(self, config: Config, stats: Stats, server: web.Server) -> None:
        self.config = config
        self.stats = stats
        self._server = server
        self._listening: asyncio.Server | None = None
        self._handler_options: dict[str, Any] = {
            "keepalive_timeout": config.keepalive_timeout, "access_log": None,
            "logger": HTTP_LOG,
            # A request body with Content-Encoding is forwarded as the client compressed it.
            "auto_decompress": False,
        }
        provider = config.default_provider
        self.head_timeout_response = _canned_response(
            "408 Request Timeout", "timeout_error",
            f"request head not complete after {config.header_timeout:g} s", provider)
        self._refusal = _canned_response(
            "503 Service Unavailable", "overloaded_error",
            f"too many client connections (limit {config.max_client_connections})", provider,
            extra="Retry-After: 1\r\n")
        self._warned_at = -WARN_INTERVAL_S

    @property
    def port(self) -> int:
        assert self._listening is not None and self._listening.sockets
        return int(self._listening.sockets[0].getsockname()[1])

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._listening = await loop.create_server(
            self._connection, self.config.host, self.config.port, backlog=1024)

    def close(self) -> None:
        """Stop accepting (connections already open are left to the shutdown)."""
        if self._listening is not None:
            self._listening.close()

    def _connection(self) -> asyncio.Protocol:
        stats = self.stats
        if stats.client_connections >= self.config.max_client_connections:
            stats.connections_refused += 1
            now = time.monotonic()
            if now - self._warned_at >= WARN_INTERVAL_S:
                self._warned_at = now
                log.warning("client connection limit of %d reached: refusing connections with "
                            "503 (%d so far; --max-client-connections)",
                            self.config.max_client_connections, stats.connections_refused)
            return RefusedConnection(self._refusal)
        stats.client_connections += 1  # here, not in connection_made: accepts come in bursts
        return ClientConnection(self, self._server, loop=asyncio.get_running_loop(),
                                **self._handler_options)
