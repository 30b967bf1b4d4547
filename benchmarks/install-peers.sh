#!/usr/bin/env bash
# Install the benchmark's peers (mitmproxy, claude-tap) into their own virtualenv,
# benchmarks/.peers-venv, never into the project's: they are not otelproxy dependencies.
#   bash benchmarks/install-peers.sh        (then: .venv/bin/python -m benchmarks.run)
# Each peer is installed on its own, so one that fails to install does not stop the other;
# the benchmark reports a peer it cannot find or start as such.
set -uo pipefail
cd "$(dirname "$0")" || exit 1

PYTHON="${PYTHON:-python3}"
MITMPROXY_VERSION="${MITMPROXY_VERSION:-11.0.2}"
CLAUDE_TAP_VERSION="${CLAUDE_TAP_VERSION:-0.1.146}"

if [ ! -x .peers-venv/bin/python ]; then
    "$PYTHON" -m venv .peers-venv || exit 1
fi
.peers-venv/bin/python -m pip install --quiet --upgrade pip
status=0
for peer in "mitmproxy==${MITMPROXY_VERSION}" "claude-tap==${CLAUDE_TAP_VERSION}"; do
    if ! .peers-venv/bin/python -m pip install --quiet "$peer"; then
        echo "install-peers: could not install $peer" >&2
        status=1
    fi
done
.peers-venv/bin/python -m pip list 2>/dev/null | grep -E -i '^(mitmproxy|claude-tap) '
exit "$status"
