"""Command line: ``otelproxy [serve] [options]`` (no subcommand means ``serve``).

Configuration errors print one line on stderr and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from contextlib import closing
from typing import Any

from otelproxy import __version__, config, open_files
from otelproxy.errors import ConfigError

COMMANDS = ("serve", "sessions", "show")

_COMMANDS_HELP = """\
commands:
  otelproxy [serve] [options]     run the proxy (the default command; its options are above)
  otelproxy sessions [--provider P] [--since T] [--client-session ID] [--json]
                                  list recorded sessions, newest first
  otelproxy show SESSION [--json] [--raw SEQ [--response]]
                                  print one session's turns and its branch tree, or
                                  one turn's exact bytes
  `otelproxy sessions --help` and `otelproxy show --help` describe their options.
"""

_ENV_HELP = """\
environment (flags win over environment, environment over the TOML file):
  OTELPROXY_HOST, OTELPROXY_PORT, OTELPROXY_LOG_DIR, OTELPROXY_CONFIG,
  OTELPROXY_UPSTREAMS (comma-separated), OTELPROXY_DEFAULT_UPSTREAM,
  OTELPROXY_DEFAULT_PROVIDER, OTELPROXY_MAX_REQUEST_BYTES, OTELPROXY_GRACE_PERIOD,
  OTELPROXY_UPSTREAM_CONNECT_TIMEOUT, OTELPROXY_UPSTREAM_READ_TIMEOUT,
  OTELPROXY_MAX_CONNECTIONS, OTELPROXY_MAX_CLIENT_CONNECTIONS, OTELPROXY_HEADER_TIMEOUT,
  OTELPROXY_BODY_TIMEOUT, OTELPROXY_KEEPALIVE_TIMEOUT, OTELPROXY_RECORD_QUEUE_SIZE,
  OTELPROXY_RECORD_MAX_BODY, OTELPROXY_LOG_LEVEL,
  OTELPROXY_SEQ_URL, OTELPROXY_SEQ_API_KEY, OTELPROXY_OTLP_MAX_BODY,
  OTELPROXY_OTLP_CHUNK_EVENTS, OTELPROXY_OTLP_SHUTDOWN_TIMEOUT, OTELPROXY_RETENTION_DAYS,
  OTELPROXY_RETENTION_MAX_BYTES, and the standard OpenTelemetry variables
  (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_HEADERS, OTEL_SERVICE_NAME, ...)
