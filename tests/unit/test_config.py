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
