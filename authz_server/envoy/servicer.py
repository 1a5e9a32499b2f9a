"""The ext_authz gRPC servicer: the wrapper around the pipeline.

It translates, decides, and records (audit, last-used, metrics) in one place.
`Check` never raises: a Denied becomes its denial, and anything unexpected a
503 with reason `internal`, logged without the request's headers.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse

from authz_server.envoy import request as request_translator
from authz_server.envoy import response as response_translator
from authz_server.errors import Denied, Reason
from authz_server.models import AuditEvent
from authz_server.observability.audit import AuditQueue
from authz_server.observability.usage import LastUsed
from authz_server.pipeline.pipeline import Pipeline

log = logging.getLogger(__name__)


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    def __init__(self, pipeline: Pipeline, audit: AuditQueue, last_used: LastUsed) -> None:
        self._pipeline = pipeline
        self._audit = audit
        self._last_used = last_used

    async def Check(self, request: CheckRequest, context: grpc.aio.ServicerContext) -> CheckResponse:  # noqa: N802
        inp = None
        try:
            inp = request_translator.to_input(request)
            decision = await self._pipeline.decide(inp)
        except Denied as denied:
            return self._denied(denied, inp)
        except Exception:
            log.exception("check failed", extra={"request_id": inp.request_id if inp else ""})
            return self._denied(Denied(Reason.INTERNAL), inp)
        self._last_used.mark(decision.key_id, time.time())
        return response_translator.allow(decision)

    def _denied(self, denied: Denied, inp: object) -> CheckResponse:
        request_id = getattr(inp, "request_id", "")
        server = getattr(inp, "context_extensions", {}).get("mcp_server", "") if inp is not None else ""
        if denied.status == 401:
            # A security event: reason, key id when parsed, source address. Never the key.
            self._audit.record(
                AuditEvent(
                    at=datetime.now(UTC),
                    actor=denied.principal_id or "-",
                    action="authn.failure",
                    target=denied.key_id or "-",
                    outcome=denied.reason,
                    request_id=request_id,
                    details={"source": getattr(inp, "source_ip", ""), "server": server},
                )
            )
        log.info(
            "denied",
            extra={"request_id": request_id, "reason": denied.reason, "key_id": denied.key_id, "server": server},
        )
        return response_translator.deny(denied, request_id, server)
