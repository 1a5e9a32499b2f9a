"""Write-behind queues, access-log attribution, override rejection, health and metrics."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.struct_pb2 import Struct
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authz_server.envoy.accesslog import EXT_AUTHZ_NAMESPACE, AccessLog, to_usage
from authz_server.envoy.health import Health
from authz_server.live.tables import AuthState, KeyEntry
from authz_server.observability import metrics as metrics_module
from authz_server.observability.batch import BatchWriter
from authz_server.observability.logs import Sampler


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[object]] = []
        self.fail = fail

    async def write(self, records: Sequence[object]) -> None:
        if self.fail:
            raise ConnectionError("store down")
        self.batches.append(list(records))


async def test_batch_writer_batches_and_flushes_on_cancel() -> None:
    sink = Sink()
    writer: BatchWriter[int] = BatchWriter("t", sink.write, maxsize=100, batch=10)
    for i in range(25):
        writer.put(i)
    task = asyncio.create_task(writer.run())
    await asyncio.sleep(0.05)
    writer.put(99)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r for b in sink.batches for r in b] == [*range(25), 99]
    assert max(len(b) for b in sink.batches) <= 10
    assert (writer.written, writer.dropped, writer.depth) == (26, 0, 0)


async def test_batch_writer_counts_what_it_loses() -> None:
    sink = Sink(fail=True)
    writer: BatchWriter[int] = BatchWriter("t", sink.write, maxsize=3)
    for i in range(5):
        writer.put(i)  # 2 beyond the bound
    assert writer.dropped == 2
    await writer.flush()  # the store fails: the 3 queued are counted, not silently lost
    assert (writer.written, writer.dropped) == (0, 5)


def _entry(md: dict[str, str] | None, status: int = 200) -> HTTPAccessLogEntry:
    e = HTTPAccessLogEntry()
    e.common_properties.start_time.FromDatetime(datetime(2026, 11, 21, 12, 0, 0, 123456))
    e.common_properties.duration.FromMilliseconds(12)
    e.request.request_id = "rid-1"
    e.request.request_headers_bytes = 100
    e.request.request_body_bytes = 50
    e.response.response_code.value = status
    e.response.response_headers_bytes = 30
    e.response.response_body_bytes = 70
    if md is not None:
        s = Struct()
        s.update(md)
        e.common_properties.metadata.filter_metadata[EXT_AUTHZ_NAMESPACE].CopyFrom(s)
    return e


ALLOW = {"decision": "allow", "principal_id": "p_a", "key_id": "K1", "server": "github", "tool": "search",
         "mcp_method": "tools/call", "credential": "override"}


def test_access_log_entry_becomes_a_usage_record() -> None:
    record, credential = to_usage(_entry(ALLOW, 201))  # type: ignore[misc]
    assert credential == "override"
    assert record.at == datetime(2026, 11, 21, 12, 0, 0, 123456, tzinfo=UTC)
    assert (record.request_id, record.principal_id, record.key_id, record.server) == ("rid-1", "p_a", "K1", "github")
    assert (record.tool, record.mcp_method, record.decision, record.reason) == ("search", "tools/call", "allow", "")
    assert (record.upstream_status, record.request_bytes, record.response_bytes) == (201, 150, 100)
    assert record.duration_ms == pytest.approx(12.0)


def test_entries_check_never_decided_on_are_not_attributed() -> None:
    assert to_usage(_entry(None)) is None
    assert to_usage(_entry({"other": "x"})) is None


def _stream(access_log: AccessLog, entries: list[HTTPAccessLogEntry]) -> None:
    msg = als_pb2.StreamAccessLogsMessage()
    msg.http_logs.log_entry.extend(entries)
    stream = access_log.open()
    stream.receive(msg)
    stream.close()


async def test_upstream_rejection_marks_the_override_once_per_burst() -> None:
    store = Sink()
    rejected: BatchWriter[object] = BatchWriter("rejected", Sink().write, 100)
    servicer = AccessLog(store.write, rejected, 100)  # type: ignore[arg-type]
    entries = [
        _entry(ALLOW, 401),
        _entry(ALLOW, 403),  # same pair, same burst
        _entry({**ALLOW, "credential": "shared"}, 401),  # the shared default is not an override
        _entry({**ALLOW, "decision": "deny", "reason": "credential_missing"}, 403),  # our own denial
        _entry({**ALLOW, "principal_id": "p_b"}, 200),
        _entry(None, 404),
    ]
    _stream(servicer, entries)
    await servicer.usage.flush()
    assert (servicer.entries, servicer.unattributed, servicer.usage.written) == (6, 1, 5)
    assert [r.upstream_status for b in store.batches for r in b] == [401, 403, 401, 403, 200]  # type: ignore[attr-defined]
    assert rejected.depth == 1
    principal, server, reason, _at = rejected._queue.popleft()  # type: ignore[misc]
    assert (principal, server) == ("p_a", "github") and "401" in reason


async def test_entries_are_only_queued_on_the_stream_and_attributed_by_the_writer() -> None:
    store = Sink()
    access_log = AccessLog(store.write, BatchWriter("rejected", Sink().write, 100), 3)  # type: ignore[arg-type]
    msg = als_pb2.StreamAccessLogsMessage()
    msg.http_logs.log_entry.extend([_entry(ALLOW), _entry(None), _entry({**ALLOW, "principal_id": "p_b"})])
    access_log.open().receive(msg)
    # Received: counted and queued as Envoy sent them, nothing joined yet (that is the writer's work).
    assert (access_log.entries, access_log.unattributed, access_log.usage.depth, store.batches) == (3, 0, 3, [])
    access_log.open().receive(msg)  # the queue holds 3: these 3 are dropped and counted
    await access_log.usage.flush()
    assert [r.principal_id for b in store.batches for r in b] == ["p_a", "p_b"]  # type: ignore[attr-defined]
    usage = access_log.usage
    assert (access_log.entries, access_log.unattributed, usage.written, usage.dropped) == (6, 1, 2, 3)
    # What the stopped line and the metrics promise: every entry received is written, dropped or unattributed.
    assert access_log.entries - access_log.unattributed == usage.written + usage.dropped


async def test_an_item_that_cannot_be_converted_costs_only_itself() -> None:
    sink = Sink()

    def convert(item: int) -> int | None:
        if item == 3:
            raise ValueError("corrupt")
        return None if item == 4 else item * 10

    writer: BatchWriter[int] = BatchWriter("t", sink.write, maxsize=100, batch=4, convert=convert)
    for i in range(8):
        writer.put(i)
    await writer.flush()
    assert [r for b in sink.batches for r in b] == [0, 10, 20, 50, 60, 70]
    assert (writer.written, writer.dropped, writer.depth) == (6, 1, 0)
    writer.put(1)
    await writer.flush()  # the writer goes on after a bad item
    assert writer.written == 7


async def test_health_follows_store_reachability() -> None:
    health = Health(store_outage_limit=0.2)
    health.start()
    assert not health.serving and "starting" in health.reason
    follower = SimpleNamespace(last_success=time.monotonic(), last_error="")
    watch = asyncio.create_task(health.watch(follower, interval=0.02))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert health.serving
    follower.last_error = "StoreError"
    await asyncio.sleep(0.3)
    assert not health.serving and "store unreachable" in health.reason and "StoreError" in health.reason
    follower.last_success = time.monotonic()
    await asyncio.sleep(0.05)
    assert health.serving
    watch.cancel()


def test_metrics_exposition_parses_and_labels_stay_low_cardinality() -> None:
    state = AuthState()
    now = time.time()
    state.keys = {
        "A": KeyEntry("A", "p_alice", "h", None, None, ()),
        "B": KeyEntry("B", "p_alice", "h", None, now - 1, ()),  # revoked
        "C": KeyEntry("C", "p_bob", "h", now - 1, None, ()),  # expired
    }
    queue: BatchWriter[int] = BatchWriter("usage", Sink().write, 10)
    queue.put(1)
    sidecar = SimpleNamespace(
        authenticator=SimpleNamespace(cache_hits=7, cache_misses=2, negative_hits=3, negative=[1, 2], argon2_runs=2,
                                      inflight=0, verified=SimpleNamespace(evictions=1)),
        follower=SimpleNamespace(last_success=time.monotonic(), seen_seq=12),
        state=state,
        health=SimpleNamespace(serving=True),
        access_log=SimpleNamespace(streams=2),
        queues=lambda: [queue],
    )
    state.seq = 10
    m = metrics_module.create(sidecar)  # type: ignore[arg-type]
    m.observe_check("allow", "", "github", 0.0002)
    m.observe_check("deny", "key_revoked", "github", 0.0001)
    text = generate_latest(m.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert values[("mcp_authz_check_decisions_total", (("decision", "deny"), ("reason", "key_revoked"), ("server", "github")))] == 1
    assert values[("mcp_authz_key_cache_total", (("result", "hit"),))] == 7
    assert values[("mcp_authz_key_cache_evictions_total", ())] == 1
    assert values[("mcp_authz_entities", (("kind", "active_keys"),))] == 1
    assert values[("mcp_authz_changelog_lag_sequence", ())] == 2
    assert values[("mcp_authz_queue_depth", (("queue", "usage"),))] == 1
    assert values[("mcp_authz_access_log_streams", ())] == 2
    assert values[("mcp_authz_check_duration_seconds_count", ())] == 2
    assert "mcp_authz_build_info" in {s.name for f in families.values() for s in f.samples}
    for (_, labels), _v in values.items():
        for _k, v in labels:
            assert "p_alice" not in v and "p_bob" not in v and "mgw_" not in v


def test_check_metrics_counted_on_many_threads_add_up_exactly() -> None:
    m = metrics_module.create()

    def work() -> None:
        for i in range(2000):
            m.observe_check("allow", "", "github", 0.0001 if i % 2 else 0.003)  # 0.0001 is a bucket bound: le

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m.observe_check("deny", "key_unknown", "", 0.0002)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(m.registry).decode()) for s in f.samples}
    assert samples[("mcp_authz_check_decisions_total", (("decision", "allow"), ("reason", ""), ("server", "github")))] == 8000
    assert samples[("mcp_authz_check_duration_seconds_count", ())] == 8001
    assert samples[("mcp_authz_check_duration_seconds_bucket", (("le", "0.0001"),))] == 4000
    assert samples[("mcp_authz_check_duration_seconds_bucket", (("le", "0.00025"),))] == 4001
    assert samples[("mcp_authz_check_duration_seconds_bucket", (("le", "0.0025"),))] == 4001
    assert samples[("mcp_authz_check_duration_seconds_bucket", (("le", "+Inf"),))] == 8001
    assert abs(samples[("mcp_authz_check_duration_seconds_sum", ())] - (4000 * 0.0001 + 4000 * 0.003 + 0.0002)) < 1e-9


def test_log_sampler_caps_lines_per_reason_and_reports_what_it_left_out() -> None:
    now = [0.0]
    sampler = Sampler(per_second=3, clock=lambda: now[0])
    assert [sampler.admit("key_checksum") for _ in range(5)] == [0, 0, 0, None, None]
    assert sampler.admit("key_unknown") == 0  # each reason has its own budget
    now[0] = 1.5
    assert sampler.admit("key_checksum") == 2  # the next line says how many were not logged
    assert sampler.admit("key_checksum") == 0


def test_access_log_streams_are_counted_while_open_and_each_closes_once() -> None:
    access_log = AccessLog(Sink().write, BatchWriter("rejected", Sink().write, 100), 100)  # type: ignore[arg-type]
    streams = [access_log.open() for _ in range(3)]
    msg = als_pb2.StreamAccessLogsMessage()
    msg.http_logs.log_entry.append(_entry(ALLOW))
    for stream in streams:
        stream.receive(msg)
    assert access_log.streams == 3 and access_log.usage.depth == 3
    streams[0].close()
    streams[0].close()  # a stream that failed, then ended: counted down once
    assert access_log.streams == 2
