"""``python -m otelproxy``: the command line (``otelproxy.cli``)."""

from otelproxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
