#!/bin/sh
# Entry point of the Claude Code sandbox image (sandbox/Containerfile.claude).
#
# 1. The host's ~/.claude is mounted read-only at /opt/claude-host (claude-sandbox.sh does that
#    when it exists). Claude Code must write to its own ~/.claude, so the login and settings are
#    copied in, and only when the host's copy is newer than the container's.
# 2. In clone mode CLAUDE_SANDBOX_REPO (and CLAUDE_SANDBOX_BRANCH) name a repository to clone
#    into an empty /workspace; a workspace that already has content is left alone, so a second
#    start of the same volume resumes the earlier clone.
# Then the command (by default `claude`) replaces this shell.
set -eu

host_claude=/opt/claude-host
if [ -d "$host_claude" ]; then
  mkdir -p "$HOME/.claude"
  for file in .credentials.json settings.json CLAUDE.md; do
    if [ -f "$host_claude/$file" ]; then
      cp -u "$host_claude/$file" "$HOME/.claude/$file"
    fi
  done
fi

if [ -n "${CLAUDE_SANDBOX_REPO:-}" ]; then
  if [ -n "$(ls -A /workspace)" ]; then
    echo "claude-sandbox: /workspace is not empty, not cloning again" >&2
  elif [ -n "${CLAUDE_SANDBOX_BRANCH:-}" ]; then
    git clone --branch "$CLAUDE_SANDBOX_BRANCH" -- "$CLAUDE_SANDBOX_REPO" /workspace
  else
    git clone -- "$CLAUDE_SANDBOX_REPO" /workspace
  fi
fi

exec "$@"
