"""envoy/accesslog.py: Envoy's access log entries become usage records (attribution), queued on the
stream and joined by the writer; an upstream's rejection marks the override once per burst."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.struct_pb2 import Struct

from authz_server.envoy.accesslog import EXT_AUTHZ_NAMESPACE, AccessLog, to_usage
from authz_server.observability.batch import BatchWriter

from ..fakes import Sink


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
