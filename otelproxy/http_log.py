"""The log of the proxy's HTTP server: a refused request is one line, never its raw bytes.

aiohttp logs a request its parser refuses with the exception, and the exception quotes the raw
bytes of the offending line (``Invalid header value char: b'Cookie: session=…\\x01'``): a key,
a cookie or an opaque token in a malformed header reached stderr. The process-wide filter
(``otelproxy.redact.RedactLogRecords``) obfuscates key-shaped values only, so ``HTTP_LOG``, the
logger the proxy's HTTP server writes to, also carries ``SummarizeParseErrors``: a parser error
(``HttpProcessingError``) becomes one WARNING line with its status, its class and the
description before the quoted bytes; the bytes and the traceback are dropped.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError

from otelproxy.redact import redact_text


def parse_error_summary(exc: HttpProcessingError) -> str:
    """``400 BadHttpMessage: Invalid header value char``: never the bytes aiohttp quotes."""
    if isinstance(exc, InvalidURLError):
        description = "invalid request target"
    else:
        description = str(exc.message).split("\n", 1)[0].rstrip(": ")
    return f"{exc.code} {type(exc).__name__}: {redact_text(description)}"


class SummarizeParseErrors(logging.Filter):
    """A logger filter: a record carrying a parser error becomes its one-line summary."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.msg = redact_text(f"{record.getMessage()}: {parse_error_summary(exc)}")
            record.args, record.exc_info, record.exc_text = None, None, None
            if record.levelno > logging.WARNING:  # a client's malformed request, not our fault
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


HTTP_LOG = logging.getLogger("otelproxy.http")
"""Where the proxy's HTTP server (aiohttp's request handler) logs: refused requests, errors."""
HTTP_LOG.addFilter(SummarizeParseErrors())
