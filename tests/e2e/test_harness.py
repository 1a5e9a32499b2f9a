"""The harness works: a stub ext_authz server behind the real Envoy, the example server and client.

The stub (below) stands in for the sidecar (Check and gRPC health; it has no access-log service,
so Envoy's log stream fails, which must not affect requests). It allows ``authorization: Bearer ok``: it sets
``x-injected: yes``, removes ``authorization`` and strips a trailing ``/strip-me`` from
``:path``. Anything else is denied with 401, ``WWW-Authenticate`` and a JSON body.
The last tests check the example server's own gateway-signature and token checks, directly.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx2
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from mcp.shared.exceptions import MCPError

from .harness import (
    REPO_ROOT,
    EnvoyProcess,
    ExampleServer,
    call_tool,
    free_port,
    post_initialize,
    reset_stats,
    stats,
)

pytestmark = pytest.mark.e2e

EXAMPLES = REPO_ROOT / "examples"

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
ALLOW = {"authorization": "Bearer ok"}
STRIP_SUFFIX = "/strip-me"
DENIAL_BODY = {"error": "invalid_key", "message": "stub: send 'Authorization: Bearer ok'"}


@dataclass
class SeenCheck:
    """What the stub saw of one CheckRequest."""

    path: str
    stream_id: str  # attributes.request.http.id: Envoy's stream id, NOT x-request-id
    headers: dict[str, str]
    context_extensions: dict[str, str]


@dataclass
class StubAuthz(external_auth_pb2_grpc.AuthorizationServicer):
    """A minimal ext_authz server (grpc.aio) that records what it was asked."""

    seen: list[SeenCheck] = field(default_factory=list)

    async def Check(  # noqa: N802 (gRPC method name)
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext
    ) -> external_auth_pb2.CheckResponse:
        http = request.attributes.request.http
        self.seen.append(
            SeenCheck(http.path, http.id, dict(http.headers), dict(request.attributes.context_extensions))
        )
        if http.headers.get("authorization") == ALLOW["authorization"]:
            ok = external_auth_pb2.OkHttpResponse(
                headers=[header("x-injected", "yes")],
                headers_to_remove=["authorization"],
            )
            path, _, query = http.path.partition("?")
            if path.endswith(STRIP_SUFFIX):
                stripped = path[: -len(STRIP_SUFFIX)] + (f"?{query}" if query else "")
                ok.headers.append(header(":path", stripped))
            return external_auth_pb2.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)
        denied = external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.Unauthorized),
            headers=[
                header("www-authenticate", 'Bearer realm="mcp-authz", error="invalid_token"'),
                header("content-type", "application/json"),
            ],
            body=json.dumps(DENIAL_BODY),
        )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.UNAUTHENTICATED), denied_response=denied
        )


def header(key: str, value: str) -> base_pb2.HeaderValueOption:
    """A header mutation that overwrites (Envoy >= 1.37 may append when no action is set)."""
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=OVERWRITE)


@dataclass
class Stub:
    """The running stub: its port, its servicer, and the grpc.aio server."""

    port: int
    servicer: StubAuthz
    server: grpc.aio.Server

    async def stop(self) -> None:
        await self.server.stop(grace=None)


@pytest.fixture
async def stub() -> AsyncIterator[Stub]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])  # never share a port silently
    servicer = StubAuthz()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(servicer, server)
    # Envoy health-checks the authz cluster (grpc.health.v1, service "") and, with panic routing
    # off, sends no Check to a sidecar that is not SERVING.
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    try:
        yield Stub(port, servicer, server)
    finally:
        await server.stop(grace=None)


@pytest.fixture
async def gateway(
    stub: Stub, example_server: ExampleServer, start_envoy: Callable[..., EnvoyProcess]
) -> EnvoyProcess:
    # Start Envoy off the event loop: the in-process stub must answer Envoy's health checks
    # (the first is made before Envoy reports ready); until one passes, Envoy answers 503.
    envoy: EnvoyProcess = await asyncio.to_thread(
        start_envoy, authz_port=stub.port, upstream_port=example_server.port, servers=["demo", "github"]
    )
    await envoy.wait_healthy()
    return envoy


async def test_allowed_tool_call_sees_injected_header_and_no_client_authorization(
    gateway: EnvoyProcess, example_server: ExampleServer, stub: Stub
) -> None:
    client_headers = {**ALLOW, "x-client": "c1", "x-injected": "from-client", "x-request-id": "spoofed"}
    headers = await call_tool(gateway.url("demo"), "echo_headers", {}, headers=client_headers)

    assert headers["x-injected"] == "yes"  # OVERWRITE_IF_EXISTS_OR_ADD replaced the client's value
    assert "authorization" not in headers  # headers_to_remove
    assert headers["x-client"] == "c1"
    assert headers["x-request-id"] not in ("", "spoofed")  # Envoy's own (use_remote_address: true)
    assert await call_tool(gateway.url("demo"), "add", {"a": 2, "b": 3}, headers=ALLOW) == 5

    # The sidecar saw the route's server name, the path, and only the allowed headers,
    # including the very x-request-id the upstream received.
    check = stub.servicer.seen[0]
    assert check.context_extensions == {"mcp_server": "demo"}
    assert check.path == "/mcp/demo"
    assert check.stream_id
    assert check.headers["authorization"] == "Bearer ok"
    assert "x-client" not in check.headers
    assert headers["x-request-id"] in {c.headers.get("x-request-id") for c in stub.servicer.seen}
    upstream = example_server.stats()
    assert upstream["requests"] >= 2 and set(upstream["paths"]) == {"/mcp/demo"}
    # context_extensions never reach the upstream
    assert not any("mcp_server" in h or "demo" in h.values() for h in upstream["headers"])


async def test_second_server_route_carries_its_name(gateway: EnvoyProcess, stub: Stub) -> None:
    assert await call_tool(gateway.url("github"), "add", {"a": 1, "b": 1}, headers=ALLOW) == 2
    assert {c.context_extensions["mcp_server"] for c in stub.servicer.seen} == {"github"}


async def test_path_overwrite_reaches_upstream(
    gateway: EnvoyProcess, example_server: ExampleServer, stub: Stub
) -> None:
    headers = await call_tool(gateway.url("demo", STRIP_SUFFIX), "echo_headers", {}, headers=ALLOW)

    assert headers["x-injected"] == "yes"
    assert stub.servicer.seen[0].path == "/mcp/demo/strip-me"
    assert set(example_server.stats()["paths"]) == {"/mcp/demo"}

    reset_stats(example_server.port)
    response = await post_initialize(gateway.url("demo", STRIP_SUFFIX + "?q=1"), headers=ALLOW)
    assert response.status == 200, response.text
    assert response.body["result"]["serverInfo"]["name"] == "mcp-authz-example"
    assert stats(example_server.port)["paths"] == ["/mcp/demo?q=1"]


async def test_denied_call_is_401_with_body_and_never_reaches_upstream(
    gateway: EnvoyProcess, example_server: ExampleServer
) -> None:
    response = await post_initialize(gateway.url("demo"), headers={"authorization": "Bearer wrong"})

    assert response.status == 401
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert response.headers["content-type"] == "application/json"
    assert response.body == DENIAL_BODY

    # The SDK client sees a non-JSON-RPC 401 as a generic MCPError (the status is not exposed).
    with pytest.raises(MCPError):
        await call_tool(gateway.url("demo"), "add", {"a": 1, "b": 1})
    assert example_server.stats()["requests"] == 0
    assert gateway.stat("http.mcp_ingress.ext_authz.denied") == 2


async def test_unrouted_paths_are_404_without_a_check(
    gateway: EnvoyProcess, example_server: ExampleServer, stub: Stub
) -> None:
    for path in ("/mcp/demox", "/mcp/unknown", "/", "/_stats"):
        response = await post_initialize(gateway.base_url + path, headers=ALLOW)
        assert response.status == 404, path
        assert response.body["error"] == "not_found"
    assert stub.servicer.seen == []
    assert example_server.stats()["requests"] == 0


async def test_authz_down_is_503_fail_closed(
    gateway: EnvoyProcess, example_server: ExampleServer, stub: Stub
) -> None:
    assert (await post_initialize(gateway.url("demo"), headers=ALLOW)).status == 200
    reset_stats(example_server.port)

    await stub.stop()
    response = await post_initialize(gateway.url("demo"), headers=ALLOW)

    assert response.status == 503
    assert response.headers["content-type"] == "application/json"  # local_reply_config
    assert response.body["error"]["data"]["reason"] == "authz_unavailable"
    assert response.body["error"]["code"] == -32053
    assert example_server.stats()["requests"] == 0
    assert gateway.stat("http.mcp_ingress.ext_authz.error") == 1


# ---------------------------------------------------------------- the example server's own checks

SIGNING_SECRET = "example-signing-secret"
IDENTITY = {"x-user-id": "u_1", "x-user-type": "user", "x-user-team": "core", "x-user-roles": "user"}


def _verify_signature_module() -> Any:
    spec = importlib.util.spec_from_file_location("e2e_verify_signature", EXAMPLES / "verify_signature.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


vs = _verify_signature_module()


class GatewaySigner(httpx2.Auth):
    """Signs each request as the gateway would: identity headers, timestamp, signature."""

    def __init__(self, secret: str, *, skew: int = 0) -> None:
        self.secret, self.skew = secret, skew

    def auth_flow(self, request: httpx2.Request) -> Iterator[httpx2.Request]:
        for name, value in IDENTITY.items():
            request.headers[name] = value
        request.headers["x-request-id"] = "req-1"
        ts = int(time.time()) + self.skew
        request.headers["x-mcp-authz-timestamp"] = str(ts)
        path = request.url.raw_path.decode("ascii")
        request.headers["x-mcp-authz-signature"] = vs.sign(self.secret, ts, request.method, path, request.headers)
        yield request


async def test_example_server_checks_the_gateway_signature(start_example: Callable[..., ExampleServer]) -> None:
    server = start_example(signing_secret=SIGNING_SECRET)

    who = await call_tool(server.url("demo") + "?q=1", "whoami", auth=GatewaySigner(SIGNING_SECRET))
    assert who == {**IDENTITY, "signature_verified": True, "path": "/mcp/demo?q=1"}
    served = server.stats()
    assert served["rejected"] == 0 and served["requests"] >= 2

    server.reset_stats()
    for auth in (None, GatewaySigner("wrong-secret"), GatewaySigner(SIGNING_SECRET, skew=-301)):
        with pytest.raises(MCPError):
            await call_tool(server.url("demo"), "whoami", auth=auth)
    unsigned = await post_initialize(server.url("demo"))
    assert unsigned.status == 401 and unsigned.body["error"] == "bad_signature"
    # A signature is bound to its path: replaying it on another path fails.
    signed = {**IDENTITY, "x-mcp-authz-timestamp": str(int(time.time()))}
    signed["x-mcp-authz-signature"] = vs.sign(SIGNING_SECRET, signed["x-mcp-authz-timestamp"], "POST", "/mcp/a", signed)
    assert (await post_initialize(server.url("a"), headers=signed)).status == 200
    assert (await post_initialize(server.url("b"), headers=signed)).status == 401

    after = server.stats()
    assert after["requests"] == 1 and after["paths"] == ["/mcp/a"]
    assert after["rejected"] == 5
    assert {r["reason"] for r in after["rejections"]} == {"bad_signature"}


async def test_example_server_expect_token(start_example: Callable[..., ExampleServer]) -> None:
    server = start_example(expect_tokens={"X-Upstream-Token": "right"})

    assert await call_tool(server.url(), "add", {"a": 1, "b": 2}, headers={"x-upstream-token": "right"}) == 3
    wrong = await post_initialize(server.url(), headers={"x-upstream-token": "wrong"})
    assert wrong.status == 401 and wrong.body["error"] == "bad_token"
    assert (await post_initialize(server.url())).status == 401
    assert server.stats()["rejected"] == 2
