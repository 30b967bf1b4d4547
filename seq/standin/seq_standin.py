"""A stand-in for Seq's OTLP ingestion, for the sandbox's end-to-end run (seq/standin/).

Seq itself cannot be pulled on machines without a registry, so `scripts/ci-containers.sh` runs
this in its place (`SEQ_IMAGE`). It answers what the sandbox uses of Seq (DESIGN.md §5):

- `POST /ingest/otlp/v1/logs` and `/ingest/otlp/v1/traces` (also `/v1/logs`, `/v1/traces`),
  http/protobuf only (415 otherwise), gzip and chunked bodies accepted; with
  `SEQ_STANDIN_API_KEY` set the `X-Seq-ApiKey` header must match it (401 otherwise);
- `GET /health` (200);
- on port 80 (Seq's UI/API port, which takes ingestion too) and 5341 (ingestion only).

Every accepted body is stored decoded as `DATA/otlp/NNNNNN-logs.pb` or `-traces.pb` (an
`ExportLogsServiceRequest` / `ExportTraceServiceRequest`), and every request, accepted or not, is
a line of `DATA/requests.jsonl`: path, status, content type, size, whether the key matched. The
key itself is never written. Python's standard library only, so any Python 3 base image runs it.
"""

from __future__ import annotations

import gzip
import http.server
import itertools
import json
import os
import signal
import sys
import threading
from pathlib import Path

KINDS = {
    "/ingest/otlp/v1/logs": "logs",
    "/ingest/otlp/v1/traces": "traces",
    "/v1/logs": "logs",
    "/v1/traces": "traces",
}
PROTOBUF = "application/x-protobuf"
DATA = Path(os.environ.get("SEQ_STANDIN_DATA", "/data"))
API_KEY = os.environ.get("SEQ_STANDIN_API_KEY", "")
_counter = itertools.count(1)
_lock = threading.Lock()


class IngestHandler(http.server.BaseHTTPRequestHandler):
    """One HTTP request to the stand-in."""

    server_version = "seq-standin"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.split("?")[0] == "/health":
            self._answer(200, b'{"status": "The Seq node is in service."}', "application/json")
        else:
            self._answer(404, b"not found", "text/plain")

    def do_POST(self) -> None:
        path = self.path.split("?")[0]
        chunked = "chunked" in (self.headers.get("Transfer-Encoding") or "").lower()
        body = self._read_chunked() if chunked else self.rfile.read(
            int(self.headers.get("Content-Length") or 0))
        kind = KINDS.get(path)
        key_matches = self.headers.get("X-Seq-ApiKey", "") == API_KEY
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if kind is None:
            status = 404
        elif content_type != PROTOBUF:
            status = 415
        elif API_KEY and not key_matches:
            status = 401
        else:
            status = 200
            if (self.headers.get("Content-Encoding") or "").lower() == "gzip":
                body = gzip.decompress(body)
        with _lock:
            number = next(_counter)
            if status == 200:
                (DATA / "otlp" / f"{number:06d}-{kind}.pb").write_bytes(body)
            entry = {"n": number, "path": path, "status": status, "content_type": content_type,
                     "size": len(body), "chunked": chunked,
                     "api_key_sent": "X-Seq-ApiKey" in self.headers,
                     "api_key_matches": key_matches,
                     "user_agent": self.headers.get("User-Agent", "")}
            with (DATA / "requests.jsonl").open("a") as log:
                log.write(json.dumps(entry) + "\n")
        # An empty Export*ServiceResponse is an empty protobuf message.
        self._answer(status, b"" if status == 200 else b"refused", PROTOBUF)

    def _read_chunked(self) -> bytes:
        """A `Transfer-Encoding: chunked` body (Node's HTTP client may send one)."""
        parts = []
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after the chunk
        while self.rfile.readline().strip():  # trailers, up to the empty line
            pass
        return b"".join(parts)

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        sys.stderr.write("seq-standin: " + (format % args) + "\n")


def main(ports: list[int]) -> None:
    """Serve every port in `ports` until killed."""
    # As PID 1 in a container SIGTERM is ignored unless handled: stop at once, like Seq does.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    (DATA / "otlp").mkdir(parents=True, exist_ok=True)
    servers = [http.server.ThreadingHTTPServer(("0.0.0.0", port), IngestHandler)
               for port in ports]
    for server in servers[1:]:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print(f"seq-standin: listening on {ports}, data in {DATA}", flush=True)
    servers[0].serve_forever()


if __name__ == "__main__":
    main([int(port) for port in (sys.argv[1:] or ["80", "5341"])])
