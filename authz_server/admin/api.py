"""The admin gRPC API (`mcp_authz.admin.v1.Admin`): protobuf at the edge of `AdminOps`.

Every RPC does the same four things, in `_serve`:
1. authenticate the gateway key in the call's metadata (`authorization: Bearer
   mgw_…` or the configured key header) with the sidecar's one `Authenticator`,
   the instance Check uses, so caches and revocation apply to both alike. A
   refusal is a security event, queued for the audit trail like Check's;
2. turn the principal into an `Actor` carrying the call's request id
   (`x-request-id` from the metadata, which Envoy sets, or a fresh one);
3. turn the request into one `AdminOps` call, which decides what the actor may
   do and audits it;
4. turn the result into the reply, or the error into a gRPC status through
   `grpc_status`, the one table. Messages are the errors' own, which never hold
   a secret; the reason goes in the `mcp-authz-reason` trailer.

Steps 3 and 4 are declared per RPC in rpcs.py's table; `_method` turns each row
into a servicer method, and the class gets one per row.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from authz_server.admin.gen import admin_pb2_grpc
from authz_server.admin.ops import AdminOps
from authz_server.admin.policy import Actor
from authz_server.admin.rpcs import RPCS, SERVICE_NAME, Rpc, Stream
from authz_server.admin.wire import REASON_TRAILER
from authz_server.errors import (
    AuthzError,
    ConfigError,
    Conflict,
    Denied,
    GrpcCode,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Reason,
    StoreError,
)
from authz_server.errors import REASONS as _REASONS
from authz_server.models import AuditEvent
from authz_server.observability.batch import BatchWriter
from authz_server.pipeline.authn import Authenticate, KeyExtractor
from authz_server.pipeline.types import CheckInput, Identity
from authz_server.rules import REQUEST_ID_HEADER

__all__ = ["SERVICE_NAME", "AdminServicer", "add_to_server", "error_message", "grpc_status"]

log = logging.getLogger(__name__)

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_INTERNAL = "The admin API failed; operators see the sidecar's log."

# --- the one error table ------------------------------------------------------------------

# The first matching class wins: subclasses before their bases.
ERROR_STATUS: tuple[tuple[type[AuthzError], grpc.StatusCode], ...] = (
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Conflict, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (StoreError, grpc.StatusCode.UNAVAILABLE),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
)
_GRPC: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
# A Denied (authentication) maps by its HTTP status as Check's denials do: from the one denial table.
DENIED_STATUS: dict[int, grpc.StatusCode] = {info.status: _GRPC[info.grpc_code] for info in _REASONS.values()}


def grpc_status(exc: AuthzError) -> grpc.StatusCode:
    """The gRPC status of an error (Envoy's transcoder turns it into the HTTP status)."""
    if isinstance(exc, Denied):
        return DENIED_STATUS.get(exc.status, _GRPC[GrpcCode.UNAVAILABLE])
    for kind, code in ERROR_STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def error_message(exc: AuthzError) -> str:
    """The message a caller sees: the error's own (secret-free by contract), plus a Denied's hint."""
    if isinstance(exc, Denied) and exc.hint:
        return f"{exc.message} {exc.hint}"
    return exc.message


# --- the servicer -------------------------------------------------------------------------------


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """`mcp_authz.admin.v1.Admin` on the sidecar's gRPC server: one method per row of rpcs.RPCS.

    `ready` says whether the in-memory state is loaded and current (the health
    check's answer): until it is, keys cannot be judged, so calls are UNAVAILABLE.
    """

    def __init__(
        self,
        service: AdminOps,
        authenticator: Authenticate,
        extractor: KeyExtractor,
        audit: BatchWriter[AuditEvent],
        ready: Callable[[], bool],
    ) -> None:
        self._svc = service
        self._authn = authenticator
        self._extractor = extractor
        self._audit = audit
        self._ready = ready

    async def _authenticate(self, context: grpc.aio.ServicerContext, method: str) -> Actor:
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        request_id = request_id_of(metadata)
        source = _source(context.peer() or "", metadata)
        identity = await authenticate(self._authn, self._extractor, self._audit, self._ready, metadata,
                                      request_id, source, api="admin", method=method)  # fmt: skip
        return Actor.of(identity.principal, request_id, source)


def request_id_of(headers: Mapping[str, str]) -> str:
    """The call's request id: `x-request-id` as Envoy sets it, when well formed, else a fresh one."""
    given = headers.get(REQUEST_ID_HEADER, "")
    return given if _REQUEST_ID_RE.match(given) else str(uuid.uuid4())


async def authenticate(authn: Authenticate, extractor: KeyExtractor, audit: BatchWriter[AuditEvent],
                       ready: Callable[[], bool], headers: Mapping[str, str], request_id: str, source: str, *,
                       api: str, method: str) -> Identity:  # fmt: skip
    """The gateway key in `headers` (lowercase names), authenticated for a person's API (the admin API, the
    console's sign-in): Check's own authenticator; a refusal is a security event, queued for the audit trail
    like Check's; a key scoped to servers or tools is refused, since it manages nothing."""
    if not ready():
        raise Denied(Reason.NOT_READY)
    try:
        try:
            presented = extractor.extract(CheckInput("POST", "", headers, {}, request_id, source))
        except Denied as missing:
            if missing.code is not Reason.KEY_MISSING:
                raise
            hint = f"Send your gateway key as 'Authorization: Bearer mgw_…' or in the {extractor.key_header} header."
            raise Denied(Reason.KEY_MISSING, hint=hint) from None
        identity = await authn.authenticate_async(presented)
    except Denied as denied:
        if denied.info.audit_action:
            # A security event, as Check records it: reason, key id when parsed, source. Never the key.
            audit.put(
                AuditEvent(
                    at=datetime.now(UTC),
                    actor="-",
                    action=denied.info.audit_action,
                    target=denied.key_id or "-",
                    outcome=denied.reason,
                    request_id=request_id,
                    details={"source": source, "api": api, "method": method},
                )
            )
        log.info(f"{api} call refused", extra={"request_id": request_id, "reason": denied.reason,
                                               "key_id": denied.key_id, "method": method})  # fmt: skip
        raise
    if identity.scope:
        # A scoped key is an app's key for certain MCP servers: it manages nothing.
        raise PermissionDenied(f"A key scoped to servers or tools cannot use the {api} API; use an unscoped key.")
    return identity


class _Answering:
    """Around one call: an error becomes the call's gRPC status (the call is aborted with it)."""

    def __init__(self, context: grpc.aio.ServicerContext, method: str) -> None:
        self._context = context
        self._method = method

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, AuthzError):
            reason = ((REASON_TRAILER, exc.reason),)
            await self._context.abort(grpc_status(exc), error_message(exc), trailing_metadata=reason)
        elif isinstance(exc, Exception):
            log.error("admin call failed", exc_info=exc, extra={"method": self._method})
            await self._context.abort(grpc.StatusCode.INTERNAL, _INTERNAL)


