"""A byte-level loopback HTTP/1.1 upstream for tests that must see exactly what the proxy sent.

``FakeUpstream`` speaks the provider protocols through aiohttp, which decodes paths and folds
framing away. ``RawUpstream`` is a plain socket server: it keeps each request's head and body
exactly as they arrived and answers with whatever bytes the test scripts, so checks like "the
proxy added no header" or "the query string arrived byte for byte" look at the real wire.

    with RawUpstream() as upstream:
        upstream.respond(b"HTTP/1.1 302 Found\\r\\nLocation: /x\\r\\nContent-Length: 0\\r\\n\\r\\n")
        ... send a request through the proxy to upstream.host_port ...
        request = upstream.requests[0]      # RawRequest: .head (bytes), .body (bytes)

Every answer closes the connection (the scripted response should say ``Connection: close``
or carry its own length; the proxy strips ``Connection`` anyway). A ``Slow`` answer writes its
parts with a pause between them and sets ``closed_by_peer`` when the proxy hangs up early.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType


@dataclass
class RawRequest:
    """One request as it crossed the wire: the head up to the blank line, the body unframed."""

    head: bytes
    body: bytes
    chunked: bool = False

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def target(self) -> str:
        """The request target exactly as sent (path and query, still percent-encoded)."""
        return self.request_line.split(" ")[1]

    @property
    def headers(self) -> list[tuple[str, str]]:
        """Header lines in order, names as sent, duplicates kept."""
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            if not line:
                continue
            name, _, value = line.partition(b":")
            out.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        return out

    def values(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]


@dataclass
class Slow:
    """An answer written in parts with ``delay`` seconds between them."""

    parts: list[bytes]
    delay: float = 0.1


@dataclass
class _Script:
    answers: deque[bytes | Slow] = field(default_factory=deque)


DEFAULT_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Connection: close\r\n\r\n{}"
)


class RawUpstream:
    """A threaded socket server on 127.0.0.1 that records raw requests; see the module doc."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # here, not in the thread: stop() may close it first
        self.port = self._listener.getsockname()[1]
        self.host_port = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host_port}"
        self.requests: list[RawRequest] = []
        self.connections = 0
        self.received = threading.Event()
        self.closed_by_peer = threading.Event()
        self._script = _Script()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept, daemon=True)

    def respond(self, *answers: bytes | Slow) -> None:
        """Queue answers for the next requests (default: 200 with ``{}``)."""
        self._script.answers.extend(answers)

    def start(self) -> None:
        self._accept_thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        self._accept_thread.join(5)
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> RawUpstream:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- serving -------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            try:
                request = _read_request(conn)
            except (OSError, ValueError):
                return
            if request is None:
                return
            self.requests.append(request)
            self.received.set()
            answer = self._script.answers.popleft() if self._script.answers else DEFAULT_ANSWER
            try:
                if isinstance(answer, Slow):
                    self._send_slowly(conn, answer)
                else:
                    conn.sendall(answer)
                    conn.shutdown(socket.SHUT_WR)
                    _drain(conn)
            except OSError:
                self.closed_by_peer.set()

    def _send_slowly(self, conn: socket.socket, answer: Slow) -> None:
        for index, part in enumerate(answer.parts):
            if index:
                # A peer that hung up shows as readable EOF (or a reset) during the pause.
                conn.settimeout(answer.delay)
                try:
                    if conn.recv(1) == b"":
                        self.closed_by_peer.set()
                        return
                except TimeoutError:
                    pass
                conn.settimeout(10)
            conn.sendall(part)
        conn.shutdown(socket.SHUT_WR)
        _drain(conn)


def _drain(conn: socket.socket) -> None:
    """Wait for the peer to close its side so nothing is cut short by our close."""
    conn.settimeout(2)
    with contextlib.suppress(OSError):
        while conn.recv(65536):
            pass


def _read_request(conn: socket.socket) -> RawRequest | None:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    request = RawRequest(head=head, body=b"")
    lengths = request.values("content-length")
    chunked = any("chunked" in v.lower() for v in request.values("transfer-encoding"))
    if chunked:
        request.chunked = True
        request.body = _read_chunked(conn, rest)
    elif lengths:
        length = int(lengths[0])
        while len(rest) < length:
            data = conn.recv(65536)
            if not data:
                raise ValueError("body cut short")
            rest += data
        request.body = rest[:length]
    return request


def _read_chunked(conn: socket.socket, buffer: bytes) -> bytes:
    body = b""

    def need(size: int) -> None:
        nonlocal buffer
        while len(buffer) < size:
            data = conn.recv(65536)
            if not data:
                raise ValueError("chunked body cut short")
            buffer += data

    while True:
        while b"\r\n" not in buffer:
            need(len(buffer) + 1)
        line, _, buffer = buffer.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while not buffer.startswith(b"\r\n") and b"\r\n\r\n" not in buffer:
                need(len(buffer) + 1)
            return body
        need(size + 2)
        body += buffer[:size]
        buffer = buffer[size + 2 :]


# -- the client side, byte level ---------------------------------------------------------------


@dataclass
class ClosedPort:
    """An origin nothing listens on (the port was bound, then released)."""

    port: int

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"


def closed_port() -> ClosedPort:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return ClosedPort(probe.getsockname()[1])


def roundtrip(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send raw request bytes to 127.0.0.1:port and return everything until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        received = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return received
            received += data


@dataclass
class RawResponse:
    status_line: str
    headers: list[tuple[str, str]]
    body: bytes
    """The body unframed (chunked transfer coding removed)."""
    complete: bool
    """False when a chunked body ended without its terminating zero-size chunk."""

    @property
    def status(self) -> int:
        return int(self.status_line.split(" ")[1])

    def values(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for key, value in self.headers if key.lower() == lower]


def parse_response(raw: bytes) -> RawResponse:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    response = RawResponse(lines[0], headers, rest, complete=True)
    if any("chunked" in v.lower() for v in response.values("transfer-encoding")):
        body, complete = b"", False
        while True:
            line, sep, rest = rest.partition(b"\r\n")
            if not sep:
                break
            size = int(line.split(b";")[0], 16)
            if size == 0:
                complete = True
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        response.body, response.complete = body, complete
    elif response.values("content-length"):
        response.complete = len(rest) == int(response.values("content-length")[0])
    return response
