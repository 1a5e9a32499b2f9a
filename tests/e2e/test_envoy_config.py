"""The shipped envoy/envoy.yaml validates and says what DESIGN.md requires; the snippet matches it."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .harness import (
    AUTHZ_CLUSTER,
    EXT_AUTHZ_FILTER,
    REPO_ROOT,
    SHIPPED_ENVOY_YAML,
    _hcm,
    envoy_binary,
    mcp_routes,
    render_envoy_config,
)

SNIPPET_YAML = REPO_ROOT / "envoy" / "snippet.yaml"


def envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``envoy --mode validate -c path``."""
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def load(path: Path) -> dict[str, Any]:
    return dict(yaml.safe_load(path.read_text(encoding="utf-8")))


def ext_authz_filter(hcm: dict[str, Any]) -> dict[str, Any]:
    (flt,) = [f for f in hcm["http_filters"] if f["name"] == EXT_AUTHZ_FILTER]
    return flt


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return found


@pytest.mark.e2e
def test_shipped_config_validates() -> None:
    result = envoy_validate(SHIPPED_ENVOY_YAML)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_no_init_py_in_envoy_dir() -> None:
    # It would shadow the xds-protos `envoy` package for anything run from the repo root.
    assert not (REPO_ROOT / "envoy" / "__init__.py").exists()


def test_shipped_config_contract() -> None:
    config = load(SHIPPED_ENVOY_YAML)
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 9901}
    (listener,) = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 10000}
    hcm = _hcm(config)
    assert hcm["generate_request_id"] is True

    # ext_authz runs before the router, fails closed with 503, sends only the needed headers.
    names = [f["name"] for f in hcm["http_filters"]]
    assert names.index(EXT_AUTHZ_FILTER) < names.index("envoy.filters.http.router")
    authz = ext_authz_filter(hcm)["typed_config"]
    assert authz["transport_api_version"] == "V3"
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == AUTHZ_CLUSTER
    assert authz["grpc_service"]["timeout"] == "2s"
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    (mapper,) = hcm["local_reply_config"]["mappers"]  # a JSON body for that 503
    assert mapper["body_format_override"]["content_type"] == "application/json"
    allowed = {p["exact"] for p in authz["allowed_headers"]["patterns"]}
    assert allowed == {
        "x-request-id", "authorization", "x-api-key",
        "x-user-id", "x-user-type", "x-user-team", "x-user-roles",
        "x-mcp-authz-signature", "x-mcp-authz-timestamp",
    }  # fmt: skip

    # The sidecar cluster speaks HTTP/2, declared explicitly.
    options = cluster(config, AUTHZ_CLUSTER)["typed_extension_protocol_options"]
    http_options = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert http_options["explicit_http_config"] == {"http2_protocol_options": {}}

    # Routes: the demo MCP route, then a 404 catch-all; only the catch-all skips ext_authz.
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (demo,) = mcp_routes(config)
    assert demo["match"] == {"path_separated_prefix": "/mcp/demo"}
    assert demo["route"] == {"cluster": "mcp_example", "timeout": "0s"}
    catch_all = routes[-1]
    assert catch_all["match"] == {"prefix": "/"}
    assert catch_all["direct_response"]["status"] == 404
    disabled = [r for r in routes if r.get("typed_per_filter_config", {}).get(EXT_AUTHZ_FILTER, {}).get("disabled")]
    assert disabled == [catch_all]
    assert all("direct_response" in r or r in mcp_routes(config) for r in routes)


def test_snippet_parses_and_matches_the_shipped_config() -> None:
    snippet = load(SNIPPET_YAML)
    shipped = load(SHIPPED_ENVOY_YAML)

    (flt,) = snippet["http_filters"]
    assert flt == ext_authz_filter(_hcm(shipped))
    (authz_cluster,) = snippet["clusters"]
    assert authz_cluster == cluster(shipped, AUTHZ_CLUSTER)
    (route,) = snippet["routes"]
    per_route = route["typed_per_filter_config"][EXT_AUTHZ_FILTER]
    assert per_route["check_settings"]["context_extensions"]["mcp_server"] == "github"
    assert route["match"] == {"path_separated_prefix": "/mcp/github"}
    assert snippet["unchecked_route_example"]["typed_per_filter_config"][EXT_AUTHZ_FILTER]["disabled"] is True


@pytest.mark.e2e
def test_snippet_pasted_into_a_minimal_config_validates(tmp_path: Path) -> None:
    snippet = load(SNIPPET_YAML)
    upstream = copy.deepcopy(snippet["clusters"][0])
    upstream["name"] = upstream["load_assignment"]["cluster_name"] = snippet["routes"][0]["route"]["cluster"]
    del upstream["typed_extension_protocol_options"]
    config = {
        "static_resources": {
            "listeners": [
                {
                    "name": "existing",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                    "filter_chains": [{"filters": [{
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "existing",
                            "route_config": {"virtual_hosts": [{
                                "name": "all", "domains": ["*"],
                                "routes": [
                                    *snippet["routes"],
                                    {"match": {"prefix": "/healthz"}, "direct_response": {"status": 200},
                                     **snippet["unchecked_route_example"]},
                                ],
                            }]},
                            "http_filters": [
                                *snippet["http_filters"],
                                {"name": "envoy.filters.http.router", "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                            ],
                        },
                    }]}],
                }
            ],
            "clusters": [*snippet["clusters"], upstream],
        }
    }  # fmt: skip
    path = tmp_path / "pasted.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e
def test_rendered_config_has_one_route_per_server_and_validates(tmp_path: Path) -> None:
    path = render_envoy_config(
        tmp_path, listen_port=20000, admin_port=20001, authz_port=20002, upstream_port=20003,
        servers=["demo", "github", "linear"],
    )  # fmt: skip
    rendered, shipped = load(path), load(SHIPPED_ENVOY_YAML)

    routes = _hcm(rendered)["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["name"] for r in routes] == ["mcp_demo", "mcp_github", "mcp_linear", "not_found"]
    for route, name in zip(routes, ["demo", "github", "linear"], strict=False):
        assert route["match"] == {"path_separated_prefix": f"/mcp/{name}"}
        ext = route["typed_per_filter_config"][EXT_AUTHZ_FILTER]["check_settings"]["context_extensions"]
        assert ext == {"mcp_server": name}
    assert cluster(rendered, AUTHZ_CLUSTER)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"
    ]["socket_address"]["port_value"] == 20002

    # Everything but ports and MCP routes is as shipped.
    assert ext_authz_filter(_hcm(rendered)) == ext_authz_filter(_hcm(shipped))
    assert routes[-1] == _hcm(shipped)["route_config"]["virtual_hosts"][0]["routes"][-1]

    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
