"""Configuration: flags > environment > TOML file > defaults, validated into one frozen Config."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from otelproxy import open_files
from otelproxy.config import DEFAULT_UPSTREAMS, Config, Origin, load
from otelproxy.errors import ConfigError


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "otelproxy.toml"
    path.write_text(text)
    return str(path)


def urls(config: Config) -> list[str]:
    return [origin.url for origin in config.upstreams]


def test_defaults() -> None:
    """Nothing given: 127.0.0.1:8080, ./logs, DB logs/sessions.db, 32 MiB limit, the two APIs."""
    config = load({}, {})
    assert (config.host, config.port) == ("127.0.0.1", 8080)
    assert config.log_dir == Path("logs") and config.db_path == Path("logs/sessions.db")
    assert config.max_request_bytes == 32 * 1024 * 1024
    assert urls(config) == list(DEFAULT_UPSTREAMS)
    assert config.default_upstream is None and config.default_provider is None
    assert config.seq_url is None


def test_toml_file_overrides_defaults(tmp_path: Path) -> None:
    """Keys of the --config TOML file are the field names and replace the defaults."""
    path = write_toml(tmp_path, 'host = "0.0.0.0"\nport = 9001\nlog_dir = "/var/otel"\n'
                      'max-request-bytes = 4096\nupstreams = ["http://127.0.0.1:9100"]\n')
    config = load({"config": path}, {})
    assert (config.host, config.port, config.log_dir) == ("0.0.0.0", 9001, Path("/var/otel"))
    assert config.db_path == Path("/var/otel/sessions.db")
    assert config.max_request_bytes == 4096
    assert urls(config) == [*DEFAULT_UPSTREAMS, "http://127.0.0.1:9100"]


def test_environment_overrides_the_toml_file(tmp_path: Path) -> None:
    """OTELPROXY_* variables win over the TOML file; OTELPROXY_CONFIG names the file."""
    path = write_toml(tmp_path, 'host = "0.0.0.0"\nport = 9001\nlog_dir = "toml-logs"\n')
    config = load({}, {"OTELPROXY_CONFIG": path, "OTELPROXY_PORT": "9002",
                       "OTELPROXY_LOG_DIR": "env-logs"})
    assert (config.host, config.port, config.log_dir) == ("0.0.0.0", 9002, Path("env-logs"))


def test_flags_override_the_environment(tmp_path: Path) -> None:
    """Flags win over OTELPROXY_* and TOML; --config wins over OTELPROXY_CONFIG."""
    flag_file = write_toml(tmp_path, "port = 9003\n")
    env_file = tmp_path / "env.toml"
    env_file.write_text("port = 9004\nmax_connections = 7\n")
    env = {"OTELPROXY_CONFIG": str(env_file), "OTELPROXY_HOST": "10.0.0.1",
           "OTELPROXY_LOG_DIR": "env-logs"}
    config = load({"config": flag_file, "host": "::1", "log_dir": "flag-logs"}, env)
    assert (config.host, config.port, config.log_dir) == ("::1", 9003, Path("flag-logs"))
    assert config.max_connections == Config().max_connections  # env.toml was not read
    assert load({"port": "0"}, {"OTELPROXY_PORT": "9005"}).port == 0


def test_empty_environment_values_count_as_unset() -> None:
    """OTELPROXY_PORT= (empty) leaves the default in place."""
    assert load({}, {"OTELPROXY_PORT": "", "OTELPROXY_HOST": ""}).port == 8080


def test_upstreams_add_up_from_every_layer(tmp_path: Path) -> None:
    """The allowlist is built-ins + TOML + OTELPROXY_UPSTREAMS (comma list) + --upstream flags."""
    path = write_toml(tmp_path, 'upstreams = ["http://toml.example:1"]\n')
    config = load(
        {"config": path, "upstreams": ["http://flag.example:3", "https://flag2.example"]},
        {"OTELPROXY_UPSTREAMS": " http://env.example:2 , https://env2.example:8443,"},
    )
    assert urls(config) == [
        *DEFAULT_UPSTREAMS, "http://toml.example:1", "http://env.example:2",
        "https://env2.example:8443", "http://flag.example:3", "https://flag2.example",
    ]


def test_a_later_origin_for_the_same_host_and_port_replaces_the_scheme() -> None:
    """http://api.openai.com:443 given later replaces https://api.openai.com (one entry)."""
    config = load({"upstreams": ["http://api.openai.com:443"]}, {})
    assert urls(config) == ["https://api.anthropic.com", "http://api.openai.com:443"]


def test_default_upstream_from_the_environment() -> None:
    """OTELPROXY_DEFAULT_UPSTREAM/_PROVIDER set the unprefixed route and allow that origin."""
    config = load({}, {"OTELPROXY_DEFAULT_UPSTREAM": "http://127.0.0.1:9100/",
                       "OTELPROXY_DEFAULT_PROVIDER": "anthropic"})
    assert config.default_upstream == Origin("http", "127.0.0.1", 9100)
    assert config.default_provider == "anthropic"
    assert config.origin_for("127.0.0.1:9100") == config.default_upstream


