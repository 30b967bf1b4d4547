"""otelproxy: an OpenTelemetry-native logging proxy for AI coding agents."""

__version__ = "0.1.0"
