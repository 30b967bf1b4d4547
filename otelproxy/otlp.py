"""OpenTelemetry export (to Seq): one span and two log records per exchange. See issue 3/4."""

from __future__ import annotations

from collections.abc import Mapping

from otelproxy.config import Config
from otelproxy.pipeline import Sink


def build_sink(config: Config, env: Mapping[str, str]) -> Sink | None:
    """The OTLP sink when export is configured (``--seq-url`` or ``OTEL_EXPORTER_OTLP_*``)."""
    return None
