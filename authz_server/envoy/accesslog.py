"""Envoy's gRPC access-log service: per-request usage attribution.

Check leaves its decision in ext_authz dynamic metadata (principal, key id, server,
tool, decision, and which credential it injected). Envoy's access-log entry carries
that metadata next to the upstream status, bytes and duration; this servicer joins
them into `UsageRecord`s, written in batches.

The core loop, which also answers every Check, only queues each entry as Envoy sent it.
The usage writer turns entries into records on the event loop's thread when it takes
them (`AccessLog.attribute`), ~11 µs of Python per entry that no longer sits between two
Checks (benchmarks/RESULTS.md has the side-by-side figures).

An upstream answering 401 or 403 to a request that carried a principal's override
marks that override `invalid`, with the time and reason.

Envoy keeps one stream per worker. The streams are read on the core loop
(envoy/core_loop.py), which holds no thread per stream, so any number of Envoy
workers can log to one sidecar.

One entry the sidecar cannot read costs only itself, never the stream or the other entries
of its message. Entries carry the MCP filter's copy of the request body's `params.name` and
`params._meta` at whatever depth the client sent, which upb may refuse to parse (past about
30 levels of JSON). So `split`, the core loop's reader, cuts each message into its entries at
the wire level (envoy/protowire.py) without parsing them, and each entry is parsed alone when
the usage writer takes it. An entry upb refuses is read again with only the metadata
attribution reads (ext_authz's namespace), so its usage record is kept; one that still does
not read is skipped and counted (`unreadable_entries`). An entry over `LARGE_ENTRY_BYTES` is
queued without that other metadata too, so a full queue stays small, and one over
`MAX_ENTRY_BYTES` even then is skipped and counted. A message whose framing breaks keeps the
entries before the break and is counted (`unreadable_messages`). The stream always goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf.message import DecodeError

from authz_server.envoy import protowire
from authz_server.models import UsageRecord
from authz_server.observability.batch import BatchWriter
from authz_server.observability.spool import Spool
from authz_server.observability.logs import Sampler

log = logging.getLogger(__name__)
METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
REPLY = als_pb2.StreamAccessLogsResponse().SerializeToString()  # the one answer, when a stream ends
EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
REJECTED_BY_UPSTREAM = frozenset({401, 403})
# An entry of the shipped config is 1-2 KiB; the MCP filter's copy of a body adds at most what 64 KiB
# of JSON holds (envoy.yaml's max_request_body_size), headers at most 60 KiB.
LARGE_ENTRY_BYTES = 16 * 1024  # larger: queued with only the metadata attribution reads
MAX_ENTRY_BYTES = 256 * 1024  # larger even then: skipped and counted

# Field numbers (envoy/service/accesslog/v3/als.proto, envoy/data/accesslog/v3/accesslog.proto,
# envoy/config/core/v3/base.proto); tests/unit/envoy/test_accesslog.py checks them against the descriptors.
_HTTP_LOGS, _LOG_ENTRY = 2, 1  # StreamAccessLogsMessage.http_logs, HTTPAccessLogEntries.log_entry
_COMMON_PROPERTIES = 1  # HTTPAccessLogEntry.common_properties
_METADATA, _FILTER_STATE_OBJECTS = 17, 21  # AccessLogCommon.metadata, .filter_state_objects
_FILTER_METADATA = 1  # Metadata.filter_metadata (typed_filter_metadata, 2, is never read)
_MAP_KEY = 1  # a map entry's key
_ATTRIBUTED_NAMESPACE = EXT_AUTHZ_NAMESPACE.encode()


@dataclass(slots=True)
class Received:
    """One StreamAccessLogsMessage, split: each HTTP entry's bytes, unparsed."""

    entries: list[bytes] = field(default_factory=list)
    broken: bool = False  # the framing broke: the entries before the break are here, the rest is lost


def split(data: bytes) -> Received:
    """The core loop's reader: the HTTP entries of one StreamAccessLogsMessage. Never raises.
    `identifier` (first message of a stream) and `tcp_logs` are skipped, as the parsed message's were."""
    received = Received()
    try:
        for part in protowire.fields(data):
            if part.number == _HTTP_LOGS and part.kind == protowire.LEN:
                protowire.values(data, _LOG_ENTRY, part.start, part.end, received.entries)
    except protowire.WireError:
        received.broken = True
    return received


