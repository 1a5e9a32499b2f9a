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
    assert to_usage(_entry({"decision": "resource_metadata", "server": "github"})) is None  # metadata, no MCP call


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


# --- one unreadable entry costs only itself --------------------------------------------------------


def test_the_wire_field_numbers_are_the_protos() -> None:
    from envoy.config.core.v3.base_pb2 import Metadata
    from envoy.data.accesslog.v3.accesslog_pb2 import AccessLogCommon

    from authz_server.envoy import accesslog

    message = als_pb2.StreamAccessLogsMessage.DESCRIPTOR
    assert message.fields_by_name["http_logs"].number == accesslog._HTTP_LOGS  # noqa: SLF001
    assert message.fields_by_name["http_logs"].message_type.fields_by_name["log_entry"].number == accesslog._LOG_ENTRY  # noqa: SLF001
    assert HTTPAccessLogEntry.DESCRIPTOR.fields_by_name["common_properties"].number == accesslog._COMMON_PROPERTIES  # noqa: SLF001
    common = AccessLogCommon.DESCRIPTOR.fields_by_name
    assert (common["metadata"].number, common["filter_state_objects"].number) == (accesslog._METADATA, accesslog._FILTER_STATE_OBJECTS)  # noqa: SLF001
    assert Metadata.DESCRIPTOR.fields_by_name["filter_metadata"].number == accesslog._FILTER_METADATA  # noqa: SLF001


def _ld(number: int, value: bytes) -> bytes:
    from authz_server.envoy.protowire import length_delimited

    return length_delimited(number, value)


def _deep_struct(levels: int) -> bytes:
    """A google.protobuf.Struct {"a": {"a": ... {}}} nested `levels` deep, serialized by hand (upb refuses it)."""
    struct = b""
    for _ in range(levels):
        struct = _ld(1, _ld(1, b"a") + _ld(2, _ld(5, struct)))
    return struct


def _with_mcp(entry: HTTPAccessLogEntry, struct: bytes) -> bytes:
    """`entry` serialized, with the MCP filter's namespace set to `struct` (appended: messages merge)."""
    namespace = _ld(1, _ld(1, b"envoy.filters.http.mcp") + _ld(2, struct))
    return entry.SerializeToString() + _ld(1, _ld(17, namespace))


def _message(*entries: bytes, identifier: bool = True) -> bytes:
    head = _ld(1, als_pb2.StreamAccessLogsMessage.Identifier(log_name="mcp_authz_usage").SerializeToString())
    return (head if identifier else b"") + _ld(2, b"".join(_ld(1, e) for e in entries))


def _named(request_id: str, md: dict[str, str] | None = None) -> HTTPAccessLogEntry:
    e = _entry({**ALLOW, **(md or {})})
    e.request.request_id = request_id
    return e


def test_split_finds_the_entries_upb_finds_and_skips_identifier_and_tcp_logs() -> None:
    from authz_server.envoy.accesslog import split

    msg = als_pb2.StreamAccessLogsMessage()
    msg.identifier.log_name = "mcp_authz_usage"
    msg.http_logs.log_entry.extend([_named("a"), _named("b" * 300), _entry(None)])
    msg.tcp_logs.log_entry.add().common_properties.route_name = "tcp"
    received = split(msg.SerializeToString())
    assert not received.broken
    assert received.entries == [e.SerializeToString() for e in msg.http_logs.log_entry]
    assert split(b"") .entries == [] and not split(b"").broken


async def test_a_deep_entry_costs_nothing_its_message_carries_and_keeps_its_own_record() -> None:
    """Before: upb refused the whole message, and the stream was ended. Now each entry is read alone, the
    deep one without the MCP filter's metadata it does not need."""
    from authz_server.envoy.accesslog import split

    store = Sink()
    access_log = AccessLog(store.write, BatchWriter("rejected", Sink().write, 100), 100)  # type: ignore[arg-type]
    deep = _with_mcp(_named("deep"), _deep_struct(60))
    data = _message(_named("first").SerializeToString(), deep, _named("last").SerializeToString())
    with pytest.raises(Exception):  # noqa: B017, PT011 - what the sidecar used to do with it
        als_pb2.StreamAccessLogsMessage.FromString(data)
    stream = access_log.open()
    stream.receive(split(data))
    await access_log.usage.flush()
    assert [r.request_id for b in store.batches for r in b] == ["first", "deep", "last"]  # type: ignore[attr-defined]
    assert (access_log.entries, access_log.unreadable, access_log.unreadable_messages, access_log.streams) == (3, 0, 0, 1)


