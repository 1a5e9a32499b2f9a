"""The ext_authz gRPC servicer: the wrapper around the pipeline.

It translates, decides, and records (metrics, audit, last-used) in this one place.
`Check` never raises: a Denied becomes its denial, and anything unexpected a 503
with reason `internal`, logged without the request's headers. What the core loop could
not read (envoy/request.py `parse`) is answered too: without its metadata, decided as any
request whose tool is unknown; not at all, a 400 `request_unreadable`. Both are logged
(sampled) with the size and the cause, never the bytes.

On the protected resource metadata route (envoy/resource_metadata.py) Check answers the
metadata itself, from the live tables, and decides nothing.

`check` runs on the core loop's thread (envoy/core_loop.py) and hands the
response, already serialized, to `respond`. It never blocks: a key on its first
use is decided again on the hashing thread once Argon2 is done.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from datetime import UTC, datetime

from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_server.envoy import request as request_translator
from authz_server.envoy import resource_metadata
from authz_server.envoy import response as response_translator
from authz_server.envoy.core_loop import Respond
from authz_server.envoy.health import Health
from authz_server.envoy.request import Parsed, Unreadable, WithoutMetadata
from authz_server.errors import Denied, Reason
from authz_server.models import AuditEvent
from authz_server.observability.batch import BatchWriter
from authz_server.observability.metrics import Metrics
from authz_server.observability.last_used import LastUsed
from authz_server.observability.logs import Sampler
from authz_server.pipeline.authn import Pending
from authz_server.pipeline.pipeline import Pipeline
from authz_server.pipeline.types import CheckInput

log = logging.getLogger(__name__)
METHOD = "/envoy.service.auth.v3.Authorization/Check"


class AuthorizationServicer:
    def __init__(
        self,
        pipeline: Pipeline,
        health: Health,
        metrics: Metrics,
        audit: BatchWriter[AuditEvent],
        last_used: LastUsed,
    ) -> None:
        self._pipeline = pipeline
        self._health = health
        self._metrics = metrics
        self._audit = audit
        self._last_used = last_used
        self._log_sampler = Sampler()

    def check(self, request: Parsed, respond: Respond, started: float = 0.0) -> None:
        """Decide and call `respond` once with the serialized CheckResponse, now or after a first-use
        verification. Never raises: failures are denials."""
        started = started or time.perf_counter()
        if not isinstance(request, CheckRequest):
            readable = self._readable(request)
            if readable is None:
                self._metrics.observe_check("deny", Reason.REQUEST_UNREADABLE.value, "", time.perf_counter() - started)
                respond(self._denied(Denied(Reason.REQUEST_UNREADABLE), None))
                return
            request = readable
        inp: CheckInput | None = None
        try:
            inp = request_translator.to_input(request)
            if not self._health.serving:
                # Loading, or the store lost for too long: gRPC UNAVAILABLE, which Envoy's retry policy
                # (envoy.yaml) asks another sidecar about; with none left, Envoy answers its own 503.
                self._metrics.observe_check("deny", Reason.NOT_READY.value, _server(inp), time.perf_counter() - started)
                respond(None)
                return
            if resource_metadata.is_metadata_route(inp.context_extensions):
                self._resource_metadata(inp, respond, started)
                return
            decision = self._pipeline.decide(inp)
            response = response_translator.allow(decision)
        except Pending as pending:
            pending.future.add_done_callback(lambda done: self._resume(done, request, respond, started, inp))
            return
        except Denied as denied:
            self._metrics.observe_check("deny", denied.reason, _server(inp), time.perf_counter() - started)
            respond(self._denied(denied, inp))
            return
        except Exception:
            log.exception("check failed", extra={"request_id": inp.request_id if inp else ""})
            self._internal(inp, respond, started)
            return
        self._last_used.mark(decision.key_id, time.time())
        self._metrics.observe_check("allow", "", decision.server, time.perf_counter() - started)
        respond(response)

    def _resource_metadata(self, inp: CheckInput, respond: Respond, started: float) -> None:
        """Answer a request on the protected resource metadata route (envoy/resource_metadata.py)
        from the live tables; recorded with the status as its reason ("" when it succeeded)."""
        got = resource_metadata.answer(inp.method, inp.path, inp.scheme, inp.host, self._pipeline.serves)
        self._metrics.observe_check(resource_metadata.METADATA_ROUTE, "" if got.status < 300 else str(got.status),
                                    got.server, time.perf_counter() - started)  # fmt: skip
        values = {"decision": resource_metadata.METADATA_ROUTE, "server": got.server}
        respond(response_translator.answer(got.status, got.body, got.headers, values))

    def _resume(
        self, verification: Future[bool], request: CheckRequest, respond: Respond, started: float, inp: CheckInput | None
    ) -> None:
        """On the hashing thread: the verification is done and its outcome cached, so decide again."""
        if verification.cancelled() or verification.exception() is not None:  # shut down, or the hasher broke
            if not verification.cancelled():
                log.error("key verification failed to run", exc_info=verification.exception(),
                          extra={"request_id": inp.request_id if inp else ""})  # fmt: skip
            self._internal(inp, respond, started)
            return
        self.check(request, respond, started)

    def _readable(self, request: WithoutMetadata | Unreadable) -> CheckRequest | None:
        """What of a request upb could not read whole can be decided on (None: nothing); logged, sampled."""
        if isinstance(request, Unreadable):
            message = "check request unreadable; refused"
        else:
            message = "check request metadata unreadable; decided without the MCP method and tool"
        skipped = self._log_sampler.admit(message)
        if skipped is not None:
            extra: dict[str, object] = {"cause": request.why, "bytes": request.size}
            if skipped:
                extra["not_logged_before"] = skipped
            log.warning(message, extra=extra)
        return None if isinstance(request, Unreadable) else request.request

    def _internal(self, inp: CheckInput | None, respond: Respond, started: float) -> None:
        """Answer 503 `internal`: something failed that is not the caller's doing."""
        self._metrics.observe_check("deny", Reason.INTERNAL.value, _server(inp), time.perf_counter() - started)
        respond(self._denied(Denied(Reason.INTERNAL), inp))

    def _denied(self, denied: Denied, inp: CheckInput | None) -> bytes:
        request_id = inp.request_id if inp else ""
        server = _server(inp)
        action = denied.info.audit_action
        if action:
            # A security event (a failed authentication, or a key exposed in a URL; errors.REASONS says
            # which): reason, key id when parsed, source address. Never the key.
            self._audit.put(
                AuditEvent(
                    at=datetime.now(UTC),
                    actor=denied.principal_id or "-",
                    action=action,
                    target=denied.key_id or "-",
                    outcome=denied.reason,
                    request_id=request_id,
                    details={"source": inp.source_ip if inp else "", "server": server},
                )
            )
        skipped = self._log_sampler.admit(denied.reason)
        if skipped is not None:
            extra: dict[str, object] = {"request_id": request_id, "reason": denied.reason, "key_id": denied.key_id,
                                        "server": server}
            if skipped:
                extra["not_logged_before"] = skipped  # same reason, over the per-second log budget
            log.info("denied", extra=extra)
        return response_translator.deny(
            denied, request_id, server, inp.tool if inp else "", inp.mcp_method if inp else "",
            resource_metadata.origin(inp.scheme, inp.host) if inp else "",
        )  # fmt: skip


def _server(inp: CheckInput | None) -> str:
    return inp.context_extensions.get("mcp_server", "") if inp is not None else ""
