"""config.py: settings, validated once."""

from __future__ import annotations

import pytest


def test_argon2_cost_is_configurable_and_validated() -> None:
    from authz_server.config import Settings
    from authz_server.errors import ConfigError

    s = Settings.from_env({"MCP_AUTHZ_ARGON2_MEMORY_KIB": "19456", "MCP_AUTHZ_ARGON2_TIME_COST": "2"})
    assert (s.argon2.memory_cost_kib, s.argon2.time_cost) == (19456, 2)
    for bad in ({"MCP_AUTHZ_ARGON2_MEMORY_KIB": "64"}, {"MCP_AUTHZ_ARGON2_TIME_COST": "x"}):
        with pytest.raises(ConfigError):
            Settings.from_env(bad)


def test_the_drain_is_configurable_and_validated() -> None:
    from authz_server.config import Settings
    from authz_server.errors import ConfigError

    assert Settings.from_env({}).drain_seconds == 2.0
    assert Settings.from_env({"MCP_AUTHZ_DRAIN_SECONDS": "0"}).drain_seconds == 0
    assert Settings.from_env({"MCP_AUTHZ_DRAIN_SECONDS": "5"}, drain_seconds=7.5).drain_seconds == 7.5  # a flag wins
    for bad in ("-1", "301", "nan", "soon"):
        with pytest.raises(ConfigError):
            Settings.from_env({"MCP_AUTHZ_DRAIN_SECONDS": bad})


def test_change_log_bounds_from_the_environment() -> None:
    from authz_server.config import Settings
    from authz_server.errors import ConfigError

    s = Settings.from_env({"MCP_AUTHZ_CHANGE_LOG_RETENTION_HOURS": "24", "MCP_AUTHZ_CHANGE_LOG_MAX_ROWS": "5000"})
    assert (s.change_log_retention_hours, s.change_log_max_rows) == (24.0, 5000)
    assert (Settings.from_env({}).change_log_retention_hours, Settings.from_env({}).change_log_max_rows) == (168.0, 100_000)
    off = Settings.from_env({"MCP_AUTHZ_CHANGE_LOG_RETENTION_HOURS": "0", "MCP_AUTHZ_CHANGE_LOG_MAX_ROWS": "0"})
    assert (off.change_log_retention_hours, off.change_log_max_rows) == (0.0, 0)
    for env, message in (({"MCP_AUTHZ_CHANGE_LOG_MAX_ROWS": "10"}, "MCP_AUTHZ_CHANGE_LOG_MAX_ROWS"),
                         ({"MCP_AUTHZ_CHANGE_LOG_MAX_ROWS": "many"}, "must be a number"),
                         ({"MCP_AUTHZ_CHANGE_LOG_RETENTION_HOURS": "0.01"}, "CHANGE_LOG_RETENTION_HOURS")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            Settings.from_env(env)


def test_the_console_listener_is_local_unless_said_otherwise() -> None:
    from authz_server.config import Settings
    from authz_server.errors import ConfigError

    assert Settings.from_env({}).console_listen == "127.0.0.1:9003"
    assert Settings.from_env({"MCP_AUTHZ_CONSOLE_LISTEN": ""}).console_listen == ""  # set but empty: off
    assert Settings.from_env({"MCP_AUTHZ_CONSOLE_LISTEN": "127.0.0.1:9300"}).console_listen == "127.0.0.1:9300"
    with pytest.raises(ConfigError, match="without TLS.*--insecure-console-listener"):
        Settings.from_env({"MCP_AUTHZ_CONSOLE_LISTEN": "0.0.0.0:9003"})
    assert Settings.from_env({}, console_listen="0.0.0.0:9003", insecure_console_listener=True).console_listen
    for bad in ("nowhere", "127.0.0.1:9002", "unix:/tmp/console.sock"):  # not HOST:PORT, or the admin listener's
        with pytest.raises(ConfigError):
            Settings.from_env({"MCP_AUTHZ_CONSOLE_LISTEN": bad})
