"""Issue 13, write-behind that survives outages: a store that cannot be written for a while loses
no usage record.

A real sidecar on SQLite behind a real Envoy, under a steady load of valid requests and of requests
with an unknown key. The test holds an exclusive lock on the database for 10 s (no other connection
can write; the sidecar's writes wait out their busy timeout, then fail), then lets go. Meanwhile
every valid request is still answered 2xx, the queues retry and spill to their spool beside the
database, and afterwards every request Envoy counts as allowed has exactly one usage row and every
one it counts as denied its audit event (a second only where Envoy retried the Check); nothing was
dropped, and the spool is empty again.

The same outage with the sidecar stopped (SIGTERM) in the middle of it: the records it could not
write stay in its spool, and its successor, started once the store is back, writes them.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sqlite3
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from authz_server.crypto.keys import generate
from authz_server.errors import AUTHN_FAILURE

from .sidecar import run_sidecar
from .test_rolling_restart import Rig, _all_healthy, _windows, audit_matches_denials

pytestmark = pytest.mark.e2e

OUTAGE = 10.0  # seconds: longer than the SQLite store's busy timeout (5 s), so writes fail, not just wait
DENY_RATE = 20.0  # requests per second with an unknown key, beside the valid load


def _metric(text: str, name: str, queue: str) -> float:
    match = re.search(rf'^{name}{{queue="{queue}"}} (\S+)$', text, re.MULTILINE)
    assert match, f"{name}{{queue={queue!r}}} not in /metrics"
    return float(match.group(1))


async def test_a_store_that_cannot_be_written_for_seconds_loses_no_record(
    tmp_path: Path, process_stack: ExitStack
) -> None:
    rig = await Rig.start(tmp_path, process_stack, 1)
    sidecar = rig.sidecars[0]
    database = rig.world.store_url.removeprefix("sqlite:///")
    load, unknown = rig.load(), rig.load(generate()[1].reveal(), DENY_RATE)
    running = [asyncio.create_task(load.run()), asyncio.create_task(unknown.run())]
    lock = sqlite3.connect(database, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.sleep(2)
        await asyncio.to_thread(lock.execute, "BEGIN EXCLUSIVE")  # the outage begins
        await asyncio.sleep(OUTAGE)
        during = (await asyncio.to_thread(sidecar.http, "/metrics")).text
        await asyncio.to_thread(lock.execute, "ROLLBACK")  # the store is back
        await asyncio.sleep(2)
    finally:
        lock.close()
        load.stop()
        unknown.stop()
        await asyncio.gather(*running)

    stat = rig.envoy.stat
    allowed, denied = stat("http.mcp_ingress.ext_authz.ok"), stat("http.mcp_ingress.ext_authz.denied")
    report = (f"{len(load.outcomes)} requests, {load.ok} 2xx; failures: {_windows(load.failures())}; "
              f"{len(unknown.outcomes)} with an unknown key; Envoy: {allowed} allowed, {denied} denied")  # fmt: skip
    assert len(load.outcomes) > 1000, report
    assert load.failures() == [], report  # Check never needed the store
    assert {s for _, s in unknown.outcomes} == {"401 key_unknown"}, report
    assert allowed == load.ok and denied == len(unknown.outcomes), report
    for queue in ("usage", "audit"):
        assert _metric(during, "mcp_authz_queue_retries_total", queue) >= 1, report
        assert _metric(during, "mcp_authz_queue_spilled_total", queue) >= 1, report

    usage = await rig.usage_settles_at(load.ok)
    assert usage == (load.ok, load.ok), f"usage rows (all, distinct) {usage} for {load.ok} allowed; {report}"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10) as db:
        audit = db.execute("SELECT count(*), count(DISTINCT request_id) FROM audit_events WHERE action = ?",
                           (AUTHN_FAILURE,)).fetchone()  # fmt: skip
    assert audit_matches_denials(audit, denied, rig.envoy), f"audit (all, distinct) {audit} for {denied} denied; {report}"
    after = (await asyncio.to_thread(sidecar.http, "/metrics")).text
    for queue in ("usage", "audit", "override_status"):
        assert _metric(after, "mcp_authz_queue_dropped_total", queue) == 0, report
    assert _metric(after, "mcp_authz_queue_spooled_bytes", "usage") == 0, report
    assert _metric(after, "mcp_authz_queue_failing", "usage") == 0, report
    spool = Path(database + ".spool")
    assert spool.is_dir() and not list(spool.glob("*.jsonl")), "replayed spool files are deleted"
    assert rig.envoy.stat("access_logs.grpc_access_log.logs_dropped") == 0, report
    print(report)


async def test_a_sidecar_stopped_during_an_outage_leaves_its_records_to_the_next_start(
    tmp_path: Path, process_stack: ExitStack
) -> None:
    rig = await Rig.start(tmp_path, process_stack, 1)
    old = rig.sidecars[0]
    database = rig.world.store_url.removeprefix("sqlite:///")
    spool = Path(database + ".spool")
    load = rig.load()
    running = asyncio.create_task(load.run())
    lock = sqlite3.connect(database, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.sleep(2)
        await asyncio.to_thread(lock.execute, "BEGIN EXCLUSIVE")
        await asyncio.sleep(OUTAGE)
        signalled = time.monotonic()
        old.process.proc.send_signal(signal.SIGTERM)  # stopped while the store still cannot be written
        code = await asyncio.to_thread(old.process.proc.wait, 30)
        exited_after = time.monotonic() - signalled
        spooled = sum(f.stat().st_size for f in spool.glob("usage.*.jsonl"))
        await asyncio.to_thread(lock.execute, "ROLLBACK")
        rig.sidecars[0] = await asyncio.to_thread(
            rig.stack.enter_context, run_sidecar(rig.world, port=old.port, name="sidecar1-restarted")
        )
        await _all_healthy(rig.envoy, 1)
        await asyncio.sleep(2)
    finally:
        lock.close()
        load.stop()
        await running

    logs = old.logs()
    report = (f"exited {exited_after:.1f} s after SIGTERM; {len(load.outcomes)} requests, {load.ok} 2xx; "
              f"failures: {_windows(load.failures())}")  # fmt: skip
    assert code == 0, logs[-3000:]
    # The drain (2 s), then no store write waited on twice: what is in memory goes to disk, the
    # last-used flush already failing is not retried; a write abandoned in SQLite's busy wait (5 s)
    # ends. About 6 s here, 10 s on a starved machine; waiting twice took 18 s.
    assert exited_after < 15, report
    assert spooled > 0 and '"usage_dropped": 0' in logs, logs[-3000:]
    assert "records left on disk for the next start" in logs, logs[-3000:]
    assert load.ok > 1000, report
    usage = await rig.usage_settles_at(load.ok)
    assert usage == (load.ok, load.ok), f"usage rows (all, distinct) {usage} for {load.ok} allowed; {report}"
    assert not list(spool.glob("*.jsonl")), "the successor replayed and deleted the spool"
    print(report)