class Unreadable:
    """A request whose bytes are not its message: the method answers INVALID_ARGUMENT (gRPC's own
    deserializer would fail the call as INTERNAL, with a traceback at error level)."""

    __slots__ = ()


def reader(message: type[Message]) -> Callable[[bytes], Message | Unreadable]:
    """The request deserializer of an RPC: never raises."""

    def read(data: bytes) -> Message | Unreadable:
        try:
            return message.FromString(data)
        except DecodeError:  # wrong bytes, or a string that is not UTF-8
            return Unreadable()

    return read


def add_to_server(servicer: object, server: grpc.Server) -> None:
    """Serve `servicer` (an AdminServicer, or its OnLoop stand-in) as `mcp_authz.admin.v1.Admin`:
    the generated registration, with requests read by `reader`."""
    handlers = {}
    for rpc in RPCS:
        make = grpc.unary_stream_rpc_method_handler if isinstance(rpc.reply, Stream) else grpc.unary_unary_rpc_method_handler
        handlers[rpc.name] = make(getattr(servicer, rpc.name), request_deserializer=reader(rpc.request),
                                  response_serializer=rpc.response.SerializeToString)  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _readable(request: Any) -> Any:
    if isinstance(request, Unreadable):
        raise InvalidInput("The request could not be read as its protobuf message (wrong bytes or text that is not UTF-8).")
    return request


def _method(rpc: Rpc) -> Callable[..., Any]:
    """The servicer method of one row: authenticate, run the operation, answer; a coroutine for
    a unary RPC, an async generator (one message per row) for a stream."""
    stream = rpc.reply if isinstance(rpc.reply, Stream) else None

    async def unary(self: AdminServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _Answering(context, rpc.name):
            actor = await self._authenticate(context, rpc.name)
            request = _readable(request)
            return rpc.answer(await getattr(self._svc, rpc.op)(actor, **rpc.arguments(request)), request)

    async def streamed(self: AdminServicer, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        assert stream is not None
        async with _Answering(context, rpc.name):
            actor = await self._authenticate(context, rpc.name)
            async for page in await getattr(self._svc, rpc.op)(actor, **rpc.arguments(_readable(request))):
                for row in page:
                    yield stream.codec.message(row)

    method: Callable[..., Any] = unary if stream is None else streamed
    method.__name__ = method.__qualname__ = rpc.name
    method.__doc__ = f"{rpc.name}: runs AdminOps.{rpc.op}."
    return method


for _rpc in RPCS:
    setattr(AdminServicer, _rpc.name, _method(_rpc))


def _source(peer: str, metadata: Mapping[str, str]) -> str:
    """The caller's address: the gRPC peer, and the client Envoy saw when it forwarded the call."""
    kind, _, rest = peer.partition(":")
    return caller_source(rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else peer, metadata)


def caller_source(address: str, headers: Mapping[str, str]) -> str:
    """The caller's address as the audit trail records it: the peer, and the client Envoy saw when it forwarded."""
    external = headers.get("x-envoy-external-address", "")
    return f"{external} via {address}" if external and external != address else address
