"""Configuration: one frozen dataclass built once from flags > environment > TOML file > defaults.

Every invalid value becomes a ``ConfigError`` with a one-line message; the CLI prints it and exits
with status 2. The environment names are ``OTELPROXY_`` + the upper-cased field name
(``OTELPROXY_PORT``, ``OTELPROXY_LOG_DIR`` …); ``OTELPROXY_UPSTREAMS`` is comma-separated;
``OTELPROXY_CONFIG`` names the TOML file. TOML keys are the field names (``log_dir = "./logs"``).
Upstream origins are additive: the built-in allowlist plus every origin named by any source.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from otelproxy import open_files
from otelproxy.errors import ConfigError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

PROVIDERS = ("anthropic", "openai")
DEFAULT_UPSTREAMS = ("https://api.anthropic.com", "https://api.openai.com")
ENV_PREFIX = "OTELPROXY_"
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Origin:
    """An allowed upstream: scheme, host and port, fixed by configuration."""

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, url: str, what: str = "upstream") -> Origin:
        text = url.strip()
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise ConfigError(f"{what}: malformed URL {text!r} ({exc})") from exc
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ConfigError(f"{what}: malformed URL {text!r} (expected http(s)://host[:port])")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ConfigError(f"{what}: {text!r} must be an origin: scheme://host[:port], no path")
        return cls(parts.scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[parts.scheme])

    @property
    def authority(self) -> str:
        """``host`` when the port is the scheme's default, else ``host:port``."""
        if self.port == _DEFAULT_PORTS[self.scheme]:
            return self.host
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.authority}"


@dataclass(frozen=True)
class Config:
    """Everything the proxy needs to run; see the README's configuration reference."""

    host: str = "127.0.0.1"
    port: int = 8080
    log_dir: Path = Path("logs")
    upstreams: tuple[Origin, ...] = ()
    default_upstream: Origin | None = None
    default_provider: str | None = None
    max_request_bytes: int = 32 * 1024 * 1024
    grace_period: float = 30.0
    upstream_connect_timeout: float = 30.0
    upstream_read_timeout: float = 600.0
    max_connections: int = field(default_factory=open_files.connection_budget)
    """Concurrent upstream connections; by default sized to the open-file limit."""
    max_client_connections: int = field(default_factory=open_files.connection_budget)
    """Concurrent client connections; one more gets a 503. By default sized to the open-file
    limit."""
    header_timeout: float = 30.0
    """Seconds a request head may take from its first byte to its end (then: 408, closed)."""
    body_timeout: float = 60.0
    """Longest silence while a request body is read (then: 408, recorded as rejected)."""
    keepalive_timeout: float = 75.0
    """Seconds an idle keep-alive client connection stays open."""
    record_queue_size: int = 10_000
    record_max_body: int = 32 * 1024 * 1024
    seq_url: str | None = None
    seq_api_key: str | None = field(default=None, repr=False)
    otlp_max_body: int = 64 * 1024
    otlp_chunk_events: bool = False
    otlp_shutdown_timeout: float = 5.0
    log_level: str = "info"
    retention_days: float | None = None
    """Delete recorded conversations (whole session trees) inactive for longer (None: keep)."""
    retention_max_bytes: int | None = None
    """Keep the JSONL record under this size, least recently active conversations first."""

    @property
    def db_path(self) -> Path:
        return self.log_dir / "sessions.db"

    @functools.cached_property
    def _origins_by_authority(self) -> dict[str, Origin]:
        table: dict[str, Origin] = {}
        for origin in self.upstreams:
            table[origin.authority] = origin
            table[f"{origin.host}:{origin.port}"] = origin
        return table

    def origin_for(self, authority: str) -> Origin | None:
        """The allowed origin a route's ``host[:port]`` names, or None when it is not allowed."""
        return self._origins_by_authority.get(authority.lower())


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _to_int(name: str, value: Any, low: int, high: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected an integer, got {value!r}") from None
    if isinstance(value, bool) or not low <= number <= high:
        raise ConfigError(f"{name}: {number} is out of range ({low}..{high})")
    return number


def _to_float(name: str, value: Any, low: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected a number, got {value!r}") from None
    if number < low:
        raise ConfigError(f"{name}: {number} must be >= {low}")
    return number


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name}: expected true/false, got {value!r}")


def _split_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [item for item in (part.strip() for part in value.split(",")) if item]
    if isinstance(value, list | tuple):
        return [str(item) for item in value]
    raise ConfigError(f"upstreams: expected a list of URLs, got {value!r}")


def read_toml(path: Path) -> dict[str, Any]:
    import tomllib  # here: a running proxy or recorder has no use for it

    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: cannot read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: invalid TOML ({exc})") from None
    data = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(data) - set(_FIELDS) - {"config"})
    if unknown:
        raise ConfigError(f"config file {str(path)!r}: unknown key(s) {', '.join(unknown)}")
    return data


