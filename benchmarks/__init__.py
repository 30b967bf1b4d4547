"""otelproxy's benchmark beside a bare pass-through and its peers: ``python -m benchmarks.run``."""
