"""OpenTelemetry export (to Seq): one span (two with the upstream call) and two log records per
exchange, sent as OTLP/HTTP protobuf from the recorder process.

- ``settings``: config + OTel environment → ``ExportSettings`` (``resolve``); light to import,
  the proxy process uses it to refuse a bad setting at start (and imports it only when
  something can turn export on, ``--seq-url``, ``--seq-api-key`` or an endpoint variable:
  ``resolve`` here).
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

if TYPE_CHECKING:
    from otelproxy.otlp.settings import ExportSettings
    from otelproxy.pipeline import Sink

__all__ = ["ENDPOINT_VARIABLES", "build_sink", "resolve"]

GENERIC_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
SIGNAL_ENDPOINTS = {"traces": "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "logs": "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"}
ENDPOINT_VARIABLES = (GENERIC_ENDPOINT, *SIGNAL_ENDPOINTS.values())
"""The variables that name an endpoint: with ``--seq-url``, the only ways export is turned on
(``settings.resolve``)."""


def resolve(config: Config, env: Mapping[str, str]) -> ExportSettings | None:
    """``settings.resolve``. Without ``--seq-url``, ``--seq-api-key`` and an endpoint variable
    there is nothing to export to, check or warn about: None, and the settings module is not
    even imported (it kept the proxy process 0.1 MiB larger with export off)."""
    if not (config.seq_url or config.seq_api_key or
            any(env.get(name, "").strip() for name in ENDPOINT_VARIABLES)):
        return None
    from otelproxy.otlp import settings

    return settings.resolve(config, env)


def build_sink(config: Config, env: Mapping[str, str]) -> Sink | None:
    """The OTLP sink when export is configured (``--seq-url`` or ``OTEL_EXPORTER_OTLP_*``)."""
    settings = resolve(config, env)
    if settings is None:
        return None
    from otelproxy.otlp.export import OtlpSink  # the SDK, http.client: only when exporting
    from otelproxy.otlp.settings import log, safe_url

    sink = OtlpSink(settings)
    sink.start()
    log.info("exporting OTLP (http/protobuf): traces → %s, logs → %s, service %s",
             safe_url(settings.traces_endpoint), safe_url(settings.logs_endpoint),
             settings.resource["service.name"])
    return sink