def attributable(entry: bytes) -> bytes:
    """The HTTPAccessLogEntry in `entry` with only the metadata `to_usage` reads: ext_authz's namespace.
    Raises protowire.WireError when the entry is not well-formed."""
    parts: list[bytes] = []
    for part in protowire.fields(entry):
        if part.number == _COMMON_PROPERTIES and part.kind == protowire.LEN:
            parts.append(protowire.length_delimited(_COMMON_PROPERTIES, _common(entry, part.start, part.end)))
        else:
            parts.append(entry[part.key_start : part.end])
    return b"".join(parts)


def _common(data: bytes, start: int, end: int) -> bytes:
    parts: list[bytes] = []
    for part in protowire.fields(data, start, end):
        if part.number == _METADATA and part.kind == protowire.LEN:
            kept = [data[m.key_start : m.end] for m in protowire.fields(data, part.start, part.end)
                    if m.number == _FILTER_METADATA and _map_key(data, m) == _ATTRIBUTED_NAMESPACE]  # fmt: skip
            parts.append(protowire.length_delimited(_METADATA, b"".join(kept)))
        elif part.number != _FILTER_STATE_OBJECTS:
            parts.append(data[part.key_start : part.end])
    return b"".join(parts)


def _map_key(data: bytes, entry: protowire.Field) -> bytes | None:
    """The (string) key of one map entry; the last one when repeated, as protobuf reads it."""
    if entry.kind != protowire.LEN:
        return None
    key = None
    for part in protowire.fields(data, entry.start, entry.end):
        if part.number == _MAP_KEY:
            key = protowire.string(data, part)
    return key


