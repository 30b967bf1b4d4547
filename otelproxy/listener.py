"""The listening socket: which client connections the proxy takes and how long it waits on them.

aiohttp's server has no cap on client connections, no timeout for a request head (a client
sending one byte a second kept its connection for ever) and an idle keep-alive timeout of about
an hour. ``Listener`` opens the listening socket itself, so every accepted connection is served
by ``ClientConnection`` (aiohttp's ``RequestHandler`` with these rules) or refused:

- at most ``max_client_connections`` connections at once; one more has its request head read,
  is answered ``503 overloaded_error`` (with ``Retry-After``) and closed, counted in
  ``/healthz``;
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
from typing import Any, cast

from aiohttp import web
from aiohttp.streams import StreamReader

from otelproxy.config import Config
from otelproxy.errors import error_body
from otelproxy.http_log import HTTP_LOG
from otelproxy.proxy import Stats

log = logging.getLogger("otelproxy.listener")

WARN_INTERVAL_S = 60.0
"""At most one warning per this many seconds about refused connections."""
REFUSED_LINGER_S = 2.0
"""After its 503, a refused connection waits this long for the client to close first."""
_REFUSED_HEAD_MAX = 65536
"""A refused connection reads at most this much of the request head before it answers."""


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
        if self._current_request is not None:
            # A head pipelined behind a request still being answered waits its turn: closing
            # now would cut that answer. Its time starts again.
            self._head_timer = self._loop.call_later(
                self._listener.config.header_timeout, self._head_too_slow)
            return
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
    """A connection over the cap: it reads the request head (so the client is past sending it
    and reads an answer, not a reset), answers 503 in the shape of the provider the path names,
    and closes once the client has (or ``REFUSED_LINGER_S`` after the answer)."""

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._head = bytearray()
        self._answered = False
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check here
        self._transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(
            self._listener.config.header_timeout, self._transport.close)

    def data_received(self, data: bytes) -> None:
        if not self._answered:
            self._head += data[:_REFUSED_HEAD_MAX]
            if len(self._head) >= _REFUSED_HEAD_MAX or _request_complete(self._head):
                self._answer()

    def eof_received(self) -> bool:
        if not self._answered:
            self._answer()
        return False  # the client is done: close once the answer is written

    def _answer(self) -> None:
        self._answered = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        target = bytes(self._head.split(b"\r\n", 1)[0]).split(b" ")
        provider = "openai" if len(target) > 1 and target[1].startswith(b"/openai/") else None
        transport.write(self._listener.refusal(provider))
        if transport.can_write_eof():
            transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _request_complete(received: bytes | bytearray) -> bool:
    """Whether ``received`` holds a whole request: the head and, when it announces one, its
    body (clients that are still writing a body treat an early answer as a broken connection)."""
    head, found, body = bytes(received).partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.lower().split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
        if name.strip() == b"transfer-encoding" and b"chunked" in value:
            return body.startswith(b"0\r\n") or b"\r\n0\r\n" in body
    return True


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
        self._refusals = {
            name: _canned_response(
                "503 Service Unavailable", "overloaded_error",
                f"too many client connections (limit {config.max_client_connections})", name,
                extra="Retry-After: 1\r\n")
            for name in (provider, "openai")
        }
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

    def refusal(self, provider: str | None) -> bytes:
        """The 503 for a connection over the cap (the default provider's shape unless the path
        names openai)."""
        return self._refusals.get(provider) or self._refusals[self.config.default_provider]

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
            return RefusedConnection(self)
        stats.client_connections += 1  # here, not in connection_made: accepts come in bursts
        return ClientConnection(self, self._server, loop=asyncio.get_running_loop(),
                                **self._handler_options)
