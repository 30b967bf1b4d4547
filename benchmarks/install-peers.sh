#!/usr/bin/env bash
# Install what the benchmark runs beside otelproxy, never into the project's virtualenv: none of
# it is an otelproxy dependency.
#   benchmarks/.peers-venv  the peers (mitmproxy, claude-tap)       -> python -m benchmarks.run
#   benchmarks/.otel-venv   otelproxy (editable) + the OpenTelemetry SDK, OTLP/HTTP exporter and
#                           aiohttp-client instrumentation          -> python -m benchmarks.otel_packages
# The OpenTelemetry packages get a virtualenv of their own so that otelproxy's dependencies
# (uvloop, aiohttp, ...) never change what the peers run with.
#   bash benchmarks/install-peers.sh        (then: .venv/bin/python -m benchmarks.run)
# Each package set is installed on its own, so one that fails to install does not stop the
# others; the benchmarks report what they cannot find or start as such.
set -uo pipefail
cd "$(dirname "$0")" || exit 1

PYTHON="${PYTHON:-python3}"
MITMPROXY_VERSION="${MITMPROXY_VERSION:-11.0.2}"
CLAUDE_TAP_VERSION="${CLAUDE_TAP_VERSION:-0.1.146}"
# opentelemetry-instrumentation-aiohttp-client 0.66b1 (the newest) needs semantic conventions
# 0.66b1, which go with SDK 1.45.1.
OTEL_VERSION="${OTEL_VERSION:-1.45.1}"
OTEL_CONTRIB_VERSION="${OTEL_CONTRIB_VERSION:-0.66b1}"

venv() {  # venv DIR: create it when missing, with a current pip
    if [ ! -x "$1/bin/python" ]; then
        "$PYTHON" -m venv "$1" || return 1
    fi
    "$1/bin/python" -m pip install --quiet --upgrade pip
}

status=0
if venv .peers-venv; then
    for peer in "mitmproxy==${MITMPROXY_VERSION}" "claude-tap==${CLAUDE_TAP_VERSION}"; do
        if ! .peers-venv/bin/python -m pip install --quiet "$peer"; then
            echo "install-peers: could not install $peer" >&2
            status=1
        fi
    done
    .peers-venv/bin/python -m pip list 2>/dev/null | grep -E -i '^(mitmproxy|claude-tap) '
else
    echo "install-peers: could not create .peers-venv" >&2
    status=1
fi

if venv .otel-venv && .otel-venv/bin/python -m pip install --quiet -e .. \
        "opentelemetry-api==${OTEL_VERSION}" "opentelemetry-sdk==${OTEL_VERSION}" \
        "opentelemetry-proto==${OTEL_VERSION}" \
        "opentelemetry-exporter-otlp-proto-http==${OTEL_VERSION}" \
        "opentelemetry-instrumentation-aiohttp-client==${OTEL_CONTRIB_VERSION}"; then
    .otel-venv/bin/python -m pip list 2>/dev/null | grep -E -i '^opentelemetry-(sdk|exporter-otlp-proto-http|instrumentation-aiohttp-client) '
else
    echo "install-peers: could not install the OpenTelemetry packages into .otel-venv" >&2
    status=1
fi
exit "$status"