def to_usage(entry: HTTPAccessLogEntry) -> tuple[UsageRecord, str] | None:
    """The usage record of one entry and the credential source Check injected,
    or None when Check never decided on it (a route without ext_authz, or the sidecar unreachable)."""
    common = entry.common_properties
    namespace = common.metadata.filter_metadata.get(EXT_AUTHZ_NAMESPACE)
    if namespace is None:
        return None
    fields = namespace.fields
    decision = _text(fields, "decision")
    if decision not in ("allow", "deny"):
        return None  # not ours; a bad record would make the store refuse its whole batch
    start = common.start_time
    duration = common.duration if common.HasField("duration") else common.time_to_last_downstream_tx_byte
    request, response = entry.request, entry.response
    record = UsageRecord(
        at=datetime.fromtimestamp(start.seconds, UTC).replace(microsecond=start.nanos // 1000),
        request_id=request.request_id,
        principal_id=_text(fields, "principal_id"),
        key_id=_text(fields, "key_id"),
        server=_text(fields, "server"),
        tool=_text(fields, "tool"),
        mcp_method=_text(fields, "mcp_method"),
        decision=decision,
        reason=_text(fields, "reason"),
        upstream_status=response.response_code.value,
        request_bytes=request.request_headers_bytes + request.request_body_bytes,
        response_bytes=response.response_headers_bytes + response.response_body_bytes,
        duration_ms=duration.seconds * 1e3 + duration.nanos / 1e6,
    )
    return record, _text(fields, "credential")


def _text(fields: Any, name: str) -> str:
    """A string field of the decision's metadata; "" when absent. Reads one map entry, not the whole map."""
    return fields[name].string_value if name in fields else ""


class AccessLog:
    """Reads Envoy's access-log streams: `open()` one per stream, as the core loop accepts it.
    `usage` is the queue of entries on their way to the store."""

    def __init__(
        self,
        append_usage: Callable[[Sequence[UsageRecord]], Awaitable[None]],
        rejected_overrides: BatchWriter[tuple[str, str, str, datetime]],
        queue_size: int,
        remark_after: float = 10.0,
        spool: Spool[UsageRecord] | None = None,
    ) -> None:
        # Small batches, often: each flush is a burst of CPU next to Check on a busy machine. Every 20 ms,
        # at most 100 rows a transaction, gave C a lower p99 at 2,500 req/s in six pairs of six against
        # 500 rows every 0.1 s, for the same peak rate (benchmarks/RESULTS.md).
        self.usage: BatchWriter[UsageRecord] = BatchWriter("usage", append_usage, queue_size, batch=100, interval=0.02,
                                                           convert=self.attribute, spool=spool)  # fmt: skip
        self._rejected = rejected_overrides
        self._remark_after = remark_after
        self._last_marked: dict[tuple[str, str], float] = {}
        self.streams = 0  # open now
        self.entries = 0  # every HTTP entry Envoy delivered
        self.unattributed = 0  # of those, entries Check never decided on
        # Counted on the core loop: messages whose framing broke, entries too large to keep.
        self.unreadable_messages = 0
        self.oversized_entries = 0
        self.unreadable_entries = 0  # counted on the usage writer: entries that do not parse
        self._sampler = Sampler()

    def open(self) -> _Stream:
        self.streams += 1
        return _Stream(self)

    @property
    def unreadable(self) -> int:
        """Entries received but skipped, unread (too large, or not parsable even without foreign metadata).
        Every entry received is written, dropped, unattributed or unreadable."""
        return self.oversized_entries + self.unreadable_entries

    def receive(self, message: Received | als_pb2.StreamAccessLogsMessage) -> None:
        """On the core loop: queue the entries, nothing more (a large one without the metadata it does not need)."""
        put = self.usage.put
        if not isinstance(message, Received):  # already parsed (tests, or a caller of its own)
            entries = message.http_logs.log_entry
            self.entries += len(entries)
            for parsed in entries:
                put(parsed)
            return
        if message.broken:
            self.unreadable_messages += 1
            self._log("access-log message unreadable; the entries after the break are lost",
                      entries_read=len(message.entries))  # fmt: skip
        self.entries += len(message.entries)
        for entry in message.entries:
            if len(entry) > LARGE_ENTRY_BYTES:
                size = len(entry)
                try:
                    entry = attributable(entry)
                except protowire.WireError:
                    pass  # the writer finds it unreadable and counts it
                if len(entry) > MAX_ENTRY_BYTES:
                    self.oversized_entries += 1
                    self._log("access-log entry too large; skipped", bytes=size)
                    continue
            put(entry)

    def attribute(self, item: bytes | HTTPAccessLogEntry) -> UsageRecord | None:
        """On the usage writer: the entry's usage record, or None when Check never decided on it (or it
        is unreadable: counted). An override its upstream refused is marked here."""
        entry = item if isinstance(item, HTTPAccessLogEntry) else self._parse(item)
        if entry is None:
            return None
        joined = to_usage(entry)
        if joined is None:
            self.unattributed += 1
            return None
        record, credential = joined
        if credential == "override" and record.decision == "allow" and record.upstream_status in REJECTED_BY_UPSTREAM:
            self._mark_rejected(record)
        return record

    def _parse(self, data: bytes) -> HTTPAccessLogEntry | None:
        try:
            return HTTPAccessLogEntry.FromString(data)
        except DecodeError:
            pass
        try:  # too deep for upb, most likely: the metadata attribution does not read is left out
            entry = HTTPAccessLogEntry.FromString(attributable(data))
        except (DecodeError, protowire.WireError):
            self.unreadable_entries += 1
            self._log("access-log entry unreadable; skipped", bytes=len(data))
            return None
        self._log("access-log entry read without its other metadata", bytes=len(data))
        return entry

    def _log(self, message: str, **extra: object) -> None:
        skipped = self._sampler.admit(message)
        if skipped is not None:
            if skipped:
                extra["not_logged_before"] = skipped
            log.warning(message, extra=extra)

    def _mark_rejected(self, record: UsageRecord) -> None:
        pair = (record.principal_id, record.server)
        now = time.monotonic()
        if now - self._last_marked.get(pair, -self._remark_after) < self._remark_after:
            return  # a burst of rejections is one status change, not one write each
        self._last_marked[pair] = now
        reason = f"upstream answered {record.upstream_status} (request {record.request_id})"
        self._rejected.put((record.principal_id, record.server, reason, record.at))


class _Stream:
    """One Envoy worker's stream (core_loop.Stream)."""

    __slots__ = ("_log", "_open")

    def __init__(self, access_log: AccessLog) -> None:
        self._log = access_log
        self._open = True

    def receive(self, message: Received | als_pb2.StreamAccessLogsMessage) -> None:
        self._log.receive(message)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._log.streams -= 1
