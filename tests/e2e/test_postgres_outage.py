"""Issue 13, write-behind that survives outages, on PostgreSQL: nothing lost, nothing doubled.

A real sidecar on PostgreSQL, reached through a TCP proxy the test controls (faults.py), behind a
real Envoy, under a steady load of valid requests and of requests with an unknown key. For 10 s the
proxy either resets every connection (and every new one), or holds them (no byte moves, nothing
closes: a partition; a write not answered within 5 s counts as failed). Then it forwards again. Throughout, every valid request is allowed (Check
answers from memory); afterwards every allowed request has exactly one usage row and every denial
one audit row (more only where Envoy retried a Check), counted against Envoy's own ext_authz stats, and nothing was dropped.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack
from pathlib import Path

import asyncpg
import pytest

from authz_server.crypto.keys import generate
from authz_server.errors import AUTHN_FAILURE

from ..postgres import reachable_url
from .faults import FaultProxy
from .test_rolling_restart import SERVER, Rig, _windows, audit_matches_denials

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

OUTAGE = 10.0  # seconds
DENY_RATE = 20.0  # requests per second with an unknown key, beside the valid load


@pytest.fixture
async def pg_schema() -> AsyncIterator[tuple[str, str]]:
    """(the database's URL, a fresh schema name), dropped afterwards."""
    url = reachable_url("the PostgreSQL outage tests")
    schema = f"outage_{uuid.uuid4().hex[:10]}"
    try:
        yield url, schema
    finally:
        conn = await asyncpg.connect(url, timeout=5)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


async def _rows(url: str, schema: str) -> dict[str, tuple[int, int]]:
    """(rows, distinct request ids) of allowed usage for SERVER, and of authentication-failure audit events."""
    conn = await asyncpg.connect(url, timeout=5, server_settings={"search_path": f'"{schema}"'})
    try:
        usage = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT request_id) AS d FROM usage_records "
            "WHERE server = $1 AND decision = 'allow'", SERVER)  # fmt: skip
        audit = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT request_id) AS d FROM audit_events WHERE action = $1", AUTHN_FAILURE
        )
    finally:
        await conn.close()
    assert usage is not None and audit is not None
    return {"usage": (usage["n"], usage["d"]), "audit": (audit["n"], audit["d"])}


def _metric(text: str, name: str, queue: str) -> float:
    match = re.search(rf'^{name}{{queue="{queue}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name}{{queue={queue!r}}} not in /metrics"
    return float(match.group(1))


async def _outage(kind: str, tmp_path: Path, stack: ExitStack, url: str, schema: str) -> None:
    proxy = stack.enter_context(FaultProxy(*_host_port(url)))
    spool = tmp_path / "spool"
    rig = await Rig.start(tmp_path, stack, 1, store_url=f"{url}?schema={schema}", sidecar_env={
        "MCP_AUTHZ_STORE": f"{proxy.url(url)}?schema={schema}", "MCP_AUTHZ_SPOOL_DIR": str(spool)})  # fmt: skip
    sidecar = rig.sidecars[0]
    valid, unknown = rig.load(), rig.load(generate()[1].reveal(), DENY_RATE)
    running = [asyncio.create_task(valid.run()), asyncio.create_task(unknown.run())]
    try:
        await asyncio.sleep(2)
        getattr(proxy, kind)()  # the outage begins: reset() or hold()
        await asyncio.sleep(OUTAGE)
        during = (await asyncio.to_thread(sidecar.http, "/metrics")).text
        proxy.restore()
        await asyncio.sleep(2)
    finally:
        for load in (valid, unknown):
            load.stop()
        await asyncio.gather(*running)

    stat = rig.envoy.stat
    allowed, denied = stat("http.mcp_ingress.ext_authz.ok"), stat("http.mcp_ingress.ext_authz.denied")
    report = (f"{kind}: {len(valid.outcomes)} valid requests, {valid.ok} 2xx, failures {_windows(valid.failures())}; "
              f"{len(unknown.outcomes)} with an unknown key; Envoy: {allowed} allowed, {denied} denied; "
              f"proxy: {proxy.connections} connections, {proxy.resets} reset")  # fmt: skip
    assert len(valid.outcomes) > 1000 and valid.failures() == [], report  # zero valid requests denied
    assert {s for _, s in unknown.outcomes} == {"401 key_unknown"}, report
    assert allowed == valid.ok and denied == len(unknown.outcomes), report
    assert _metric(during, "mcp_authz_queue_failing", "usage") == 1, report  # the outage was seen
    assert _metric(during, "mcp_authz_queue_retries_total", "usage") >= 1, report
    # Past the first failed write (a reset, or 5 s without an answer), what is in memory goes to disk.
    assert _metric(during, "mcp_authz_queue_spilled_total", "usage") >= 1, report

    def settled(rows: dict[str, tuple[int, int]]) -> bool:
        return rows["usage"] == (allowed, allowed) and audit_matches_denials(rows["audit"], denied, rig.envoy)

    deadline = asyncio.get_running_loop().time() + 15
    while not settled(rows := await _rows(url, schema)) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.25)
    assert settled(rows), f"stored (rows, distinct request ids) {rows} for {allowed} allowed, {denied} denied; {report}"
    after = (await asyncio.to_thread(sidecar.http, "/metrics")).text
    for queue in ("usage", "audit", "override_status"):
        assert _metric(after, "mcp_authz_queue_dropped_total", queue) == 0, report
        assert _metric(after, "mcp_authz_queue_failing", queue) == 0, report
    assert not list(spool.glob("*.jsonl")), "replayed spool files are deleted"
    assert stat("access_logs.grpc_access_log.logs_dropped") == 0, report
    print(report, f"; spilled {_metric(during, 'mcp_authz_queue_spilled_total', 'usage'):.0f}")


def _host_port(url: str) -> tuple[str, int]:
    hostport = url.split("://", 1)[1].rpartition("@")[2].split("/", 1)[0]
    host, _, port = hostport.partition(":")
    return host, int(port or 5432)


async def test_postgres_connections_reset_for_10_s_lose_and_double_no_record(
    tmp_path: Path, process_stack: ExitStack, pg_schema: tuple[str, str]
) -> None:
    await _outage("reset", tmp_path, process_stack, *pg_schema)


async def test_postgres_held_silent_for_10_s_loses_and_doubles_no_record(
    tmp_path: Path, process_stack: ExitStack, pg_schema: tuple[str, str]
) -> None:
    await _outage("hold", tmp_path, process_stack, *pg_schema)
