"""The shipped envoy.yaml's MCP filter, gRPC access log and health checks, against in-process stubs.

A real Envoy (the shipped config, test ports only), the example MCP server, and `StubSidecar`
(Check + AccessLogService + Health on one grpc.aio port, as the sidecar serves them). These
tests pin what the sidecar relies on:

- what ``CheckRequest.attributes.metadata_context.filter_metadata["envoy.filters.http.mcp"]``
  holds, per kind of request;
- where an ``HTTPAccessLogEntry`` carries the ext_authz decision, status, bytes and timings, and
  what Envoy does (and counts) when the access-log stream or the whole sidecar goes away;
- that Envoy stops sending Check to a NOT_SERVING sidecar (503, fail closed) and resumes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2

from .harness import (
    AUTHZ_CLUSTER,
    MCP_ACCEPT,
    EnvoyProcess,
    ExampleServer,
    call_tool,
)
from .stubs import ALLOW_HEADERS, EXT_AUTHZ_NAMESPACE, MCP_NAMESPACE, StubSidecar, struct_to_dict

pytestmark = pytest.mark.e2e

POST_HEADERS = {"content-type": "application/json", "accept": MCP_ACCEPT}
EXTERNAL_SERVICE = accesslog_pb2.ResponseFlags.Unauthorized.EXTERNAL_SERVICE


@pytest.fixture
async def sidecar() -> AsyncIterator[StubSidecar]:
    async with StubSidecar() as stub:
        yield stub


@pytest.fixture
def gateway_factory(
    sidecar: StubSidecar, example_server: ExampleServer, start_envoy: Callable[..., EnvoyProcess]
) -> Callable[..., Any]:
    """Start Envoy off the event loop, so the in-process stub answers its first health check."""

    async def start(**kwargs: Any) -> EnvoyProcess:
        return await asyncio.to_thread(
            start_envoy, authz_port=sidecar.port, upstream_port=example_server.port, **kwargs
        )

    return start


@pytest.fixture
async def gateway(gateway_factory: Callable[..., Any]) -> EnvoyProcess:
    envoy: EnvoyProcess = await gateway_factory()
    await envoy.wait_healthy()
    return envoy


async def post(client: httpx.AsyncClient, url: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    """POST a JSON-RPC body (a str is sent as is) with the MCP content type and Accept header."""
    content = body if isinstance(body, str) else json.dumps(body)
    return await client.post(url, content=content, headers={**POST_HEADERS, **ALLOW_HEADERS, **(headers or {})})


# ------------------------------------------------------------------------------ the MCP filter


async def test_mcp_method_and_tool_reach_check(gateway: EnvoyProcess, sidecar: StubSidecar) -> None:
    # A real MCP client: initialize, notifications/initialized, tools/call (and its session GET/DELETE).
    assert await call_tool(gateway.url("demo"), "add", {"a": 2, "b": 3}, headers=ALLOW_HEADERS) == 5

    by_method: dict[str, list[dict[str, Any]]] = {}
    for index, check in enumerate(sidecar.authz.checks):
        metadata = sidecar.authz.mcp_metadata(index)
        http_method = check.attributes.request.http.method
        if http_method != "POST":
            assert metadata is None, (http_method, metadata)  # GET (SSE) and DELETE carry none
            continue
        assert metadata is not None
        by_method.setdefault(metadata["method"], []).append(metadata)

    (call,) = by_method["tools/call"]
    assert call == {
        "jsonrpc": "2.0",
        "id": call["id"],  # the client's request id (a JSON number arrives as a float)
        "method": "tools/call",
        "params": {"name": "add"},  # only the tool name: never the arguments
        "is_mcp_request": True,
        "status": "mcp_ok",
    }
    (init,) = by_method["initialize"]
    assert set(init["params"]) == {"protocolVersion", "clientInfo"} and set(init["params"]["clientInfo"]) == {"name"}
    (initialized,) = by_method["notifications/initialized"]
    assert "id" not in initialized and initialized["is_mcp_request"] is True


async def test_mcp_filter_annotates_but_never_rejects(
    gateway: EnvoyProcess, sidecar: StubSidecar, example_server: ExampleServer
) -> None:
    """PASS_THROUGH: every body reaches Check and the upstream; the metadata says what was odd."""
    url = gateway.url("demo")
    call = {"jsonrpc": "2.0", "id": "a", "method": "tools/call"}
    cases: list[tuple[str, Any, dict[str, Any] | None]] = [
        # The tool name after the 64 KiB parse limit: the method is known, the name is not.
        ("name after the limit", {**call, "params": {"arguments": {"pad": "x" * 70_000}, "name": "add"}},
         {"method": "tools/call", "is_exceeding_limit": True, "passthrough_reason": "mcp_body_too_large"}),
        # A repeated key: the last value wins (as in Python's json), and it is flagged.
        ("duplicate name", '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"add","name":"whoami"}}',
         {"method": "tools/call", "params": {"name": "whoami"}, "passthrough_reason": "mcp_duplicate_keys"}),
        # `name` need not be a string.
        ("non-string name", {**call, "params": {"name": {"x": "add"}}},
         {"method": "tools/call", "params": {"name": {"x": "add"}}}),
        # Not JSON at all.
        ("malformed", "{not json", {"is_mcp_request": False, "passthrough_reason": "mcp_not_jsonrpc"}),
        # JSON but not JSON-RPC 2.0, and a batch: no metadata at all.
        ("not JSON-RPC", {"hello": "world"}, None),
        ("batch", [{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "add"}}], None),
    ]  # fmt: skip
    async with httpx.AsyncClient(timeout=10) as client:
        for name, body, expected in cases:
            before = len(sidecar.authz.checks)
            response = await post(client, url, body)
            assert response.status_code < 500, (name, response.text)  # the upstream's own answer
            assert len(sidecar.authz.checks) == before + 1, name
            metadata = sidecar.authz.mcp_metadata()
            if expected is None:
                assert metadata is None, (name, metadata)
            else:
                assert metadata is not None and expected.items() <= metadata.items(), (name, metadata)
        # GET (SSE) and DELETE: no body, no metadata.
        for method in ("GET", "DELETE"):
            headers = {**ALLOW_HEADERS, "accept": "text/event-stream", "mcp-session-id": "none"}
            response = await client.request(method, url, headers=headers)
            assert response.status_code < 500
            assert sidecar.authz.mcp_metadata() is None, method
    assert example_server.stats()["requests"] == len(cases) + 2  # every one reached the upstream
    assert gateway.stat("http.mcp_ingress.mcp.requests_rejected") == 0


# ------------------------------------------------------------------------------ the access log


def _seconds(duration: Any) -> float:
    return float(duration.seconds + duration.nanos / 1e9)


async def test_access_log_entries_join_the_decision_with_status_bytes_and_timing(
    gateway: EnvoyProcess, sidecar: StubSidecar
) -> None:
    assert await call_tool(gateway.url("demo"), "add", {"a": 1, "b": 1}, headers=ALLOW_HEADERS) == 2
    async with httpx.AsyncClient(timeout=10) as client:
        denied = await post(
            client, gateway.url("demo"), {"jsonrpc": "2.0", "id": 9, "method": "tools/call", "params": {"name": "add"}},
            headers={"authorization": "Bearer wrong"},
        )  # fmt: skip
    assert denied.status_code == 401
    finished = time.monotonic()
    request_ids = [c.attributes.request.http.headers["x-request-id"] for c in sidecar.authz.checks]

    # Every request's entry arrives within a flush interval (0.5 s) or so: typically 0.3-0.6 s
    # here; the bound leaves room for a loaded test machine.
    await sidecar.als.wait_for(lambda: {e.request.request_id for e in sidecar.als.entries} >= set(request_ids), 3)
    assert time.monotonic() - finished < 3
    first = sidecar.als.streams[0].messages[0]
    assert first.identifier.log_name == "mcp_authz_usage"
    assert first.identifier.node.user_agent_name == "envoy"
    assert all(not m.HasField("identifier") for m in sidecar.als.streams[0].messages[1:])

    entries = {e.request.request_id: e for e in sidecar.als.entries}
    calls = [e for e in entries.values() if e.common_properties.metadata.filter_metadata[MCP_NAMESPACE]
             .fields["method"].string_value == "tools/call"]  # fmt: skip
    allowed = [e for e in calls if e.response.response_code.value == 200]
    assert len(allowed) == 1 and len(calls) == 2
    (entry,) = allowed
    common = entry.common_properties
    decision = struct_to_dict(common.metadata.filter_metadata[EXT_AUTHZ_NAMESPACE])
    assert decision == {
        "principal": "alice", "principal_id": "p_alice", "key_id": "k_1", "server": "demo", "tool": "add",
        "decision": "allow", "reason": "ok",
        "ext_authz_duration": decision["ext_authz_duration"],  # added by Envoy (ms), allowed requests only
    }  # fmt: skip
    assert struct_to_dict(common.metadata.filter_metadata[MCP_NAMESPACE])["params"] == {"name": "add"}
    assert entry.request.request_id == common.stream_id != ""
    assert entry.request.request_method == base_pb2.POST
    # The upstream answered: its status is response_code. The details are "via_upstream", or
    # "downstream_remote_disconnect" when the client hung up after reading its SSE answer.
    assert entry.response.response_code_details in ("via_upstream", "downstream_remote_disconnect"), entry
    assert common.HasField("time_to_first_upstream_rx_byte") and common.HasField("upstream_remote_address")
    assert common.upstream_cluster == "mcp_example" and common.route_name == "mcp_demo"
    assert entry.request.request_body_bytes > 0 and entry.response.response_body_bytes > 0
    assert common.downstream_wire_bytes_received > 0 and common.downstream_wire_bytes_sent > 0
    assert common.start_time.seconds > 0 and 0 < _seconds(common.duration) < 5
    assert not common.response_flags.HasField("unauthorized_details")

    (deny,) = [e for e in calls if e is not entry]
    assert deny.response.response_code.value == 401
    assert deny.response.response_code_details == "ext_authz_denied"
    assert deny.common_properties.response_flags.unauthorized_details.reason == EXTERNAL_SERVICE
    assert deny.common_properties.upstream_cluster == ""  # never forwarded
    deny_decision = struct_to_dict(deny.common_properties.metadata.filter_metadata[EXT_AUTHZ_NAMESPACE])
    assert deny_decision["decision"] == "deny" and deny_decision["reason"] == "invalid_key"
    assert "ext_authz_duration" not in deny_decision


async def test_access_log_stream_breaks_never_fail_requests(
    gateway: EnvoyProcess, sidecar: StubSidecar
) -> None:
    url = gateway.url("demo")
    body = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    statuses: list[int] = []

    async def load(client: httpx.AsyncClient, rounds: int, per_round: int = 5) -> None:
        for _ in range(rounds):
            responses = await asyncio.gather(*(post(client, url, body) for _ in range(per_round)))
            statuses.extend(r.status_code for r in responses)
            await asyncio.sleep(0.05)

    def received() -> int:
        return len(sidecar.als.entries)

    async with httpx.AsyncClient(timeout=10) as client:
        # 1. Under load, abort the log stream right after a batch arrived (the next is ~0.5 s away).
        loading = asyncio.create_task(load(client, 20))
        await sidecar.als.wait_for(lambda: received() > 0, 3)
        assert await sidecar.als.kill_streams() == 1
        await loading
        assert len(statuses) == 100 and all(s < 500 for s in statuses)  # requests never notice
        # Envoy opened a new stream at its next flush, and nothing was lost.
        await sidecar.als.wait_for(lambda: received() == 100, 2)
        assert [s.closed_by for s in sidecar.als.streams] == ["killed", ""]

        # 2. The whole sidecar goes away. Check fails closed (503). Until the health checks mark
        #    it unhealthy, Envoy hands entries to streams that then fail: those are lost, yet
        #    counted as flushed. Once it is unhealthy, a flush cannot even open a stream: the
        #    batch stays buffered (grpc_entries_flush_failed counts each failed attempt) and is
        #    delivered when the sidecar is back.
        await sidecar.stop()
        stopped = time.time()
        await load(client, 2)
        deadline = time.monotonic() + 5
        while gateway.health_flags() != ["/failed_active_hc"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        noticed = time.time()
        await load(client, 4)
        await asyncio.sleep(0.6)  # at least one failed flush of these
        assert statuses[100:] == [503] * 30
        assert gateway.stat("access_logs.grpc_access_log.grpc_entries_flush_failed") >= 20
        await sidecar.start()  # same port
        deadline = time.monotonic() + 5
        while (await post(client, url, body)).status_code == 503:  # until Envoy uses it again
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        await load(client, 4)

    # Every request that reached the sidecar's Check has its entry, once.
    checked = {c.attributes.request.http.headers["x-request-id"] for c in sidecar.authz.checks}
    await sidecar.als.wait_for(lambda: checked <= {e.request.request_id for e in sidecar.als.entries}, 2)
    await asyncio.sleep(0.7)  # Envoy's last flush
    logged = [e.request.request_id for e in sidecar.als.entries]
    assert len(logged) == len(set(logged))

    def started(entry: Any) -> float:
        return float(entry.common_properties.start_time.ToMicroseconds() / 1e6)

    outage = [e for e in sidecar.als.entries if e.response.response_code.value == 503]
    # The 20 denied after Envoy noticed were kept and delivered.
    assert len([e for e in outage if started(e) >= noticed]) >= 20
    # Of the 10 before, any missing one is gone for good; Envoy's counters do not show it.
    before_noticed = [e for e in outage if stopped <= started(e) < noticed]
    written = gateway.stat("access_logs.grpc_access_log.logs_written")
    assert written == gateway.stat("http.mcp_ingress.downstream_rq_completed")
    assert received() == written - (10 - len(before_noticed))
    assert gateway.stat("access_logs.grpc_access_log.grpc_entries_flushed") == written
    assert gateway.stat("access_logs.grpc_access_log.logs_dropped") == 0


# ------------------------------------------------------------------------------ health checks


async def _status(client: httpx.AsyncClient, url: str) -> int:
    return (await post(client, url, {"jsonrpc": "2.0", "id": 1, "method": "ping"})).status_code


async def _wait_status(client: httpx.AsyncClient, url: str, want_503: bool, timeout: float) -> float:
    """Poll every 50 ms until the answer is (or is not) 503; return the seconds it took."""
    start = time.monotonic()
    while ((await _status(client, url)) == 503) != want_503:
        assert time.monotonic() - start < timeout, f"still {'not ' if want_503 else ''}503 after {timeout}s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_not_serving_sidecar_gets_no_check_and_clients_get_503(
    gateway_factory: Callable[..., Any], sidecar: StubSidecar
) -> None:
    # Not ready when Envoy starts: Envoy's first health check fails, so nothing is routed.
    await sidecar.set_serving(False)
    gateway: EnvoyProcess = await gateway_factory()
    url = gateway.url("demo")
    async with httpx.AsyncClient(timeout=10) as client:
        response = await post(client, url, {"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert response.status_code == 503
        assert response.json()["error"]["data"]["reason"] == "authz_unavailable"
        assert sidecar.authz.checks == []
        assert gateway.health_flags() == ["/failed_active_hc"]

        # Ready: back within a health-check interval, though no traffic flowed (no_traffic_interval).
        await sidecar.set_serving(True)
        assert await _wait_status(client, url, want_503=False, timeout=2.5) < 2.5
        assert gateway.health_flags() == ["healthy"]

        # NOT_SERVING later: out within one interval (a NOT_SERVING answer needs no threshold).
        await sidecar.set_serving(False)
        assert await _wait_status(client, url, want_503=True, timeout=2.5) < 2.5
        checks = len(sidecar.authz.checks)
        for _ in range(5):
            assert await _status(client, url) == 503
        assert len(sidecar.authz.checks) == checks  # no Check reaches it: no panic routing
        assert gateway.stat(f"cluster.{AUTHZ_CLUSTER}.lb_healthy_panic") == 0

        await sidecar.set_serving(True)
        assert await _wait_status(client, url, want_503=False, timeout=2.5) < 2.5
    assert gateway.stat(f"cluster.{AUTHZ_CLUSTER}.health_check.failure") >= 2


async def test_default_panic_threshold_would_route_to_a_not_serving_sidecar(
    gateway_factory: Callable[..., Any], sidecar: StubSidecar
) -> None:
    """Why the shipped config sets healthy_panic_threshold to 0."""

    def default_panic_threshold(config: dict[str, Any]) -> None:
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] == AUTHZ_CLUSTER:
                del cluster["common_lb_config"]

    await sidecar.set_serving(False)
    gateway: EnvoyProcess = await gateway_factory(mutate=default_panic_threshold)
    async with httpx.AsyncClient(timeout=10) as client:
        assert await _status(client, gateway.url("demo")) != 503
    assert gateway.health_flags() == ["/failed_active_hc"]
    assert len(sidecar.authz.checks) == 1  # routed to the unhealthy sidecar anyway
    assert gateway.stat(f"cluster.{AUTHZ_CLUSTER}.lb_healthy_panic") >= 1  # (the log stream's pick, too)