async def test_unreadable_entries_and_messages_are_skipped_and_counted_and_the_rest_recorded() -> None:
    from authz_server.envoy.accesslog import MAX_ENTRY_BYTES, split

    store = Sink()
    access_log = AccessLog(store.write, BatchWriter("rejected", Sink().write, 100), 100)  # type: ignore[arg-type]
    stream = access_log.open()
    broken_entry = _named("broken").SerializeToString()[:-2]  # its own framing broken: unreadable alone
    huge = _named("huge")
    huge.request.path = "/" + "x" * MAX_ENTRY_BYTES  # over the bound even without foreign metadata
    for data in (
        _message(_named("one").SerializeToString(), broken_entry, _named("two").SerializeToString()),
        b"\xff\xff\xff\xff",  # not a message at all
        _message(_named("three").SerializeToString(), huge.SerializeToString()),
        _message(_named("four").SerializeToString(), _named("cut").SerializeToString())[:-3],  # framing broken
        _message(_named("five").SerializeToString(), identifier=False),
    ):
        stream.receive(split(data))
    await access_log.usage.flush()
    recorded = [r.request_id for b in store.batches for r in b]  # type: ignore[attr-defined]
    # "four" was in the message whose framing broke, before the break (the message's only field).
    assert recorded == ["one", "two", "three", "five"]
    assert (access_log.unreadable_entries, access_log.oversized_entries, access_log.unreadable_messages) == (1, 1, 2)
    usage = access_log.usage
    # Every entry received is written, dropped, unattributed or unreadable.
    assert access_log.entries - access_log.unattributed - access_log.unreadable == usage.written + usage.dropped


def test_a_large_entry_is_queued_with_only_the_metadata_attribution_reads() -> None:
    from authz_server.envoy.accesslog import LARGE_ENTRY_BYTES, attributable, split, to_usage

    access_log = AccessLog(Sink().write, BatchWriter("rejected", Sink().write, 100), 100)  # type: ignore[arg-type]
    meta = Struct()
    meta.update({"params": {"_meta": {f"k{i}": "v" * 50 for i in range(2000)}}})
    big = _named("big")
    big.common_properties.metadata.filter_metadata["envoy.filters.http.mcp"].CopyFrom(meta)
    assert big.ByteSize() > LARGE_ENTRY_BYTES
    access_log.open().receive(split(_message(big.SerializeToString())))
    (queued,) = access_log.usage._queue  # noqa: SLF001
    assert len(queued) < 1024
    kept = HTTPAccessLogEntry.FromString(queued)
    assert list(kept.common_properties.metadata.filter_metadata) == [EXT_AUTHZ_NAMESPACE]
    assert to_usage(kept) == to_usage(big)
    assert HTTPAccessLogEntry.FromString(attributable(big.SerializeToString())) == kept


async def test_fuzz_split_and_attribution_never_raise() -> None:
    """Random bytes, real messages cut at every length or with bytes flipped, entries nested at random
    depths: nothing raises, and every entry is accounted for."""
    import random

    from authz_server.envoy.accesslog import split

    rng = random.Random(13)
    store = Sink()
    access_log = AccessLog(store.write, BatchWriter("rejected", Sink().write, 100), 100_000)  # type: ignore[arg-type]
    real = _message(*(_named(str(i)).SerializeToString() for i in range(5)))
    inputs = [rng.randbytes(rng.randrange(0, 80)) for _ in range(5_000)] + [real[:cut] for cut in range(len(real))]
    for _ in range(5_000):
        flipped = bytearray(real)
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        inputs.append(bytes(flipped))
    inputs += [_message(_with_mcp(_named("deep"), _deep_struct(rng.randrange(1, 400)))) for _ in range(100)]
    stream = access_log.open()
    for data in inputs:
        stream.receive(split(data))
    await access_log.usage.flush()
    usage = access_log.usage
    assert access_log.entries - access_log.unattributed - access_log.unreadable == usage.written + usage.dropped
    assert sum(1 for b in store.batches for r in b if r.request_id == "deep") == 100  # type: ignore[attr-defined]
