"""The one narrow seam to upstream servers: a shared aiohttp ``ClientSession``.

Streaming discipline (DESIGN §3.5): no total timeout, a per-read timeout, an explicit connector
limit, ``auto_decompress=False`` (compressed bytes are forwarded untouched), no cookie jar, no
redirects, no retries, and none of aiohttp's automatic request headers. aiohttp errors are
translated into ``otelproxy.errors`` here.
"""

from __future__ import annotations

from collections.abc import Sequence

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from otelproxy.config import Config
from otelproxy.errors import UpstreamConnectError, UpstreamError, UpstreamTimeout

# RFC 9110 §7.6.1 hop-by-hop fields, plus Host (rewritten) and framing headers aiohttp recomputes.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "proxy-authorization", "proxy-authenticate"}
)
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
_SKIP_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


def end_to_end(
    headers: Sequence[tuple[str, str]], drop: frozenset[str], unify_case: bool = False
) -> CIMultiDict[str]:
    """Headers minus the hop-by-hop set and every header ``Connection`` names.

    ``unify_case`` spells every repeat of a name like its first occurrence (``X-A``, ``x-a`` →
    ``X-A``): aiohttp's ``ClientSession._prepare_headers`` keeps a repeated header only when the
    names match case-sensitively, so a repeat spelled differently would replace the earlier value.
    """
    lowered = [(name.lower(), name, value) for name, value in headers]
    named: set[str] = set()
    for lower, _, value in lowered:
        if lower == "connection":
            named.update(token.strip().lower() for token in value.split(","))
    out: CIMultiDict[str] = CIMultiDict()
    first: dict[str, str] = {}
    for lower, name, value in lowered:
        if lower in drop or lower in named:
            continue
        out.add(first.setdefault(lower, name) if unify_case else name, value)
    return out


def request_headers(headers: Sequence[tuple[str, str]]) -> CIMultiDict[str]:
    return end_to_end(headers, _REQUEST_DROP, unify_case=True)


def response_headers(headers: Sequence[tuple[str, str]]) -> CIMultiDict[str]:
    return end_to_end(headers, HOP_BY_HOP)


class Upstream:
    """Sends requests upstream over one shared, long-lived ``ClientSession``."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._config.max_connections, limit_per_host=0, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self._config.upstream_connect_timeout,
                sock_read=self._config.upstream_read_timeout,
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
        )
        # aiohttp re-sends an idempotent request (GET, HEAD, ...) once when the upstream hangs up
        # before answering. There is no public switch; aiohttp's own test client turns it off
        # the same way. A transparent proxy sends each request exactly once.
        if hasattr(self._session, "_retry_connection"):
            self._session._retry_connection = False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, method: str, url: str, headers: CIMultiDict[str], body: bytes
    ) -> aiohttp.ClientResponse:
        """Send one request; return once the response head has arrived."""
        assert self._session is not None, "Upstream.start() was not awaited"
        try:
            return await self._session.request(
                method,
                URL(url, encoded=True),
                headers=headers,
                data=body if body or method not in ("GET", "HEAD") else None,
                allow_redirects=False,
                compress=None,
                chunked=None,
            )
        except TimeoutError as exc:
            raise UpstreamTimeout("upstream did not answer in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamConnectError(
                f"cannot connect to upstream {exc.host}:{exc.port} ({exc.os_error.strerror or exc})"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"upstream failed before answering ({type(exc).__name__})") from exc