TOML file keys are the same names in lower case (port = 8080, log_dir = "./logs",
upstreams = ["http://127.0.0.1:9100"], ...).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2
        sys.stderr.write(f"otelproxy: error: {message}\n")
        raise SystemExit(2)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--log-dir", metavar="DIR",
                        help="where the record goes (default ./logs; DB is DIR/sessions.db)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="otelproxy",
        description="A transparent logging proxy for the Anthropic and OpenAI HTTP APIs. "
        "Point a client at http://HOST:PORT/{provider}/{upstream_host}/ "
        "(e.g. ANTHROPIC_BASE_URL=http://127.0.0.1:8080/anthropic/api.anthropic.com).",
        epilog=_COMMANDS_HELP + "\n" + _ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"otelproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{serve,sessions,show}",
                                     parser_class=_Parser)
    serve = commands.add_parser(
        "serve", help="run the proxy (the default command)", description=parser.description,
        epilog=_COMMANDS_HELP + "\n" + _ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", help="port to listen on (default 8080; 0 picks a free port)")
    serve.add_argument("--upstream", action="append", dest="upstreams", metavar="URL",
                       help="allow an upstream origin, e.g. http://127.0.0.1:9100 (repeatable; "
                       "https://api.anthropic.com and https://api.openai.com are always allowed)")
    serve.add_argument("--default-upstream", metavar="URL",
                       help="forward paths without a /{provider}/{host} prefix to this origin")
    serve.add_argument("--default-provider", choices=config.PROVIDERS,
                       help="provider of --default-upstream")
    serve.add_argument("--max-request-bytes", metavar="N",
                       help="largest request body accepted (default 33554432 = 32 MiB)")
    serve.add_argument("--grace-period", metavar="SECONDS",
                       help="on SIGTERM/SIGINT, seconds in all that requests in flight get to "
                       "finish; then they are cut and recorded shutdown_cut (default 30)")
    serve.add_argument("--upstream-connect-timeout", metavar="SECONDS",
                       help="connect timeout to the upstream (default 30)")
    serve.add_argument("--upstream-read-timeout", metavar="SECONDS",
                       help="longest silence between two upstream reads (default 600)")
    serve.add_argument("--max-connections", metavar="N",
                       help="concurrent upstream connections (default: sized to the open-file "
                       "limit, (limit - 128) / 2, at most 10000)")
    serve.add_argument("--max-client-connections", metavar="N",
                       help="concurrent client connections; one more gets a 503 (default: "
                       "sized like --max-connections)")
    serve.add_argument("--header-timeout", metavar="SECONDS",
                       help="a request head must be complete this long after its first byte, "
                       "else 408 and the connection is closed (default 30)")
    serve.add_argument("--body-timeout", metavar="SECONDS",
                       help="longest silence while a request body is read, else 408 "
                       "(default 60)")
    serve.add_argument("--keepalive-timeout", metavar="SECONDS",
                       help="an idle keep-alive client connection is closed after this "
                       "(default 75)")
    serve.add_argument("--record-queue-size", metavar="N",
                       help="finished exchanges not yet recorded before new ones are dropped "
                       "from the record and counted (default 10000)")
    serve.add_argument("--retention-days", metavar="DAYS",
                       help="delete recorded conversations inactive for longer than DAYS, with "
                       "their branches, forks and subagents (default: keep everything)")
    serve.add_argument("--retention-max-bytes", metavar="N",
                       help="keep the JSONL record under N bytes, least recently active "
                       "conversations deleted first (default: no cap)")
    serve.add_argument("--record-max-body", metavar="BYTES",
                       help="the record keeps this much of a larger body, with its size and "
                       "SHA-256 (default 33554432 = 32 MiB)")
    serve.add_argument("--seq-url", metavar="URL",
                       help="export OTLP to Seq at URL (sets the endpoint to URL/ingest/otlp)")
    serve.add_argument("--seq-api-key", metavar="KEY",
                       help="Seq API key, sent as the X-Seq-ApiKey header")
    serve.add_argument("--otlp-max-body", metavar="BYTES",
                       help="cut each body attribute of exported log records at BYTES "
                       "(default 65536)")
    serve.add_argument("--otlp-chunk-events", action="store_const", const=True,
                       help="add one span event per stream chunk (off by default: Seq shows "
                       "each span event as its own event)")
    serve.add_argument("--otlp-shutdown-timeout", metavar="SECONDS",
                       help="on shutdown, how long telemetry still queued may take to export; "
                       "what is left is counted as not exported (default 5)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                       help="the proxy's own log verbosity (default info)")
    sessions = commands.add_parser(
        "sessions", help="list recorded sessions, newest first",
        description="List recorded sessions (reads DIR/sessions.db; works while the proxy runs).")
    _common(sessions)
    sessions.add_argument("--provider", choices=config.PROVIDERS, help="only this provider")
    sessions.add_argument("--since", metavar="T",
                          help="only sessions active since T: 30m, 2h, 3d or an ISO date/time")
    sessions.add_argument("--client-session", metavar="ID",
                          help="only the sessions of this client session (Claude Code's "
                               "X-Claude-Code-Session-Id): its conversation, branches, "
                               "forks and subagents")
    sessions.add_argument("--json", action="store_true", help="JSON output")
    show = commands.add_parser(
        "show", help="print a session's turns, and its tree of branches, forks and agents",
        description="Print one session's turns and its branch tree with fork points.")
    _common(show)
    show.add_argument("session", metavar="SESSION", help="session id (from `otelproxy sessions`)")
    show.add_argument("--json", action="store_true", help="JSON output")
    show.add_argument("--raw", metavar="SEQ", type=int,
                      help="write turn SEQ's recorded request body to stdout, byte for byte "
                           "(rebuilt from the compact record and checked against its SHA-256)")
    show.add_argument("--response", action="store_true",
                      help="with --raw: the recorded response body instead (decoded; a "
                           "stream's events joined)")
    return parser


def _browse(args: argparse.Namespace, cfg: config.Config) -> int:
    import sqlite3  # here: the proxy process has no use for them

    import orjson

    from otelproxy import browse, compact, db

    if not cfg.db_path.exists():
        sys.stderr.write(f"otelproxy: error: no record at {cfg.db_path} (is --log-dir right?)\n")
        return 2
    try:
        conn = db.connect(cfg.db_path, readonly=True)
    except (db.SchemaMismatch, sqlite3.Error) as exc:
        sys.stderr.write(f"otelproxy: error: {exc}\n")
        return 2
    with closing(conn):
        if args.command == "sessions":
            since = browse.parse_since(args.since) if args.since else None
            rows = browse.list_sessions(conn, args.provider, since, args.client_session)
            text = orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() if args.json \
                else browse.format_sessions(rows)
        elif args.raw is not None:
            try:
                bodies = browse.raw_bodies(conn, cfg.log_dir, args.session, args.raw)
            except (compact.DeltaError, OSError, orjson.JSONDecodeError) as exc:
                sys.stderr.write(f"otelproxy: error: cannot rebuild the record: {exc}\n")
                return 1
            if bodies is None:
                sys.stderr.write(f"otelproxy: error: no turn {args.raw} in session "
                                 f"{args.session!r}\n")
                return 1
            sys.stdout.buffer.write(bodies[1] if args.response else bodies[0])
            sys.stdout.flush()
            return 0
        else:
            data = browse.show_session(conn, args.session)
            if data is None:
                sys.stderr.write(f"otelproxy: error: no session {args.session!r}\n")
                return 1
            text = orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() if args.json \
                else browse.format_show(data)
    sys.stdout.write(text + "\n")
    return 0


_BROWSE_ONLY = ("provider", "since", "json", "session", "client_session", "raw", "response")


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items()
            if k != "command" and k not in _BROWSE_ONLY and v is not None}


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in (*COMMANDS, "--version"):
        args_list.insert(0, "serve")
    args = build_parser().parse_args(args_list)
    if args.command == "serve":  # before the configuration: its defaults are sized to it
        open_files.raise_soft_limit()
    try:
        cfg = config.load(_flags(args), os.environ)
        if args.command in ("sessions", "show"):
            return _browse(args, cfg)
    except ConfigError as exc:
        sys.stderr.write(f"otelproxy: error: {exc}\n")
        return 2
    logging.basicConfig(
        level=cfg.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from otelproxy.redact import redact_logging
    from otelproxy.server import run, serve

    redact_logging()

    try:
        return run(serve(cfg))
    except ConfigError as exc:  # e.g. an invalid OTEL_EXPORTER_OTLP_* value (otlp.resolve)
        sys.stderr.write(f"otelproxy: error: {exc}\n")
        return 2
    except OSError as exc:  # e.g. the port is taken
        sys.stderr.write(f"otelproxy: error: cannot listen on {cfg.host}:{cfg.port}: "
                         f"{exc.strerror or exc}\n")
        return 2