def test_every_setting_is_reachable_from_the_environment() -> None:
    """Each Config field has an OTELPROXY_<NAME> variable that sets it."""
    values = {
        "host": "0.0.0.0", "port": "1", "log_dir": "d", "upstreams": "http://u:1",
        "default_upstream": "http://d:2", "default_provider": "openai",
        "max_request_bytes": "2048", "grace_period": "1.5", "upstream_connect_timeout": "2",
        "upstream_read_timeout": "3", "max_connections": "4", "record_queue_size": "5",
        "record_max_body": "4096", "seq_url": "http://seq:5341", "seq_api_key": "k",
        "otlp_max_body": "1024",
        "otlp_chunk_events": "true", "otlp_shutdown_timeout": "2.5", "log_level": "debug",
        "retention_days": "7", "retention_max_bytes": str(2**30),
        "max_client_connections": "6", "header_timeout": "7", "body_timeout": "8",
        "keepalive_timeout": "9",
    }
    fields = {f.name for f in dataclasses.fields(Config)}
    assert set(values) == fields
    config = load({}, {f"OTELPROXY_{name.upper()}": value for name, value in values.items()})
    assert config.port == 1 and config.grace_period == 1.5 and config.otlp_chunk_events is True
    assert config.seq_url == "http://seq:5341" and config.log_level == "debug"
    assert config.retention_days == 7 and config.retention_max_bytes == 2**30
    assert config.otlp_shutdown_timeout == 2.5
    assert config.record_max_body == 4096
    assert "http://u:1" in urls(config) and config.default_provider == "openai"
    assert (config.max_connections, config.max_client_connections) == (4, 6)
    assert (config.header_timeout, config.body_timeout, config.keepalive_timeout) == (7, 8, 9)


def test_config_is_frozen() -> None:
    """A built Config cannot be changed afterwards."""
    config = load({}, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("flags", "env", "toml", "fragment"),
    [
        ({"port": "70000"}, {}, None, "port: 70000 is out of range"),
        ({"port": "-1"}, {}, None, "port: -1 is out of range"),
        ({}, {"OTELPROXY_PORT": "eighty"}, None, "port: expected an integer"),
        ({}, {}, "port = 65536\n", "port: 65536 is out of range"),
        ({"upstreams": ["api.example.com"]}, {}, None, "malformed URL 'api.example.com'"),
        ({}, {"OTELPROXY_UPSTREAMS": "http://ok:1,http://bad:port"}, None, "malformed URL"),
        ({"upstreams": ["http://h:1/v1"]}, {}, None, "must be an origin"),
        ({"default_upstream": "ftp://h", "default_provider": "openai"}, {}, None,
         "default_upstream: malformed URL"),
        ({"default_upstream": "http://h:1"}, {}, None, "must be given together"),
        ({"default_upstream": "http://h:1", "default_provider": "gemini"}, {}, None,
         "unknown provider 'gemini'"),
        ({"max_request_bytes": "12"}, {}, None, "max_request_bytes: 12 is out of range"),
        ({"grace_period": "-1"}, {}, None, "grace_period: -1.0 must be >= 0"),
        ({"header_timeout": "0"}, {}, None, "header_timeout: 0.0 must be >= 0.01"),
        ({}, {"OTELPROXY_MAX_CLIENT_CONNECTIONS": "0"}, None,
         "max_client_connections: 0 is out of range"),
        ({}, {}, "keepalive_timeout = 'long'\n", "keepalive_timeout: expected a number"),
        ({}, {"OTELPROXY_OTLP_CHUNK_EVENTS": "maybe"}, None, "expected true/false"),
        ({"log_level": "loud"}, {}, None, "log_level: expected debug|info|warning|error"),
        ({}, {}, "port = [\n", "invalid TOML"),
        ({}, {}, "colour = 'blue'\n", "unknown key(s) colour"),
    ],
)
def test_invalid_values_are_one_line_config_errors(
    tmp_path: Path, flags: dict[str, Any], env: dict[str, str], toml: str | None, fragment: str
) -> None:
    """Each bad value raises ConfigError whose message is one line naming the problem."""
    if toml is not None:
        flags = {**flags, "config": write_toml(tmp_path, toml)}
    with pytest.raises(ConfigError) as raised:
        load(flags, env)
    message = str(raised.value)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_an_unreadable_config_file_is_a_config_error(tmp_path: Path, kind: str) -> None:
    """--config naming a missing file or a directory → ConfigError 'cannot read'."""
    path = tmp_path / "nope.toml"
    if kind == "directory":
        path.mkdir()
    with pytest.raises(ConfigError, match="cannot read"):
        load({"config": str(path)}, {})


def test_origin_names_its_default_port_implicitly() -> None:
    """Origin.parse lower-cases the host and fills the scheme's port; authority omits it."""
    origin = Origin.parse("HTTPS://API.Anthropic.com")
    assert origin == Origin("https", "api.anthropic.com", 443)
    assert (origin.authority, origin.url) == ("api.anthropic.com", "https://api.anthropic.com")
    assert Origin.parse("http://127.0.0.1:9100").authority == "127.0.0.1:9100"


def test_connection_limits_default_to_the_open_file_budget() -> None:
    """Without a setting, both connection limits are (soft open-file limit - 128) / 2, capped at
    10000, so 1000 streams fit in a limit of 20000 and a limit of 1024 refuses rather than
    running out of descriptors."""
    budget = open_files.connection_budget()
    assert budget == min(10_000, (open_files.soft_limit() - 128) // 2)
    config = load({}, {})
    assert config.max_client_connections == config.max_connections == budget
    assert open_files.connection_budget(1024) == 448
    assert open_files.connection_budget(20_000) == 9936
    assert open_files.connection_budget(1 << 20) == 10_000
