"""Envoy's gRPC access-log service: per-request usage attribution.

Check leaves its decision in ext_authz dynamic metadata (principal, key id, server,
tool, decision, and which credential it injected). Envoy's access-log entry carries
that metadata next to the upstream status, bytes and duration; this servicer joins
them into `UsageRecord`s, queued off the request path and written in batches.

An upstream answering 401 or 403 to a request that carried a principal's override
marks that override `invalid`, with the time and reason.

Each stream (one per Envoy worker) holds a gRPC worker thread for its lifetime.
Streams beyond `max_streams` are refused with RESOURCE_EXHAUSTED, so access logs
can never take every thread and leave Check waiting: Envoy counts what it then
drops, and the sidecar counts the refusals.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any
from datetime import UTC, datetime

import grpc
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from authz_server.models import UsageRecord
from authz_server.observability.batch import BatchWriter
from authz_server.observability.logs import Sampler

log = logging.getLogger(__name__)
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


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(
        self,
        usage: BatchWriter[UsageRecord],
        rejected_overrides: BatchWriter[tuple[str, str, str, datetime]],
        max_streams: int,
        remark_after: float = 10.0,
    ) -> None:
        self._usage = usage
        self._rejected = rejected_overrides
        self._max_streams = max_streams
        self._remark_after = remark_after
        self._last_marked: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()
        self._refusals_logged = Sampler(per_second=1)
        self.streams = 0  # open now
        self.refused_streams = 0
        self.entries = 0  # every HTTP entry Envoy delivered
        self.unattributed = 0  # of those, entries Check never decided on

    def StreamAccessLogs(  # noqa: N802
        self, request_iterator: Iterator[als_pb2.StreamAccessLogsMessage], context: grpc.ServicerContext | None
    ) -> als_pb2.StreamAccessLogsResponse:
        """One stream per Envoy worker, each held by one gRPC worker thread for its lifetime."""
        with self._lock:
            admitted = self.streams < self._max_streams
            if admitted:
                self.streams += 1
            else:
                self.refused_streams += 1
        if not admitted:
            if self._refusals_logged.admit("streams") is not None:
                log.warning("access-log stream refused: raise MCP_AUTHZ_GRPC_THREADS to over twice Envoy's workers",
                            extra={"open_streams": self._max_streams})
            assert context is not None
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Too many access-log streams for this sidecar's threads.")
        try:
            self._consume(request_iterator)
        finally:
            with self._lock:
                self.streams -= 1
        return als_pb2.StreamAccessLogsResponse()

    def _consume(self, request_iterator: Iterator[als_pb2.StreamAccessLogsMessage]) -> None:
        for message in request_iterator:
            for entry in message.http_logs.log_entry:
                self.entries += 1
                joined = to_usage(entry)
                if joined is None:
                    self.unattributed += 1
                    continue
                record, credential = joined
                self._usage.put(record)
                if credential == "override" and record.decision == "allow" and record.upstream_status in REJECTED_BY_UPSTREAM:
                    self._mark_rejected(record)

    def _mark_rejected(self, record: UsageRecord) -> None:
        pair = (record.principal_id, record.server)
        now = time.monotonic()
        if now - self._last_marked.get(pair, -self._remark_after) < self._remark_after:
            return  # a burst of rejections is one status change, not one write each
        self._last_marked[pair] = now
        reason = f"upstream answered {record.upstream_status} (request {record.request_id})"
        self._rejected.put((record.principal_id, record.server, reason, record.at))
