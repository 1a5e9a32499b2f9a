"""The shipped envoy/envoy.yaml validates and says what DESIGN.md requires; the snippet matches it."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from authz_server.config import Settings

from .harness import (
    ADMIN_ROUTE,
    AUTHZ_ADMIN_CLUSTER,
    AUTHZ_CLUSTER,
    AUTHZ_CONSOLE_CLUSTER,
    EXT_AUTHZ_FILTER,
    MCP_FILTER,
    REPO_ROOT,
    SHIPPED_ENVOY_YAML,
    TRANSCODER_FILTER,
    _hcm,
    envoy_binary,
    mcp_routes,
    render_envoy_config,
)

SNIPPET_YAML = REPO_ROOT / "envoy" / "snippet.yaml"
ADMIN_JSON_FILTER = "mcp_authz.admin_json_fields"
CONSOLE_ROUTE = "console"
GRPC_ACCESS_LOG = "envoy.access_loggers.http_grpc"


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


def mcp_filter(hcm: dict[str, Any]) -> dict[str, Any]:
    (flt,) = [f for f in hcm["http_filters"] if f["name"] == MCP_FILTER]
    return flt


def transcoder_filter(hcm: dict[str, Any]) -> dict[str, Any]:
    (flt,) = [f for f in hcm["http_filters"] if f["name"] == TRANSCODER_FILTER]
    return flt


def admin_route(hcm: dict[str, Any]) -> dict[str, Any]:
    (route,) = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r["name"] == ADMIN_ROUTE]
    return route


def console_route(hcm: dict[str, Any]) -> dict[str, Any]:
    (route,) = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r["name"] == CONSOLE_ROUTE]
    return route


def grpc_access_log(hcm: dict[str, Any]) -> dict[str, Any]:
    (log,) = [a for a in hcm["access_log"] if a["name"] == GRPC_ACCESS_LOG]
    return log


def _seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


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

    # The MCP filter, then ext_authz (fed the MCP metadata), the admin API's JSON field check and
    # its transcoder, the router.
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == [MCP_FILTER, EXT_AUTHZ_FILTER, ADMIN_JSON_FILTER, TRANSCODER_FILTER, "envoy.filters.http.router"]
    # The field check: off by default, whole bodies to the sidecar's admin listener, fails closed.
    (fields,) = [f for f in hcm["http_filters"] if f["name"] == ADMIN_JSON_FILTER]
    assert fields["disabled"] is True
    fc = fields["typed_config"]
    assert fc["grpc_service"]["envoy_grpc"] == {"cluster_name": AUTHZ_ADMIN_CLUSTER}
    assert fc["with_request_body"]["allow_partial_message"] is False and fc["failure_mode_allow"] is False

    # The transcoder is off by default and on for the admin route only, which skips ext_authz
    # (the admin API authenticates keys itself) and the MCP filter, and goes to the sidecar.
    transcoder = transcoder_filter(hcm)
    assert transcoder["disabled"] is True
    tc = transcoder["typed_config"]
    # The descriptor set is inline (no file for Envoy to find); tests/unit/repo/test_protos.py checks it is current.
    assert "proto_descriptor" not in tc and tc["proto_descriptor_bin"]
    assert tc["services"] == ["mcp_authz.admin.v1.Admin"]
    assert tc["match_incoming_request_route"] is True and tc["convert_grpc_status"] is True
    assert tc["request_validation_options"] == {"reject_unknown_method": True, "reject_unknown_query_parameters": True}
    admin = admin_route(hcm)
    assert admin["match"] == {"prefix": "/admin/"}
    # The JSON admin API goes to the sidecar's admin listener, never to the Check listener.
    assert admin["route"]["cluster"] == AUTHZ_ADMIN_CLUSTER != AUTHZ_CLUSTER
    admin_cluster = cluster(config, AUTHZ_ADMIN_CLUSTER)
    admin_options = admin_cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert admin_options["explicit_http_config"] == {"http2_protocol_options": {}}
    admin_address = admin_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert admin_address == {"socket_address": {"address": "127.0.0.1", "port_value": 9002}}
    # Header names with underscores never reach Check or an upstream (x_user_id as x-user-id).
    assert hcm["common_http_protocol_options"] == {"headers_with_underscores_action": "DROP_HEADER"}
    per_filter = admin["typed_per_filter_config"]
    assert per_filter[TRANSCODER_FILTER] == {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}
    assert per_filter[ADMIN_JSON_FILTER] == per_filter[TRANSCODER_FILTER]  # enabled on this route only
    assert all(ADMIN_JSON_FILTER not in r.get("typed_per_filter_config", {}) for r in mcp_routes(config))
    assert per_filter[EXT_AUTHZ_FILTER]["disabled"] is True
    assert per_filter[MCP_FILTER]["disabled"] is True
    assert all(TRANSCODER_FILTER not in r.get("typed_per_filter_config", {}) for r in mcp_routes(config))
    mcp = mcp_filter(hcm)["typed_config"]
    assert mcp["traffic_mode"] == "PASS_THROUGH"  # never rejects traffic itself
    assert mcp["max_request_body_size"] == 65536
    assert mcp["request_storage_mode"] == "DYNAMIC_METADATA"
    assert mcp["reject_duplicate_keys"] is True  # flags only, in PASS_THROUGH
    assert not mcp.get("clear_route_cache", False)

    # ext_authz fails closed with 503 and sends only the needed headers and the MCP metadata.
    authz = ext_authz_filter(hcm)["typed_config"]
    assert authz["metadata_context_namespaces"] == [MCP_FILTER]
    assert authz["transport_api_version"] == "V3"
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == AUTHZ_CLUSTER
    assert authz["grpc_service"]["timeout"] == "2s"
    # A Check no sidecar answered is asked of another (graceful drain, rolling restarts): only
    # failures before any answer, never a decision (those come with gRPC OK), on another host.
    retry = authz["grpc_service"]["retry_policy"]
    assert set(retry["retry_on"].split(",")) == {"connect-failure", "refused-stream", "reset", "unavailable"}
    assert retry["num_retries"] == 2 and retry["host_selection_retry_max_attempts"] == 3
    assert [p["name"] for p in retry["retry_host_predicate"]] == ["envoy.retry_host_predicates.previous_hosts"]
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

    # Access logs: the stdout line (no path, no headers) and the sidecar's access-log service.
    stdout, grpc_log = hcm["access_log"]
    assert stdout["name"] == "envoy.access_loggers.stdout"
    line = stdout["typed_config"]["log_format"]["text_format_source"]["inline_string"]
    assert re.findall(r"%REQ\(([^)]*)\)%", line) == [":METHOD", "X-REQUEST-ID"] and "PATH" not in line
    assert grpc_log == grpc_access_log(hcm)
    als = grpc_log["typed_config"]
    assert set(als) == {"@type", "common_config"}  # no extra headers logged
    common = als["common_config"]
    assert common["log_name"] == "mcp_authz_usage"
    assert common["transport_api_version"] == "V3"
    assert common["grpc_service"] == {"envoy_grpc": {"cluster_name": AUTHZ_CLUSTER}}  # no stream timeout
    assert common["buffer_flush_interval"] == "0.5s"
    assert common["buffer_size_bytes"] == 65536

    # The sidecar cluster speaks HTTP/2, declared explicitly, and is health-checked over gRPC,
    # failing closed (no panic routing) when no sidecar is healthy.
    authz_cluster = cluster(config, AUTHZ_CLUSTER)
    options = authz_cluster["typed_extension_protocol_options"]
    http_options = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert http_options["explicit_http_config"] == {"http2_protocol_options": {}}
    (health,) = authz_cluster["health_checks"]
    assert health["grpc_health_check"] == {"service_name": ""}
    assert (health["interval"], health["timeout"], health["no_traffic_interval"]) == ("1s", "1s", "1s")
    assert (health["unhealthy_threshold"], health["healthy_threshold"]) == (2, 1)
    assert authz_cluster["common_lb_config"] == {"healthy_panic_threshold": {"value": 0}}
    # Retries are not capped at Envoy's default 3 in flight, so a replica dying under load costs nothing.
    assert authz_cluster["circuit_breakers"] == {"thresholds": [{"max_retries": 1000}]}
    # The sidecar's default drain outlasts a health-check interval plus its jitter: Envoy sees
    # NOT_SERVING before the sidecar stops answering.
    assert Settings().drain_seconds > _seconds(health["interval"]) + _seconds(health["interval_jitter"])

    # Routes: the admin API, the console, the demo MCP route, then a 404 catch-all; only the admin API
    # and the console (each authenticated by the sidecar itself) and the catch-all skip ext_authz.
    console = console_route(hcm)
    assert console["match"] == {"path_separated_prefix": "/console"}
    assert console["route"]["cluster"] == AUTHZ_CONSOLE_CLUSTER
    assert console["typed_per_filter_config"][MCP_FILTER]["disabled"] is True
    console_address = cluster(config, AUTHZ_CONSOLE_CLUSTER)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert console_address["endpoint"]["address"] == {"socket_address": {"address": "127.0.0.1", "port_value": 9003}}
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    (demo,) = mcp_routes(config)
    assert demo["match"] == {"path_separated_prefix": "/mcp/demo"}
    assert demo["route"] == {"cluster": "mcp_example", "timeout": "0s"}
    catch_all = routes[-1]
    assert catch_all["match"] == {"prefix": "/"}
    assert catch_all["direct_response"]["status"] == 404
    disabled = [r for r in routes if r.get("typed_per_filter_config", {}).get(EXT_AUTHZ_FILTER, {}).get("disabled")]
    assert disabled == [admin, console, catch_all]
    assert all("direct_response" in r or r in mcp_routes(config) or r is admin or r is console for r in routes)


def test_snippet_parses_and_matches_the_shipped_config() -> None:
    snippet = load(SNIPPET_YAML)
    shipped = load(SHIPPED_ENVOY_YAML)

    assert snippet["http_filters"] == [mcp_filter(_hcm(shipped)), ext_authz_filter(_hcm(shipped))]
    assert snippet["access_log"] == [grpc_access_log(_hcm(shipped))]
    (authz_cluster,) = snippet["clusters"]
    assert authz_cluster == cluster(shipped, AUTHZ_CLUSTER)
    (route,) = snippet["routes"]
    per_route = route["typed_per_filter_config"][EXT_AUTHZ_FILTER]
    assert per_route["check_settings"]["context_extensions"]["mcp_server"] == "github"
    assert route["match"] == {"path_separated_prefix": "/mcp/github"}
    assert snippet["unchecked_route_example"]["typed_per_filter_config"][EXT_AUTHZ_FILTER]["disabled"] is True
    # The optional admin API piece: the transcoder filter, its route and cluster, exactly as shipped.
    (fields,) = [f for f in _hcm(shipped)["http_filters"] if f["name"] == ADMIN_JSON_FILTER]
    assert snippet["admin_api_filter"] == [fields, transcoder_filter(_hcm(shipped))]
    assert snippet["admin_api_route"] == [admin_route(_hcm(shipped))]
    (metadata_route,) = [r for r in _hcm(shipped)["route_config"]["virtual_hosts"][0]["routes"]
                         if r["name"] == "resource_metadata"]  # fmt: skip
    assert snippet["resource_metadata_route"] == [metadata_route]
    assert snippet["admin_api_cluster"] == [cluster(shipped, AUTHZ_ADMIN_CLUSTER)]
    assert snippet["console_route"] == [console_route(_hcm(shipped))]
    assert snippet["console_cluster"] == [cluster(shipped, AUTHZ_CONSOLE_CLUSTER)]
    # The HCM setting for header names with underscores, as shipped.
    hcm_piece = snippet["http_connection_manager"]
    assert hcm_piece["common_http_protocol_options"] == _hcm(shipped)["common_http_protocol_options"]
    # The mutual-TLS cluster (3b) is the shipped cluster plus a transport socket, for a sidecar on another host.
    (mtls,) = snippet["mtls_clusters"]
    plain = {k: v for k, v in mtls.items() if k not in ("transport_socket", "type", "load_assignment")}
    assert plain == {k: v for k, v in cluster(shipped, AUTHZ_CLUSTER).items() if k not in ("type", "load_assignment")}
    tls = mtls["transport_socket"]["typed_config"]
    assert tls["common_tls_context"]["alpn_protocols"] == ["h2"]
    assert tls["common_tls_context"]["tls_certificates"] and tls["common_tls_context"]["validation_context"]["trusted_ca"]


@pytest.mark.e2e
def test_snippet_pasted_into_a_minimal_config_validates(tmp_path: Path) -> None:
    snippet = load(SNIPPET_YAML)
    upstream = copy.deepcopy(snippet["clusters"][0])
    upstream["name"] = upstream["load_assignment"]["cluster_name"] = snippet["routes"][0]["route"]["cluster"]
    for key in ("typed_extension_protocol_options", "health_checks", "common_lb_config"):
        del upstream[key]
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
                            **snippet["http_connection_manager"],
                            "access_log": snippet["access_log"],
                            "route_config": {"virtual_hosts": [{
                                "name": "all", "domains": ["*"],
                                "routes": [
                                    *snippet["admin_api_route"],
                                    *snippet["console_route"],
                                    *snippet["routes"],
                                    {"match": {"prefix": "/healthz"}, "direct_response": {"status": 200},
                                     **snippet["unchecked_route_example"]},
                                ],
                            }]},
                            "http_filters": [
                                *snippet["http_filters"],
                                *snippet["admin_api_filter"],
                                {"name": "envoy.filters.http.router", "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                            ],
                        },
                    }]}],
                }
            ],
            "clusters": [*snippet["clusters"], *snippet["admin_api_cluster"], *snippet["console_cluster"], upstream],
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
    assert [r["name"] for r in routes] == [ADMIN_ROUTE, CONSOLE_ROUTE, "resource_metadata", "mcp_demo", "mcp_github",
                                           "mcp_linear", "not_found"]  # fmt: skip
    assert routes[0] == admin_route(_hcm(shipped)) and routes[1] == console_route(_hcm(shipped))
    for route, name in zip(routes[3:], ["demo", "github", "linear"], strict=False):
        assert route["match"] == {"path_separated_prefix": f"/mcp/{name}"}
        ext = route["typed_per_filter_config"][EXT_AUTHZ_FILTER]["check_settings"]["context_extensions"]
        assert ext == {"mcp_server": name}
    assert cluster(rendered, AUTHZ_CLUSTER)["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"][
        "address"
    ]["socket_address"]["port_value"] == 20002

    # Everything but ports and MCP routes is as shipped; the access log needs no port of its own
    # (it uses the authz cluster).
    assert _hcm(rendered)["http_filters"] == _hcm(shipped)["http_filters"]
    assert _hcm(rendered)["access_log"] == _hcm(shipped)["access_log"]
    rendered_authz, shipped_authz = cluster(rendered, AUTHZ_CLUSTER), cluster(shipped, AUTHZ_CLUSTER)
    assert rendered_authz["health_checks"] == shipped_authz["health_checks"]
    assert rendered_authz["common_lb_config"] == shipped_authz["common_lb_config"]
    assert routes[-1] == _hcm(shipped)["route_config"]["virtual_hosts"][0]["routes"][-1]

    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
