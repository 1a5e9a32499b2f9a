"""Render envoy/envoy.yaml for a sidecar on another host, reached over mutual TLS.

    python envoy/mtls.py --sidecar authz.internal:9001 --certs /etc/mcp-authz/certs \\
        [--admin authz.internal:9002] [--listen 0.0.0.0] > envoy-mtls.yaml

The Check cluster (`mcp_authz`) becomes envoy/snippet.yaml's piece 3b: Envoy presents
`client.crt` and accepts the sidecar only if its certificate chains to `ca.crt` and names
the sidecar's host. With `--admin`, the JSON admin route goes to the sidecar's admin
listener over TLS, verified against the same CA. Everything else stays as shipped. The
certificates come from `mcp-authz certs create --out DIR --host <the sidecar's host>`; the
sidecar runs `mcp-authz serve --listen 0.0.0.0:9001 --tls-cert DIR/server.crt --tls-key
DIR/server.key --client-ca DIR/ca.crt`. docker-compose.yml's `mtls` profile runs exactly this.
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
CHECK_CLUSTER, ADMIN_CLUSTER = "mcp_authz", "mcp_authz_admin"
_TLS_SOCKET = "envoy.transport_sockets.tls"
_UPSTREAM_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise SystemExit(f"error: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _point(cluster: dict[str, Any], host: str, port: int) -> None:
    cluster["type"] = "STATIC" if _is_ip(host) else "STRICT_DNS"
    for group in cluster["load_assignment"]["endpoints"]:
        for endpoint in group["lb_endpoints"]:
            endpoint["endpoint"]["address"] = {"socket_address": {"address": host, "port_value": port}}


def _verify(context: dict[str, Any], ca: Path, name: str) -> None:
    """Accept the sidecar only with a certificate from `ca` that names `name`."""
    context["validation_context"] = {
        "trusted_ca": {"filename": str(ca)},
        "match_typed_subject_alt_names": [
            {"san_type": "IP_ADDRESS" if _is_ip(name) else "DNS", "matcher": {"exact": name}}
        ],
    }


def apply(config: dict[str, Any], *, sidecar: str, certs: Path, server_name: str | None = None,
          admin: str | None = None, listen: str | None = None,
          snippet: Path = HERE / "snippet.yaml") -> dict[str, Any]:  # fmt: skip
    """Change a loaded envoy.yaml in place (and return it): see the module docstring.
    `server_name`: the name the sidecar's certificate holds (default: the sidecar's host)."""
    host, port = _host_port(sidecar)
    name = server_name or host
    (check,) = copy.deepcopy(yaml.safe_load(snippet.read_text(encoding="utf-8"))["mtls_clusters"])
    _point(check, host, port)
    tls = check["transport_socket"]["typed_config"]
    tls["sni"] = name
    context = tls["common_tls_context"]
    context["tls_certificates"] = [
        {"certificate_chain": {"filename": str(certs / "client.crt")}, "private_key": {"filename": str(certs / "client.key")}}
    ]
    _verify(context, certs / "ca.crt", name)
    clusters = config["static_resources"]["clusters"]
    clusters[:] = [check if c["name"] == CHECK_CLUSTER else c for c in clusters]
    if admin is not None:
        admin_host, admin_port = _host_port(admin)
        (admin_cluster,) = [c for c in clusters if c["name"] == ADMIN_CLUSTER]
        _point(admin_cluster, admin_host, admin_port)
        admin_context: dict[str, Any] = {"alpn_protocols": ["h2"]}
        _verify(admin_context, certs / "ca.crt", server_name or admin_host)
        admin_cluster["transport_socket"] = {
            "name": _TLS_SOCKET,
            "typed_config": {"@type": _UPSTREAM_TLS, "sni": server_name or admin_host, "common_tls_context": admin_context},
        }
    if listen is not None:
        for listener in config["static_resources"]["listeners"]:
            listener["address"]["socket_address"]["address"] = listen
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="envoy/mtls.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sidecar", required=True, metavar="HOST:PORT", help="the sidecar's Check listener")
    parser.add_argument("--certs", required=True, type=Path, metavar="DIR",
                        help="ca.crt, client.crt and client.key, as 'mcp-authz certs create' writes them")
    parser.add_argument("--server-name", help="the name in the sidecar's certificate (default: its host)")
    parser.add_argument("--admin", metavar="HOST:PORT", help="the sidecar's admin listener, served over TLS")
    parser.add_argument("--listen", metavar="ADDRESS", help="Envoy's listener address (e.g. 0.0.0.0)")
    parser.add_argument("--config", type=Path, default=HERE / "envoy.yaml", help="the config to start from")
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    apply(config, sidecar=args.sidecar, certs=args.certs.resolve(), server_name=args.server_name, admin=args.admin,
          listen=args.listen)  # fmt: skip
    sys.stdout.write(yaml.safe_dump(config, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
