"""envoy/bootstrap.py, and the config `mcp-authz run` hands Envoy: aimed at its sidecar, valid from any directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_server.app import _envoy_config_for
from authz_server.config import Settings
from authz_server.envoy import bootstrap
from authz_server.errors import ConfigError

REPO = Path(__file__).resolve().parents[3]
SHIPPED = REPO / "envoy" / "envoy.yaml"


def _shipped() -> dict[str, Any]:
    return yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def _endpoints(config: dict[str, Any], name: str) -> list[dict[str, Any]]:
    found = bootstrap.cluster(config, name)
    assert found is not None
    return [e["endpoint"]["address"] for g in found["load_assignment"]["endpoints"] for e in g["lb_endpoints"]]


def test_point_cluster_takes_host_port_and_unix_sockets_and_skips_absent_clusters() -> None:
    config = _shipped()
    assert bootstrap.point_cluster(config, bootstrap.CHECK_CLUSTER, "127.0.0.1:19001")
    assert _endpoints(config, "mcp_authz") == [{"socket_address": {"address": "127.0.0.1", "port_value": 19001}}]
    assert bootstrap.point_cluster(config, bootstrap.ADMIN_CLUSTER, "unix:/run/a.sock")
    assert _endpoints(config, "mcp_authz_admin") == [{"pipe": {"path": "/run/a.sock"}}]
    assert not bootstrap.point_cluster(config, "no_such_cluster", "127.0.0.1:1")
    with pytest.raises(ConfigError):
        bootstrap.address_of("nonsense")


def test_listeners_and_admin_move() -> None:
    config = _shipped()
    bootstrap.set_listeners(config, port=18000, address="0.0.0.0")
    bootstrap.set_admin(config, 18001)
    (listener,) = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 18000}
    assert config["admin"]["address"]["socket_address"]["port_value"] == 18001


def test_run_renders_a_config_that_validates_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mcp-authz run` from outside the repository: the config (its descriptor set inline) validates
    and reaches this sidecar."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = Settings(listen="127.0.0.1:19001", admin_listen="127.0.0.1:19002", console_listen="127.0.0.1:19003")
    out = _envoy_config_for(settings, SHIPPED, tmp_path)
    rendered = yaml.safe_load(out.read_text(encoding="utf-8"))
    assert _endpoints(rendered, "mcp_authz")[0]["socket_address"]["port_value"] == 19001
    assert _endpoints(rendered, "mcp_authz_admin")[0]["socket_address"]["port_value"] == 19002
    assert _endpoints(rendered, "mcp_authz_console")[0]["socket_address"]["port_value"] == 19003
    result = subprocess.run([str(Path(sys.executable).parent / "envoy"), "--mode", "validate", "-c", str(out), "--log-level", "error"],
                            capture_output=True, text=True, timeout=60, cwd=elsewhere)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_run_refuses_a_config_it_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="not a YAML mapping"):
        _envoy_config_for(settings, bad, tmp_path)
    bad.write_text("admin: [unclosed\n")
    with pytest.raises(ConfigError, match="Cannot read the Envoy config"):
        _envoy_config_for(settings, bad, tmp_path)
