#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
#   - a virtualenv in .venv with otelproxy and its test extras
#   - the real Claude Code CLI from the npm registry (tests run it against a fake upstream)
#   - shellcheck (the sandbox script is checked with it), wrk (the benchmark's smoke test uses
#     it) and valgrind (benchmarks.instructions counts with it), via apt-get when running as root
# Extra arguments go to pytest: scripts/test.sh -k sessions
set -euo pipefail
cd "$(dirname "$0")/.."

CLAUDE_CODE_VERSION="${CLAUDE_CODE_VERSION:-2.1.337}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'

if [ ! -x node_modules/.bin/claude ] || ! node_modules/.bin/claude --version 2>/dev/null \
        | grep -q "^${CLAUDE_CODE_VERSION} "; then
    npm install --no-save --no-audit --no-fund --loglevel=error \
        "@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}"
fi
export OTELPROXY_CLAUDE_BIN="$PWD/node_modules/.bin/claude"
"$OTELPROXY_CLAUDE_BIN" --version

for tool in shellcheck wrk valgrind; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool"
        else
            echo "scripts/test.sh: $tool is missing; install it (apt-get install $tool)" >&2
            exit 1
        fi
    fi
done

exec .venv/bin/python -m pytest "$@"
