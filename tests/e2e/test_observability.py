"""Issue 3, end to end: metrics, usage attribution through Envoy's access-log service,
upstream-rejected overrides, tool scopes via Envoy's MCP filter, health and fail-closed."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import yaml
from mcp.shared.exceptions import MCPError
from prometheus_client.parser import text_string_to_metric_families

from .harness import (
    INITIALIZE_REQUEST,
    call_tool,
    post_initialize,
    run_envoy,
    run_example_server,
)
from .sidecar import GITHUB_ALICE, Gateway, run_gateway, run_sidecar, seed

pytestmark = pytest.mark.e2e
SERVERS = ("github", "linear", "open")


class Stack(Gateway):
    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = self.sidecar.http("/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    def usage(self, *args: str) -> list[dict]:  # type: ignore[type-arg]
        done = self.world.cli("usage", "--json", "--limit", "10000", *args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)["usage"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with run_gateway(tmp_path_factory.mktemp("observability"), SERVERS, Stack) as gateway:
        yield gateway


def _decisions(metrics: dict, decision: str, reason: str, server: str) -> float:  # type: ignore[type-arg]
    key = ("mcp_authz_check_decisions_total", (("decision", decision), ("reason", reason), ("server", server)))
    return metrics.get(key, 0.0)


async def _eventually(check, seconds: float = 3.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + seconds
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            return result
        await asyncio.sleep(0.1)


# 1 -------------------------------------------------------------------------------------------
async def test_metrics_and_usage_attribute_every_request(stack: Stack) -> None:
    before = stack.metrics()
    for i in range(3):
        assert await call_tool(stack.envoy.url("github"), "add", {"a": i, "b": 1}, headers=stack.bearer("alice")) == i + 1
    for i in range(2):
        await call_tool(stack.envoy.url("linear"), "echo_headers", {}, headers=stack.bearer("bob"))
    calls = lambda who: [  # noqa: E731
        r for r in stack.usage("--principal", who) if r["mcp_method"] == "tools/call"
    ]
    alice_calls = await _eventually(lambda: len(calls("alice")) >= 3 and calls("alice"))
    bob_calls = await _eventually(lambda: len(calls("bob")) >= 2 and calls("bob"))
    assert [(r["server"], r["tool"], r["decision"], r["upstream_status"]) for r in alice_calls] == [("github", "add", "allow", 200)] * 3
    assert [(r["server"], r["tool"], r["upstream_status"]) for r in bob_calls] == [("linear", "echo_headers", 200)] * 2
    assert all(r["key_id"] == stack.world.key_ids["alice"] and r["request_id"] for r in alice_calls)
    assert all(r["duration_ms"] > 0 and r["response_bytes"] > 0 for r in alice_calls)
    # Every request of those sessions was counted once in metrics and attributed once in usage.
    after = stack.metrics()
    for who, server in (("alice", "github"), ("bob", "linear")):
        counted = _decisions(after, "allow", "", server) - _decisions(before, "allow", "", server)
        attributed = await _eventually(lambda: len(stack.usage("--principal", who)) >= counted and stack.usage("--principal", who))
        assert counted >= 3 * 2  # an SDK session is several HTTP requests
        assert len([r for r in attributed if r["decision"] == "allow"]) == counted


# 3 -------------------------------------------------------------------------------------------
async def test_key_scoped_to_one_tool(stack: Stack) -> None:
    done = stack.world.cli("keys", "create", "bob", "--label", "only-add", "--servers", "linear:add", "--json")
    assert done.returncode == 0, done.stderr
    key = json.loads(done.stdout)["api_key"]
    key_id = json.loads(done.stdout)["key"]["key_id"]
    headers = {"authorization": f"Bearer {key}"}
    before = _decisions(stack.metrics(), "deny", "scope_tool", "linear")
    assert await call_tool(stack.envoy.url("linear"), "add", {"a": 2, "b": 2}, headers=headers) == 4
    with pytest.raises(MCPError) as exc:
        await call_tool(stack.envoy.url("linear"), "echo_headers", {}, headers=headers)
    assert "echo_headers" in str(exc.value)
    assert _decisions(stack.metrics(), "deny", "scope_tool", "linear") == before + 1
    denied = await _eventually(
        lambda: [r for r in stack.usage("--principal", "bob", "--tool", "echo_headers") if r["key_id"] == key_id]
    )
    assert [(r["decision"], r["reason"], r["upstream_status"]) for r in denied] == [("deny", "scope_tool", 403)]
    # Another server entirely is refused too.
    assert (await post_initialize(stack.envoy.url("open"), headers)).status == 403


# 5 -------------------------------------------------------------------------------------------
def test_metrics_parse_and_labels_never_name_a_user_or_key(stack: Stack) -> None:
    metrics = stack.metrics()
    names = {name for name, _ in metrics}
    for expected in (
        "mcp_authz_check_decisions_total",
        "mcp_authz_check_duration_seconds_bucket",
        "mcp_authz_key_cache_total",
        "mcp_authz_key_cache_evictions_total",
        "mcp_authz_argon2_verifications_total",
        "mcp_authz_argon2_inflight",
        "mcp_authz_negative_cache_hits_total",
        "mcp_authz_changelog_lag_seconds",
        "mcp_authz_changelog_lag_sequence",
        "mcp_authz_queue_depth",
        "mcp_authz_queue_dropped_total",
        "mcp_authz_entities",
        "mcp_authz_build_info",
    ):
        assert expected in names, expected
    forbidden = set(stack.world.keys.values()) | set(stack.world.key_ids.values()) | {"alice", "bob", "carol", "dave"}
    forbidden |= {r["principal_id"] for r in stack.usage() if r["principal_id"]}
    for (_, labels) in metrics:
        for _, value in labels:
            assert value not in forbidden
    assert stack.sidecar.http("/healthz").status_code == 200
    assert stack.sidecar.http("/readyz").json()["status"] == "ready"


# 2 -------------------------------------------------------------------------------------------
async def test_override_rejected_by_upstream_becomes_invalid(stack: Stack, tmp_path: Path) -> None:
    with ExitStack() as stop:
        picky = stop.enter_context(run_example_server(tmp_path, expect_tokens={"authorization": "Bearer the-right-token"}))
        envoy = stop.enter_context(run_envoy(tmp_path, authz_port=stack.sidecar.port, upstream_port=picky.port, servers=("github",)))
        r = await post_initialize(envoy.url("github"), stack.bearer("alice"))
        assert r.status == 401  # the upstream's answer to alice's stale personal token
        started = time.monotonic()

        def status() -> str:
            done = stack.world.cli("overrides", "list", "--server", "github", "--principal", "alice", "--json")
            return json.loads(done.stdout)["overrides"][0]["status"]

        assert await _eventually(lambda: status() == "invalid", seconds=2.0)
        assert time.monotonic() - started < 2.0
        listed = json.loads(stack.world.cli("overrides", "list", "--server", "github", "--json").stdout)["overrides"][0]
        assert GITHUB_ALICE not in json.dumps(listed)
        # Setting it again makes it configured.
        stack.world.cli("overrides", "set", "--principal", "alice", "--server", "github", stdin=GITHUB_ALICE + "\n")
        assert status() == "configured"


# 6 -------------------------------------------------------------------------------------------
async def test_access_log_stream_killed_mid_load_loses_nothing_unreported(tmp_path: Path) -> None:
    world = await seed(tmp_path / "world")
    with ExitStack() as stop:
        upstream = stop.enter_context(run_example_server(tmp_path))
        first = stop.enter_context(run_sidecar(world, name="als-a"))
        envoy = stop.enter_context(run_envoy(tmp_path, authz_port=first.port, upstream_port=upstream.port, servers=("linear",)))
        statuses: list[int] = []

        async def load(n: int) -> None:
            async with httpx.AsyncClient(timeout=10) as client:
                for _ in range(n):
                    r = await client.post(envoy.url("linear"), json=INITIALIZE_REQUEST,
                                          headers={"authorization": f"Bearer {world.keys['bob']}",
                                                   "accept": "application/json, text/event-stream"})
                    statuses.append(r.status_code)

        loader = asyncio.create_task(load(150))
        await asyncio.sleep(0.6)
        first.process.stop()  # graceful: the stream is cut, what was received is flushed
        second = stop.enter_context(run_sidecar(world, port=first.port, name="als-b"))
        await loader
        await load(20)
        await asyncio.sleep(1.5)  # one flush interval for the last entries
        second.process.stop()
    counters = [_stopped_counters(s.logs()) for s in (first, second)]
    stored = len(json.loads(world.cli("usage", "--json", "--limit", "10000").stdout)["usage"])
    received = sum(c["access_log_entries"] - c["access_log_unattributed"] for c in counters)
    written = sum(c["usage_written"] for c in counters)
    dropped = sum(c["usage_dropped"] for c in counters)
    assert written == stored  # nothing the sidecar wrote went missing
    assert received == written + dropped  # and whatever it did not write, it reported
    assert dropped == 0
    assert statuses.count(200) > 0 and stored >= 20  # load really ran through both sidecars


async def test_access_log_streams_from_more_envoy_workers_than_grpc_threads(tmp_path: Path) -> None:
    """Envoy's 6 workers each keep an access-log stream open to a sidecar with 4 gRPC threads. Streams
    hold no thread (they are read on the core loop), so every worker's stream is taken, every Check is
    answered, and every request is attributed."""
    world = await seed(tmp_path / "world")
    with ExitStack() as stop:
        upstream = stop.enter_context(run_example_server(tmp_path))
        sidecar = stop.enter_context(run_sidecar(world, env={"MCP_AUTHZ_GRPC_THREADS": "4"}))
        envoy = stop.enter_context(run_envoy(tmp_path, authz_port=sidecar.port, upstream_port=upstream.port,
                                             servers=("linear",), concurrency=6))
        headers = {"authorization": f"Bearer {world.keys['bob']}", "accept": "application/json, text/event-stream"}

        async def client_on_its_own_connection() -> list[int]:
            async with httpx.AsyncClient(timeout=10) as client:
                return [(await client.post(envoy.url("linear"), json=INITIALIZE_REQUEST, headers=headers)).status_code
                        for _ in range(10)]

        def open_streams() -> float:
            return next(s.value for f in text_string_to_metric_families(sidecar.http("/metrics").text)
                        for s in f.samples if s.name == "mcp_authz_access_log_streams")

        statuses: list[int] = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for result in await asyncio.gather(*(client_on_its_own_connection() for _ in range(12))):
                statuses += result
            await asyncio.sleep(0.6)  # an access-log flush interval: each busy worker opens its stream
            if open_streams() > 4:
                break
        assert open_streams() > 4  # more streams than the sidecar has gRPC threads
        assert statuses and set(statuses) == {200}  # every Check answered
        await asyncio.sleep(1.0)  # the last flush
        sidecar.process.stop()
    counters = _stopped_counters(sidecar.logs())
    assert counters["access_log_entries"] == len(statuses)  # every request's entry arrived
    assert counters["access_log_unattributed"] == 0 and counters["usage_written"] == len(statuses)


def _stopped_counters(logs: str) -> dict[str, int]:
    for line in reversed(logs.splitlines()):
        if '"msg": "stopped"' in line:
            return {k: v for k, v in json.loads(line).items() if isinstance(v, int)}
    raise AssertionError("no 'stopped' line in the sidecar log")


# 4 -------------------------------------------------------------------------------------------
async def test_unhealthy_sidecar_is_taken_out_and_envoy_answers_503(tmp_path: Path) -> None:
    asyncpg = pytest.importorskip("asyncpg")
    schema = f"e2e_{uuid.uuid4().hex[:10]}"
    dsn = "postgresql://127.0.0.1:5432/test"
    try:
        admin_conn = await asyncpg.connect(dsn, timeout=3)
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL is not reachable at 127.0.0.1:5432 ({type(exc).__name__})")
    try:
        world = await seed(tmp_path / "world", store_url=f"{dsn}?schema={schema}")
        with ExitStack() as stop:
            sidecar = stop.enter_context(run_sidecar(world, env={"MCP_AUTHZ_STORE_OUTAGE_LIMIT": "1"}))
            upstream = stop.enter_context(run_example_server(tmp_path))
            envoy = stop.enter_context(run_envoy(tmp_path, authz_port=sidecar.port, upstream_port=upstream.port, servers=("linear",)))
            headers = {"authorization": f"Bearer {world.keys['bob']}"}
            assert (await post_initialize(envoy.url("linear"), headers)).status == 200
            await admin_conn.execute(f'ALTER SCHEMA "{schema}" RENAME TO "{schema}_gone"')  # the store "goes away"
            try:
                async def status() -> int:
                    return (await post_initialize(envoy.url("linear"), headers)).status

                deadline = time.monotonic() + 8
                while (code := await status()) != 503 and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                assert code == 503
                assert sidecar.http("/readyz").status_code == 503
                upstream.reset_stats()
                assert await status() == 503 and upstream.stats()["requests"] == 0
            finally:
                await admin_conn.execute(f'ALTER SCHEMA "{schema}_gone" RENAME TO "{schema}"')
            deadline = time.monotonic() + 8
            while (code := await status()) != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            assert code == 200  # back in service once the store is
    finally:
        await admin_conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await admin_conn.execute(f'DROP SCHEMA IF EXISTS "{schema}_gone" CASCADE')
        await admin_conn.close()


# MCP filter absent ---------------------------------------------------------------------------
def _without_mcp_filter(cfg: dict) -> None:  # type: ignore[type-arg]
    hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.mcp"]


async def test_without_the_mcp_filter_everything_works_but_tool_scopes_fail_closed(stack: Stack, tmp_path: Path) -> None:
    with ExitStack() as stop:
        envoy = stop.enter_context(
            run_envoy(tmp_path, authz_port=stack.sidecar.port, upstream_port=stack.upstream.port,
                      servers=("linear",), mutate=_without_mcp_filter)
        )
        rendered = yaml.safe_load(envoy.config_path.read_text())
        filters = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        assert [f["name"] for f in filters] == [
            "envoy.filters.http.ext_authz", "mcp_authz.admin_json_fields", "envoy.filters.http.grpc_json_transcoder",
            "envoy.filters.http.router"]
        assert await call_tool(envoy.url("linear"), "add", {"a": 1, "b": 1}, headers=stack.bearer("bob")) == 2
        done = stack.world.cli("keys", "create", "bob", "--label", "add-only-2", "--servers", "linear:add", "--json")
        scoped = {"authorization": f"Bearer {json.loads(done.stdout)['api_key']}"}
        r = await post_initialize(envoy.url("linear"), scoped)
        assert r.status == 403 and r.body["error"]["data"]["reason"] == "scope_tool"
        assert "MCP filter" in r.body["error"]["data"]["hint"]