def env_values(env: Mapping[str, str]) -> dict[str, Any]:
    """The ``OTELPROXY_*`` variables as raw field values."""
    values: dict[str, Any] = {}
    for name in [*_FIELDS, "config"]:
        key = ENV_PREFIX + name.upper()
        if env.get(key, "") != "":
            values[name] = env[key]
    return values


def load(flags: Mapping[str, Any], env: Mapping[str, str]) -> Config:
    """Build the configuration: flags > environment > TOML file > defaults."""
    flag_values = {key: value for key, value in flags.items() if value is not None}
    env_layer = env_values(env)
    config_file = flag_values.get("config") or env_layer.get("config")
    toml_layer = read_toml(Path(config_file)) if config_file else {}

    merged: dict[str, Any] = {}
    upstream_urls: list[str] = list(DEFAULT_UPSTREAMS)
    for layer in (toml_layer, env_layer, flag_values):
        for key, value in layer.items():
            if key == "upstreams":
                upstream_urls.extend(_split_list(value))
            elif key != "config":
                merged[key] = value
    return build(merged, upstream_urls)


def build(values: Mapping[str, Any], upstream_urls: list[str]) -> Config:
    """Validate raw values into a ``Config``."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in ("port",):
            kwargs[key] = _to_int("port", value, 0, 65535)
        elif key in ("max_request_bytes", "otlp_max_body", "record_max_body"):
            kwargs[key] = _to_int(key, value, 1024, 2**31)
        elif key in ("max_connections", "max_client_connections", "record_queue_size"):
            kwargs[key] = _to_int(key, value, 1, 1_000_000)
        elif key in ("header_timeout", "body_timeout", "keepalive_timeout"):
            kwargs[key] = _to_float(key, value, 0.01)
        elif key in ("grace_period", "upstream_connect_timeout", "upstream_read_timeout",
                     "otlp_shutdown_timeout"):
            kwargs[key] = _to_float(key, value, 0.0)
        elif key == "retention_days":
            kwargs[key] = _to_float(key, value, 0.01)
        elif key == "retention_max_bytes":
            kwargs[key] = _to_int(key, value, 1024 * 1024, 2**62)
        elif key == "otlp_chunk_events":
            kwargs[key] = _to_bool(key, value)
        elif key == "log_dir":
            kwargs[key] = Path(str(value))
        elif key == "default_upstream":
            kwargs[key] = Origin.parse(str(value), "default_upstream")
        elif key == "seq_url":
            url = str(value).rstrip("/")
            Origin.parse(urlsplit(url)._replace(path="").geturl(), "seq_url")
            kwargs[key] = url
        elif key == "log_level":
            level = str(value).lower()
            if level not in ("debug", "info", "warning", "error"):
                raise ConfigError(f"log_level: expected debug|info|warning|error, got {value!r}")
            kwargs[key] = level
        else:
            kwargs[key] = str(value)

    provider = kwargs.get("default_provider")
    if provider is not None and provider not in PROVIDERS:
        raise ConfigError(f"default_provider: unknown provider {provider!r} (known: "
                          f"{', '.join(PROVIDERS)})")
    if ("default_upstream" in kwargs) != ("default_provider" in kwargs):
        raise ConfigError("default_upstream and default_provider must be given together")

    origins: list[Origin] = []
    for url in upstream_urls:
        origin = Origin.parse(url)
        # A later origin for the same host:port replaces the earlier one: it fixes the scheme.
        origins = [o for o in origins if (o.host, o.port) != (origin.host, origin.port)]
        origins.append(origin)
    default = kwargs.get("default_upstream")
    if default is not None and default not in origins:
        origins.append(default)
    kwargs["upstreams"] = tuple(origins)
    return Config(**kwargs)
