"""OpenTelemetry export (to Seq): one span (two with the upstream call) and two log records per
exchange, sent as OTLP/HTTP protobuf from the recorder process.

- ``settings``: config + OTel environment → ``ExportSettings`` (``resolve``); light to import,
  the proxy process uses it to refuse a bad setting at start.
- ``mapping``: ``Record`` → attributes, span and log names, severity, summaries (it lists every
  attribute, a contract with Seq queries); ``encode`` gives an exchange's telemetry as bytes.
- ``wire``: the OTLP protobuf writer (spans, log records, export requests).
- ``export``: ``OtlpSink`` (encodes on the recorder's thread) and the batching exporter
  threads (retries, ``Retry-After``, counters); imports the SDK, so it is loaded only when
  export is configured (``build_sink``).
- ``transport``: one kept-alive ``http.client`` connection to an endpoint, every step bounded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from otelproxy.config import Config
from otelproxy.otlp.settings import ExportSettings, log, resolve, safe_url

if TYPE_CHECKING:
    from otelproxy.pipeline import Sink

__all__ = ["ExportSettings", "build_sink", "resolve"]


def build_sink(config: Config, env: Mapping[str, str]) -> Sink | None:
    """The OTLP sink when export is configured (``--seq-url`` or ``OTEL_EXPORTER_OTLP_*``)."""
    settings = resolve(config, env)
    if settings is None:
        return None
    from otelproxy.otlp.export import OtlpSink  # the SDK, http.client: only when exporting

    sink = OtlpSink(settings)
    sink.start()
    log.info("exporting OTLP (http/protobuf): traces → %s, logs → %s, service %s",
             safe_url(settings.traces_endpoint), safe_url(settings.logs_endpoint),
             settings.resource["service.name"])
    return sink
