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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2

from authz_server.models import UsageRecord
from authz_server.observability.batch import BatchWriter

log = logging.getLogger(__name__)
METHOD = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
REPLY = als_pb2.StreamAccessLogsResponse().SerializeToString()  # the one answer, when a stream ends
EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
REJECTED_BY_UPSTREAM = frozenset({401, 403})


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
    ) -> None:
        # Small batches, often: each flush is a burst of CPU next to Check on a busy machine. Every 20 ms,
        # at most 100 rows a transaction, gave C a lower p99 at 2,500 req/s in six pairs of six against
        # 500 rows every 0.1 s, for the same peak rate (benchmarks/RESULTS.md).
        self.usage: BatchWriter[UsageRecord] = BatchWriter("usage", append_usage, queue_size, batch=100, interval=0.02,
                                                           convert=self.attribute)  # fmt: skip
        self._rejected = rejected_overrides
        self._remark_after = remark_after
        self._last_marked: dict[tuple[str, str], float] = {}
        self.streams = 0  # open now
        self.entries = 0  # every HTTP entry Envoy delivered
        self.unattributed = 0  # of those, entries Check never decided on

    def open(self) -> _Stream:
        self.streams += 1
        return _Stream(self)

    def receive(self, message: als_pb2.StreamAccessLogsMessage) -> None:
        """On the core loop: queue the entries, nothing more."""
        entries = message.http_logs.log_entry
        self.entries += len(entries)
        put = self.usage.put
        for entry in entries:
            put(entry)

    def attribute(self, entry: HTTPAccessLogEntry) -> UsageRecord | None:
        """On the usage writer: the entry's usage record, or None when Check never decided on it.
        An override its upstream refused is marked here."""
        joined = to_usage(entry)
        if joined is None:
            self.unattributed += 1
            return None
        record, credential = joined
        if credential == "override" and record.decision == "allow" and record.upstream_status in REJECTED_BY_UPSTREAM:
            self._mark_rejected(record)
        return record

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

    def receive(self, message: als_pb2.StreamAccessLogsMessage) -> None:
        self._log.receive(message)

    def close(self) -> None:
        if self._open:
            self._open = False
            self._log.streams -= 1
