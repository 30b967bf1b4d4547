"""One OTLP/HTTP endpoint over one kept-alive HTTP/1.1 connection (``http.client``).

Each exporter thread (``otelproxy.otlp.export``) owns one ``Endpoint`` and POSTs its batches
on it: the connection is opened on the first POST, kept for the next ones, and opened again
after an error or when the server closes it. A POST on a kept connection that the server
closed while it was idle (``RemoteDisconnected``, a reset or broken pipe before any answer) is
sent once more on a new connection at once, within what is left of the timeout (if the server
took the batch before it closed, the batch is exported twice: like OTLP's retries, export is
at least once). ``http.client`` costs about a fifth of the CPU per
POST of ``requests`` (its session, adapters, urllib3's pool) and about 10 MiB less resident
memory in the recorder (``benchmarks/export_profile.py``; figures in the README).

``post`` raises ``ConnectFailed`` when no connection could be made (name lookup, refused,
connect timeout, TLS handshake or certificate) or when it broke while the request was sent or
the answer read; ``TimeoutError`` when the server took longer than the time left to answer.
Each step is bounded: the name lookup by the timeout (``getaddrinfo`` runs on a short-lived
thread of its own, as it cannot be interrupted; a lookup that takes longer fails as
``LookupTimedOut``, and the next connection attempt waits for that same lookup instead of
starting another), then each socket operation (connecting to each address, the TLS handshake,
sending, each read) by the time left (a new connection) or the timeout (a kept one). A server
that answers a byte at a time can so hold a POST longer than the timeout, never forever.

TLS: an ``https`` endpoint is verified against ``OTEL_EXPORTER_OTLP[_{SIGNAL}]_CERTIFICATE``
when set, else the system's certificate store (``ssl.create_default_context``: ``SSL_CERT_FILE``
and ``SSL_CERT_DIR`` apply); ``…_CLIENT_CERTIFICATE`` + ``…_CLIENT_KEY`` give mutual TLS. The
connection goes straight to the endpoint (``HTTP(S)_PROXY`` are not used). User info in the
URL (``https://user:password@host/…``) is sent as HTTP basic authentication.
"""

from __future__ import annotations

import base64
import functools
import http.client
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from otelproxy.otlp.settings import DEFAULT_PORTS, TlsFiles

_Address = tuple[int, int, int, tuple[Any, ...]]
"""family, type, proto, sockaddr: what ``_connect_to`` needs of a ``getaddrinfo`` entry."""

MAX_ANSWER_BYTES: Final = 64 * 1024
"""An answer's body is read up to this size (OTLP answers are a few bytes); a longer one
closes the connection."""
_STALE: Final = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                 ConnectionAbortedError)


class LookupTimedOut(TimeoutError):
    """The endpoint's name got no answer from the resolver in the time left."""


class ConnectFailed(Exception):
    """No connection, or it broke before an answer came: worth trying again. ``__cause__`` is
    the error (named on ``/healthz`` by its type only)."""


@dataclass(frozen=True)
class Answer:
    """The server's answer to one POST."""

    status: int
    retry_after: str | None


class Endpoint:
    """POSTs to one URL on a kept-alive connection; not thread-safe (one exporter thread)."""

    def __init__(self, url: str, headers: Mapping[str, str], tls: TlsFiles) -> None:
        """``headers`` go with every POST (names sent in lower case, the later of two that
        differ only in case wins)."""
        parts = urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or DEFAULT_PORTS[parts.scheme]
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = {name.lower(): value for name, value in headers.items()}
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._headers.setdefault(
                "authorization", "Basic " + base64.b64encode(credentials.encode()).decode())
        self._tls = tls
        self._context: ssl.SSLContext | None = None
        self._connection: http.client.HTTPConnection | None = None
        self._lookup: _Lookup | None = None
        self._used = False
        """The connection has carried a POST before (so the server may have closed it)."""

    def post(self, body: bytes, timeout: float) -> Answer:
        """POST ``body``, each socket operation bounded by ``timeout`` seconds; a second try on
        a new connection (see the module doc) gets only what is left of it."""
        deadline = time.monotonic() + timeout
        try:
            return self._post(body, timeout)
        except ConnectFailed as exc:
            if not (self._used and isinstance(exc.__cause__, _STALE)):
                raise
        self._used = False  # closed by the server while idle: once more, on a new connection
        return self._post(body, max(0.001, deadline - time.monotonic()))

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        connection = self._connection
        if connection is not None and connection.sock is not None:
            connection.sock.settimeout(timeout)
            return connection
        self.close()
        self._used = False
        connection = None
        try:
            deadline = time.monotonic() + timeout
            addresses = self._resolve(timeout)
            remaining = max(0.001, deadline - time.monotonic())
            if self._https:
                connection = http.client.HTTPSConnection(
                    self._host, self._port, timeout=remaining, context=self._ssl_context())
            else:
                connection = http.client.HTTPConnection(self._host, self._port,
                                                        timeout=remaining)
            # http.client's own connect would look the name up again, unbounded.
            connection._create_connection = functools.partial(  # type: ignore[attr-defined]
                _connect_to, addresses)
            connection.connect()
        except OSError as exc:  # lookup, refused, timeout, TLS (an SSLError), CA file
            if connection is not None:
                connection.close()  # a TLS handshake that failed leaves its TCP socket open
            raise ConnectFailed() from exc
        self._connection = connection
        return connection

    def _post(self, body: bytes, timeout: float) -> Answer:
        connection = self._connect(timeout)
        try:
            connection.request("POST", self._target, body, self._headers)
            response = connection.getresponse()
            response.read(MAX_ANSWER_BYTES)
            answer = Answer(response.status, response.getheader("retry-after"))
            if not response.isclosed():  # an answer too long to read: not kept
                self.close()
        except TimeoutError:
            self.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ConnectFailed() from exc
        except BaseException:
            self.close()
            raise
        self._used = True
        return answer

    def _resolve(self, timeout: float) -> list[_Address]:
        """The endpoint's addresses, looked up within ``timeout`` (see the module doc)."""
        lookup = self._lookup
        if lookup is None:  # else the one still under way (or finished since it timed out)
            lookup = self._lookup = _Lookup(self._host, self._port)
        if not lookup.done.wait(timeout):
            raise LookupTimedOut()
        self._lookup = None
        if isinstance(lookup.result, BaseException):
            raise lookup.result
        return lookup.result

    def _ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            context = ssl.create_default_context(cafile=self._tls.ca_file)
            if self._tls.client_certificate and self._tls.client_key:
                context.load_cert_chain(self._tls.client_certificate, self._tls.client_key)
            self._context = context
        return self._context


class _Lookup:
    """One ``getaddrinfo`` on a daemon thread; ``done`` is set once ``result`` holds the
    addresses or the ``OSError`` (``socket.gaierror``) it raised."""

    def __init__(self, host: str, port: int) -> None:
        self.done = threading.Event()
        self.result: list[_Address] | BaseException = []
        threading.Thread(target=self._run, args=(host, port), name="otelproxy-otlp-lookup",
                         daemon=True).start()

    def _run(self, host: str, port: int) -> None:
        try:
            self.result = [(family, kind, proto, address) for family, kind, proto, _, address
                           in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        except OSError as exc:
            self.result = exc
        finally:
            self.done.set()


def _connect_to(addresses: list[_Address], _where: object, timeout: float | None = None,
                source_address: object = None) -> socket.socket:
    """``socket.create_connection`` for addresses already looked up: the first that accepts."""
    error: OSError | None = None
    for family, kind, proto, address in addresses:
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error or OSError("no address")
