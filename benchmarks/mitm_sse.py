"""mitmproxy addon for the benchmark (``mitmdump -s benchmarks/mitm_sse.py -w FILE``).

mitmproxy buffers every response body before it sends it on, which holds a Server-Sent Events
stream back until it ends (mitmproxy issue 4469). This addon streams ``text/event-stream``
responses chunk by chunk as they arrive and keeps a copy of the chunks, so the flow that ``-w``
saves still holds the whole stream: mitmproxy forwards the stream live and records it, as
otelproxy does. Every other response keeps mitmproxy's default behaviour (buffered, recorded).
"""

from __future__ import annotations

from mitmproxy import http


class StreamEventsAndKeep:
    """``responseheaders``: stream SSE responses through a function that keeps each chunk."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or not response.headers.get("content-type", "").startswith(
                "text/event-stream"):
            return
        chunks: list[bytes] = []

        def keep(data: bytes) -> bytes:
            if data:
                chunks.append(data)
            else:  # the end of the stream: the saved flow gets the whole body
                response.raw_content = b"".join(chunks)
            return data

        response.stream = keep


addons = [StreamEventsAndKeep()]
