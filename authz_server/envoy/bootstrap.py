"""Envoy bootstrap configs as loaded dicts: point clusters and listeners.

`mcp-authz run` uses it to start Envoy on the config a platform engineer wrote, aimed at the
sidecar it starts beside it, from any working directory. Pure functions on the dict that
`yaml.safe_load` gives; loading and writing stay with the caller.
"""

from __future__ import annotations

from typing import Any

from authz_server.config import UNIX_PREFIX, parse_hostport

CHECK_CLUSTER = "mcp_authz"  # the sidecar's Check listener (Check, access log, health)
ADMIN_CLUSTER = "mcp_authz_admin"  # the sidecar's admin listener, for the /admin/ JSON route
CONSOLE_CLUSTER = "mcp_authz_console"  # the sidecar's console listener, for the /console/ route
# Envoy flags that keep its log readable: its `misc` component warns, at every start and
# validation, that the MCP filter's API is work in progress; at error it still reports errors.
QUIET_FLAGS = ("--component-log-level", "misc:error")

Config = dict[str, Any]


def cluster(config: Config, name: str) -> dict[str, Any] | None:
    """The static cluster called `name`, or None."""
    for found in config.get("static_resources", {}).get("clusters", []):
        if found.get("name") == name:
            return found  # type: ignore[no-any-return]
    return None


def address_of(listen: str) -> dict[str, Any]:
    """An Envoy `address` for a sidecar listener: `HOST:PORT` or `unix:/path`."""
    if listen.startswith(UNIX_PREFIX):
        return {"pipe": {"path": listen[len(UNIX_PREFIX) :]}}
    host, port = parse_hostport(listen, "a sidecar listener")
    return {"socket_address": {"address": host, "port_value": port}}


def point_cluster(config: Config, name: str, listen: str) -> bool:
    """Send every endpoint of cluster `name` to `listen` (`HOST:PORT` or `unix:/path`).
    Returns False when the config has no such cluster (nothing is changed)."""
    found = cluster(config, name)
    if found is None:
        return False
    for group in found.get("load_assignment", {}).get("endpoints", []):
        for endpoint in group.get("lb_endpoints", []):
            endpoint["endpoint"]["address"] = address_of(listen)
    return True


def set_listeners(config: Config, *, port: int | None = None, address: str | None = None) -> None:
    """Move every static listener to `port` and/or `address`."""
    for listener in config.get("static_resources", {}).get("listeners", []):
        socket = listener["address"]["socket_address"]
        if port is not None:
            socket["port_value"] = port
        if address is not None:
            socket["address"] = address


def set_admin(config: Config, port: int) -> None:
    """Envoy's own admin interface on `port` (its address unchanged)."""
    config["admin"]["address"]["socket_address"]["port_value"] = port
