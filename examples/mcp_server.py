"""An example upstream MCP server to put behind the mcp-authz gateway (Streamable HTTP).

Run it::

    python examples/mcp_server.py --host 127.0.0.1 --port 9100 \\
        [--signing-secret-file FILE] [--expect-token NAME=VALUE ...] [--allowed-host HOST ...]

What it serves:

- The MCP endpoint at every path under ``/mcp`` (``/mcp``, ``/mcp/demo``, ``/mcp/github``...).
  The gateway routes each registered server at ``/mcp/<server>`` without rewriting the path,
  so one process can stand behind several gateway routes. Tools:

  - ``echo_headers``: the HTTP request headers it received, as a JSON object (lowercase names);
  - ``whoami``: the identity headers the gateway set (``x-user-id``, ``x-user-type``,
    ``x-user-team``, ``x-user-roles``) and whether the gateway signature verified;
  - ``add(a, b)``.

- ``GET /_stats``: what reached this server, as JSON::

      {"requests": N,           # MCP requests served
       "rejected": M,           # MCP requests refused (bad signature or token)
       "methods": [...], "paths": [...], "headers": [{...}, ...],   # one entry per served request
       "rejections": [{"method", "path", "reason", "headers"}, ...]}

  ``POST /_stats/reset`` clears it. Neither is counted. Any other path is a 404 (counted).

- ``--signing-secret-file`` (or ``EXAMPLE_SIGNING_SECRET_FILE``): check the gateway signature
  on every MCP request with ``verify_signature.verify`` (the recipe an upstream copies), and
  answer 401 ``{"error": "bad_signature"}`` when it is missing, stale or forged.
- ``--expect-token NAME=VALUE`` (repeatable): answer 401 ``{"error": "bad_token"}`` when header
  NAME is not VALUE, as an upstream would for a wrong personal token.

This is a demo and a test fixture: it keeps everything in memory, and it logs no header
values (they carry credentials).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Receive, Scope, Send

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify_signature import verify  # noqa: E402  (examples/ is not a package)

log = logging.getLogger("mcp_example")

MCP_PREFIX = "/mcp"
SDK_PATH = "/mcp"  # the single path the SDK's Starlette app serves
SCOPE_KEY = "mcp_example"  # per-request facts the wrapper hands to the tools via the ASGI scope
IDENTITY_HEADERS = ("x-user-id", "x-user-type", "x-user-team", "x-user-roles")
REJECTION_MESSAGES = {
    "bad_signature": "missing, stale or forged x-mcp-authz-signature: requests must come through the gateway",
    "bad_token": "the upstream credential header is missing or wrong",
}


def build_mcp() -> MCPServer:
    """The MCP server and its three tools."""
    mcp = MCPServer(
        "mcp-authz-example", instructions="Example upstream behind the mcp-authz gateway.", log_level="WARNING"
    )

    @mcp.tool()
    def echo_headers(ctx: Context) -> dict[str, str]:
        """Return the HTTP request headers this server received (lowercase names)."""
        return _request_headers(ctx)

    @mcp.tool()
    def whoami(ctx: Context) -> dict[str, Any]:
        """Return the identity the gateway asserted, and whether its signature verified.

        ``signature_verified`` is true when checked (unsigned requests never get here), and
        null when this server runs without a signing secret.
        """
        headers = _request_headers(ctx)
        facts = _scope_facts(ctx)
        identity: dict[str, Any] = {name: headers.get(name) for name in IDENTITY_HEADERS}
        identity["signature_verified"] = facts.get("signature_verified")
        identity["path"] = facts.get("path")
        return identity

    @mcp.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    return mcp


def _scope_facts(ctx: Context) -> dict[str, Any]:
    request = getattr(ctx.request_context, "request", None)
    scope = getattr(request, "scope", None) or {}
    return dict(scope.get(SCOPE_KEY, {}))


def _request_headers(ctx: Context) -> dict[str, str]:
    headers = ctx.headers or {}
    return {name.lower(): value for name, value in headers.items()}


def _scope_headers(scope: Scope) -> dict[str, str]:
    """Request headers as a dict with lowercase names; repeated headers joined with ", "."""
    out: dict[str, str] = {}
    for raw_name, raw_value in scope.get("headers", []):
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out


def _original_path(scope: Scope) -> str:
    """The request target as received: raw path plus query string, undecoded."""
    raw = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    return raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


@dataclass
class Stats:
    """What reached the server since start or the last reset."""

    methods: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "requests": len(self.paths),
            "rejected": len(self.rejections),
            "methods": self.methods,
            "paths": self.paths,
            "headers": self.headers,
            "rejections": self.rejections,
        }


async def _send_json(send: Send, status: int, body: Mapping[str, Any]) -> None:
    payload = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class ExampleApp:
    """ASGI wrapper: stats routes, request recording, the gateway checks, and /mcp/* -> /mcp."""

    def __init__(
        self,
        mcp_app: ASGIApp,
        *,
        signing_secret: str | None = None,
        expected_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.mcp_app = mcp_app
        self.signing_secret = signing_secret
        self.expected_tokens = {k.lower(): v for k, v in (expected_tokens or {}).items()}
        self.stats = Stats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan: starts the SDK's session manager
            await self.mcp_app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if path == "/_stats" and method == "GET":
            await _send_json(send, 200, self.stats.as_json())
            return
        if path == "/_stats/reset" and method == "POST":
            self.stats = Stats()
            await _send_json(send, 200, {"reset": True})
            return

        original = _original_path(scope)
        headers = _scope_headers(scope)
        if not (path == MCP_PREFIX or path.startswith(MCP_PREFIX + "/")):
            self._record(method, original, headers)
            await _send_json(send, 404, {"error": "not_found", "message": "MCP is served under /mcp"})
            return

        reason = self._rejection(method, original, headers)
        if reason is not None:
            self.stats.rejections.append({"method": method, "path": original, "reason": reason, "headers": headers})
            log.warning("rejected %s request: %s", method, reason)  # no header values
            await _send_json(send, 401, {"error": reason, "message": REJECTION_MESSAGES[reason]})
            return

        self._record(method, original, headers)
        facts = {"path": original, "signature_verified": None if self.signing_secret is None else True}
        inner = dict(scope, path=SDK_PATH, raw_path=SDK_PATH.encode(), **{SCOPE_KEY: facts})
        await self.mcp_app(inner, receive, send)

    def _record(self, method: str, path: str, headers: dict[str, str]) -> None:
        self.stats.methods.append(method)
        self.stats.paths.append(path)
        self.stats.headers.append(headers)

    def _rejection(self, method: str, path: str, headers: Mapping[str, str]) -> str | None:
        if self.signing_secret is not None and not verify(self.signing_secret, method, path, headers):
            return "bad_signature"
        for name, value in self.expected_tokens.items():
            if headers.get(name) != value:
                return "bad_token"
        return None


def build_app(
    *,
    signing_secret: str | None = None,
    expected_tokens: Mapping[str, str] | None = None,
    allowed_hosts: list[str] | None = None,
) -> ExampleApp:
    """Build the ASGI app (the MCP server wrapped by `ExampleApp`)."""
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", *(allowed_hosts or [])]
    # The SDK turns DNS-rebinding protection on for loopback hosts anyway. Behind Envoy the
    # Host header is the one the client sent to Envoy (e.g. 127.0.0.1:10000), which these
    # wildcards accept; add --allowed-host for a gateway reached by name, or "*" to turn it off.
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection="*" not in hosts,
        allowed_hosts=hosts,
        allowed_origins=["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"],
    )
    mcp_app = build_mcp().streamable_http_app(streamable_http_path=SDK_PATH, transport_security=security)
    return ExampleApp(mcp_app, signing_secret=signing_secret, expected_tokens=expected_tokens)


def _parse_token(value: str) -> tuple[str, str]:
    name, sep, token = value.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return name.strip().lower(), token


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description="Example upstream MCP server for mcp-authz.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument(
        "--signing-secret-file",
        default=os.environ.get("EXAMPLE_SIGNING_SECRET_FILE"),
        help="file holding the gateway's signing secret for this server (env EXAMPLE_SIGNING_SECRET_FILE)",
    )
    parser.add_argument(
        "--expect-token", type=_parse_token, action="append", default=[], metavar="NAME=VALUE",
        help="answer 401 unless header NAME equals VALUE (repeatable)",
    )
    parser.add_argument(
        "--allowed-host", action="append", default=[], metavar="HOST[:PORT|:*]",
        help="extra Host header value to accept (repeatable; '*' disables DNS-rebinding protection)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    secret: str | None = None
    if args.signing_secret_file:
        secret = Path(args.signing_secret_file).read_text(encoding="utf-8").strip()
        if not secret:
            parser.error("the signing secret file is empty")
    app = build_app(signing_secret=secret, expected_tokens=dict(args.expect_token), allowed_hosts=args.allowed_host)
    print(
        f"example MCP server on http://{args.host}:{args.port}/mcp/<anything> "
        f"(signature check {'on' if secret else 'off'}, {len(args.expect_token)} expected token(s))",
        flush=True,
    )
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", access_log=False,
        lifespan="on", timeout_graceful_shutdown=2,
    )


if __name__ == "__main__":
    main()
