"""Benchmark Envoy configurations, derived from the shipped `envoy/envoy.yaml` so they stay in sync.

The shipped file is loaded with PyYAML and edited, never copied by hand:

- ports: admin, listener and the `mcp_authz` cluster go to 127.0.0.1 free ports;
- the shipped MCP route is the template for one route at `/mcp/<server>` whose
  `context_extensions.mcp_server` is `<server>`. For the auth-cost configurations its action
  becomes a `direct_response` (200, tiny body), so no upstream is involved and only the
  auth cost is measured. For D it keeps routing to the example MCP server;
- the auth filter is what the configuration compares:
    `none`       A: the shipped chain without ext_authz (the MCP filter and router stay);
    `api_key`    B: Envoy's native api_key_auth filter in ext_authz's place;
    `ext_authz`  C0/C: the shipped ext_authz filter, to one or more sidecar endpoints;
- `als`: keep the shipped gRPC access log to the sidecar (usage attribution), or drop it.

Other routes (the catch-all 404, the admin API's JSON route) are kept as shipped; they see no
benchmark traffic.

Everything else (HCM settings, the MCP filter, health checks on the sidecar cluster, the
stdout access log, local_reply_config) is as shipped.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from benchmarks.procs import LOOPBACK, REPO_ROOT, free_port

SHIPPED = REPO_ROOT / "envoy" / "envoy.yaml"
HCM = "envoy.filters.network.http_connection_manager"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
API_KEY_AUTH = "envoy.filters.http.api_key_auth"
GRPC_ACCESS_LOG = "envoy.access_loggers.http_grpc"
AUTHZ_CLUSTER = "mcp_authz"
UPSTREAM_CLUSTER = "mcp_example"
DIRECT_BODY = "ok\n"

AuthKind = Literal["none", "api_key", "ext_authz"]


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for flt in chain["filters"]:
                if flt["name"] == HCM:
                    typed: dict[str, Any] = flt["typed_config"]
                    return typed
    raise ValueError("no http_connection_manager in envoy/envoy.yaml")


def _mcp_server_of(route: dict[str, Any]) -> str | None:
    per_filter = route.get("typed_per_filter_config", {}).get(EXT_AUTHZ, {})
    return per_filter.get("check_settings", {}).get("context_extensions", {}).get("mcp_server")


def _endpoints(ports: Sequence[int]) -> list[dict[str, Any]]:
    return [
        {"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": LOOPBACK, "port_value": p}}}} for p in ports
        ]}
    ]


def _routed_to(hcm: dict[str, Any], cluster: str) -> bool:
    return any(r.get("route", {}).get("cluster") == cluster
               for vhost in hcm["route_config"]["virtual_hosts"] for r in vhost["routes"])  # fmt: skip


def _api_key_filter(credentials: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """Envoy's api_key_auth (v3): keys from `Authorization: Bearer`, the client id forwarded in
    `x-client-id` and the key removed before the upstream, the closest native equivalent of ours."""
    return {
        "name": API_KEY_AUTH,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
            "credentials": [{"key": key, "client": client} for key, client in credentials],
            "key_sources": [{"header": "authorization"}],
            "forwarding": {"header": "x-client-id", "hide_credentials": True},
        },
    }


def derive(
    *,
    auth: AuthKind,
    listen_port: int,
    admin_port: int,
    server: str = "bench",
    authz_ports: Sequence[int] = (),
    als: bool = True,
    upstream_port: int | None = None,
    api_keys: Sequence[tuple[str, str]] = (),
    source: Path = SHIPPED,
) -> dict[str, Any]:
    """The shipped config, edited as the module docstring says. `upstream_port=None` makes the
    MCP route a direct_response; otherwise it routes to the example server on that port."""
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    config["admin"]["address"]["socket_address"].update(address=LOOPBACK, port_value=admin_port)
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"].update(address=LOOPBACK, port_value=listen_port)
    hcm = _hcm(config)

    # One MCP route, from the shipped one.
    for vhost in hcm["route_config"]["virtual_hosts"]:
        templates = [i for i, r in enumerate(vhost["routes"]) if _mcp_server_of(r) is not None]
        if not templates:
            continue
        route = copy.deepcopy(vhost["routes"][templates[0]])
        route["name"] = f"mcp_{server}"
        route["match"] = {"path_separated_prefix": f"/mcp/{server}"}
        route["typed_per_filter_config"][EXT_AUTHZ]["check_settings"]["context_extensions"]["mcp_server"] = server
        if upstream_port is None:
            route.pop("route", None)
            route["direct_response"] = {"status": 200, "body": {"inline_string": DIRECT_BODY}}
        else:
            route["route"]["cluster"] = UPSTREAM_CLUSTER
        kept = [r for i, r in enumerate(vhost["routes"]) if i not in templates]
        vhost["routes"] = kept[: templates[0]] + [route] + kept[templates[0] :]
        if auth != "ext_authz":  # no ext_authz filter: drop its per-route settings too
            for r in vhost["routes"]:
                r.get("typed_per_filter_config", {}).pop(EXT_AUTHZ, None)
                if not r.get("typed_per_filter_config", True):
                    r.pop("typed_per_filter_config")

    # The auth filter.
    filters = hcm["http_filters"]
    index = next(i for i, f in enumerate(filters) if f["name"] == EXT_AUTHZ)
    if auth == "none":
        del filters[index]
    elif auth == "api_key":
        filters[index] = _api_key_filter(api_keys)

    # Usage attribution (the gRPC access log to the sidecar).
    uses_sidecar = auth == "ext_authz"
    if not (als and uses_sidecar):
        hcm["access_log"] = [a for a in hcm.get("access_log", []) if a["name"] != GRPC_ACCESS_LOG]

    clusters = config["static_resources"]["clusters"]
    for cluster in list(clusters):
        if cluster["name"] == AUTHZ_CLUSTER:
            if uses_sidecar:
                cluster["load_assignment"]["endpoints"] = _endpoints(authz_ports)
            elif _routed_to(hcm, AUTHZ_CLUSTER):
                # Other routes (the admin API) still name the cluster: keep it, pointed at a port
                # nothing listens on, without health checks, so it costs nothing here.
                cluster.pop("health_checks", None)
                cluster["load_assignment"]["endpoints"] = _endpoints([free_port()])
            else:
                clusters.remove(cluster)
        elif cluster["name"] == UPSTREAM_CLUSTER:
            if upstream_port is None:
                clusters.remove(cluster)
            else:
                cluster["load_assignment"]["endpoints"] = _endpoints([upstream_port])
    return config


def write(config: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path
