"""The admin gRPC API (`mcp_authz.admin.v1.Admin`): protobuf at the edge of `AdminService`.

Every RPC does the same four things, in `_call`:
1. authenticate the gateway key in the call's metadata (`authorization: Bearer
   mgw_…` or the configured key header) with the sidecar's one `Authenticator`,
   the instance Check uses, so caches and revocation apply to both alike. A
   refusal is a security event, queued for the audit trail like Check's;
2. turn the principal into an `Actor` carrying the call's request id
   (`x-request-id` from the metadata, which Envoy sets, or a fresh one);
3. translate the request message into one `AdminService` call, which decides
   what the actor may do and audits it;
4. translate the view back into a message, or the error into a gRPC status
   through `grpc_status`, the one table. Messages are the errors' own, which
   never hold a secret; the reason goes in the `mcp-authz-reason` trailer.

The translators between views and messages live here too, both ways, so the
remote CLI client (`remote.py`) turns answers back into the very views the
local CLI renders.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from authz_server.admin.gen import admin_pb2 as pb
from authz_server.admin.gen import admin_pb2_grpc
from authz_server.admin.service import (
    Actor,
    AdminService,
    AuditView,
    CredentialStatusView,
    GatewayKeyView,
    OverrideTestView,
    OverrideView,
    PrincipalView,
    ServerFormView,
    ServerView,
    TeamView,
    UsageView,
    WhoAmIView,
)
from authz_server.errors import (
    AuthzError,
    ConfigError,
    Conflict,
    Denied,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Reason,
    StoreError,
)
from authz_server.models import AuditEvent, Placeholder
from authz_server.observability.batch import BatchWriter
from authz_server.pipeline.authn import Authenticate, KeyExtractor
from authz_server.pipeline.types import CheckInput

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Admin"].full_name
REASON_TRAILER = "mcp-authz-reason"
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_T = TypeVar("_T")

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
# A Denied (authentication) maps by its HTTP status, as Check's denials do.
DENIED_STATUS: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def grpc_status(exc: AuthzError) -> grpc.StatusCode:
    """The gRPC status of an error (Envoy's transcoder turns it into the HTTP status)."""
    if isinstance(exc, Denied):
        return DENIED_STATUS.get(exc.status, grpc.StatusCode.UNAVAILABLE)
    for kind, code in ERROR_STATUS:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


def error_message(exc: AuthzError) -> str:
    """The message a caller sees: the error's own (secret-free by contract), plus a Denied's hint."""
    if isinstance(exc, Denied) and exc.hint:
        return f"{exc.message} {exc.hint}"
    return exc.message


# --- views <-> messages -----------------------------------------------------------------------


def _stamp(target: Timestamp, value: datetime | None) -> None:
    if value is not None:
        target.FromDatetime(value.astimezone(UTC))


def _when(msg: Any, name: str) -> datetime | None:
    return msg.__getattribute__(name).ToDatetime(tzinfo=UTC) if msg.HasField(name) else None


def server_msg(v: ServerView) -> pb.Server:
    m = pb.Server(
        name=v.name,
        mode=v.mode,
        headers=list(v.headers),
        placeholders=[pb.Placeholder(name=n, required=r) for n, r in v.placeholders],
        shared_values=dict(v.shared_masks),
        shared_status=v.shared_status or "",
        has_signing_secret=v.has_signing_secret,
        description=v.description,
        upstream_url=v.upstream_url,
    )
    _stamp(m.created_at, v.created_at)
    _stamp(m.updated_at, v.updated_at)
    return m


def server_view(m: pb.Server) -> ServerView:
    return ServerView(
        name=m.name,
        mode=m.mode,
        headers=tuple(m.headers),
        placeholders=tuple((p.name, p.required) for p in m.placeholders),
        shared_masks=tuple(sorted(m.shared_values.items())),
        shared_status=m.shared_status or None,
        has_signing_secret=m.has_signing_secret,
        description=m.description,
        created_at=_when(m, "created_at"),
        updated_at=_when(m, "updated_at"),
        upstream_url=m.upstream_url,
    )


def form_msg(v: ServerFormView) -> pb.ServerForm:
    return pb.ServerForm(
        name=v.name, mode=v.mode, placeholders=[pb.Placeholder(name=p.name, required=p.required) for p in v.placeholders]
    )


def form_view(m: pb.ServerForm) -> ServerFormView:
    return ServerFormView(m.name, m.mode, tuple(Placeholder(p.name, p.required) for p in m.placeholders))


def principal_msg(v: PrincipalView) -> pb.Principal:
    m = pb.Principal(id=v.id, name=v.name, kind=v.kind, team=v.team, roles=list(v.roles), disabled=v.disabled)
    if v.rate_limit_per_minute is not None:
        m.rate_limit_per_minute = v.rate_limit_per_minute
    _stamp(m.created_at, v.created_at)
    return m


def principal_view(m: pb.Principal) -> PrincipalView:
    return PrincipalView(
        m.id,
        m.name,
        m.kind,
        m.team,
        tuple(m.roles),
        m.disabled,
        m.rate_limit_per_minute if m.HasField("rate_limit_per_minute") else None,
        _when(m, "created_at"),
    )


def team_msg(v: TeamView) -> pb.Team:
    m = pb.Team(name=v.name, disabled=v.disabled)
    _stamp(m.created_at, v.created_at)
    return m


def team_view(m: pb.Team) -> TeamView:
    return TeamView(m.name, m.disabled, _when(m, "created_at"))


def key_msg(v: GatewayKeyView) -> pb.GatewayKey:
    m = pb.GatewayKey(key_id=v.key_id, principal=v.principal, label=v.label, status=v.status, scope=list(v.scope))
    for name in ("created_at", "last_used_at", "expires_at", "revoked_at"):
        _stamp(getattr(m, name), getattr(v, name))
    return m


def key_view(m: pb.GatewayKey) -> GatewayKeyView:
    return GatewayKeyView(
        m.key_id,
        m.principal,
        m.label,
        _when(m, "created_at"),
        _when(m, "last_used_at"),
        _when(m, "expires_at"),
        _when(m, "revoked_at"),
        tuple(m.scope),
        m.status,
    )


def override_msg(v: OverrideView) -> pb.Override:
    m = pb.Override(
        principal=v.principal,
        kind=v.kind,
        server=v.server,
        values=dict(v.masks),
        updated_by=v.updated_by,
        status=v.status,
        status_reason=v.status_reason,
    )
    _stamp(m.updated_at, v.updated_at)
    _stamp(m.expires_at, v.expires_at)
    return m


def override_view(m: pb.Override) -> OverrideView:
    return OverrideView(
        principal=m.principal,
        kind=m.kind,
        server=m.server,
        masks=tuple(sorted(m.values.items())),
        updated_by=m.updated_by,
        updated_at=_when(m, "updated_at") or datetime.fromtimestamp(0, UTC),
        status=m.status,
        status_reason=m.status_reason,
        expires_at=_when(m, "expires_at"),
    )


def status_msg(v: CredentialStatusView) -> pb.CredentialStatus:
    m = pb.CredentialStatus(
        server=v.server,
        mode=v.mode,
        principal=v.principal,
        kind=v.kind,
        team=v.team,
        status=v.status,
        source=v.source,
        values=dict(v.masks),
        updated_by=v.updated_by,
        reason=v.reason,
    )
    _stamp(m.updated_at, v.updated_at)
    return m


def status_view(m: pb.CredentialStatus) -> CredentialStatusView:
    return CredentialStatusView(
        m.server, m.mode, m.principal, m.kind, m.team, m.status, m.source, tuple(sorted(m.values.items())),
        m.updated_by, _when(m, "updated_at"), m.reason,
    )


def override_test_msg(v: OverrideTestView) -> pb.OverrideTestResult:
    return pb.OverrideTestResult(
        principal=v.principal, server=v.server, result=v.result, http_status=v.http_status, detail=v.detail,
        status=v.status,
    )


def override_test_view(m: pb.OverrideTestResult) -> OverrideTestView:
    return OverrideTestView(m.principal, m.server, m.result, m.http_status, m.detail, m.status)


def audit_msg(v: AuditView) -> pb.AuditEvent:
    m = pb.AuditEvent(
        id=v.id or 0,
        actor=v.actor,
        actor_id=v.actor_id,
        action=v.action,
        target=v.target,
        outcome=v.outcome,
        request_id=v.request_id,
        details=dict(v.details),
    )
    _stamp(m.at, v.at)
    return m


def audit_view(m: pb.AuditEvent) -> AuditView:
    return AuditView(
        m.id or None, _when(m, "at") or datetime.fromtimestamp(0, UTC), m.actor, m.actor_id, m.action, m.target,
        m.outcome, m.request_id, tuple(sorted(m.details.items())),
    )


def usage_msg(v: UsageView) -> pb.UsageRecord:
    m = pb.UsageRecord(
        id=v.id or 0,
        request_id=v.request_id,
        principal=v.principal,
        principal_id=v.principal_id,
        key_id=v.key_id,
        server=v.server,
        tool=v.tool,
        mcp_method=v.mcp_method,
        decision=v.decision,
        reason=v.reason,
        upstream_status=v.upstream_status,
        request_bytes=v.request_bytes,
        response_bytes=v.response_bytes,
        duration_ms=v.duration_ms,
    )
    _stamp(m.at, v.at)
    return m


def usage_view(m: pb.UsageRecord) -> UsageView:
    return UsageView(
        m.id or None, _when(m, "at") or datetime.fromtimestamp(0, UTC), m.request_id, m.principal, m.principal_id,
        m.key_id, m.server, m.tool, m.mcp_method, m.decision, m.reason, m.upstream_status, m.request_bytes,
        m.response_bytes, m.duration_ms,
    )


def whoami_msg(v: WhoAmIView) -> pb.WhoAmIResponse:
    return pb.WhoAmIResponse(id=v.id, name=v.name, kind=v.kind, team=v.team, roles=list(v.roles))


def whoami_view(m: pb.WhoAmIResponse) -> WhoAmIView:
    return WhoAmIView(m.id, m.name, m.kind, m.team, tuple(m.roles))


def _opt(text: str) -> str | None:
    """proto3 strings have no null: "" means "not given"."""
    return text or None


# --- the servicer -------------------------------------------------------------------------------


class AdminServicer(admin_pb2_grpc.AdminServicer):
    """`mcp_authz.admin.v1.Admin` on the sidecar's gRPC server.

    `ready` says whether the in-memory state is loaded and current (the health
    check's answer): until it is, keys cannot be judged, so calls are UNAVAILABLE.
    """

    def __init__(
        self,
        service: AdminService,
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

    # --- the wrapper every RPC goes through ------------------------------------------------

    async def _authenticate(self, context: grpc.aio.ServicerContext, method: str) -> Actor:
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        given = metadata.get(REQUEST_ID_HEADER, "")
        request_id = given if _REQUEST_ID_RE.match(given) else str(uuid.uuid4())
        source = _source(context.peer() or "", metadata)
        if not self._ready():
            raise Denied(Reason.NOT_READY)
        try:
            try:
                presented = self._extractor.extract(CheckInput("POST", "", metadata, {}, request_id, source))
            except Denied as missing:
                if missing.code is not Reason.KEY_MISSING:
                    raise
                hint = f"Send your gateway key as 'Authorization: Bearer mgw_…' or in the {self._extractor.key_header} header."
                raise Denied(Reason.KEY_MISSING, hint=hint) from None
            identity = await self._authn.authenticate_async(presented)
        except Denied as denied:
            if denied.status == 401:
                # A security event, as Check records it: reason, key id when parsed, source. Never the key.
                self._audit.put(
                    AuditEvent(
                        at=datetime.now(UTC),
                        actor="-",
                        action="authn.failure",
                        target=denied.key_id or "-",
                        outcome=denied.reason,
                        request_id=request_id,
                        details={"source": source, "api": "admin", "method": method},
                    )
                )
            log.info("admin call refused", extra={"request_id": request_id, "reason": denied.reason,
                                                  "key_id": denied.key_id, "method": method})
            raise
        if identity.scope:
            # A scoped key is an app's key for certain MCP servers: it manages nothing.
            raise PermissionDenied("A key scoped to servers or tools cannot use the admin API; use an unscoped key.")
        return Actor.of(identity.principal, request_id, source)

    async def _call(
        self, context: grpc.aio.ServicerContext, method: str, run: Callable[[Actor], Awaitable[_T]]
    ) -> _T:
        try:
            actor = await self._authenticate(context, method)
            return await run(actor)
        except AuthzError as exc:
            await _abort(context, exc)
        except Exception:
            log.exception("admin call failed", extra={"method": method})
            await context.abort(grpc.StatusCode.INTERNAL, "The admin API failed; operators see the sidecar's log.")
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    async def _stream(
        self,
        context: grpc.aio.ServicerContext,
        method: str,
        start: Callable[[Actor], Awaitable[AsyncIterator[list[_T]]]],
        to_msg: Callable[[_T], Any],
    ) -> AsyncIterator[Any]:
        try:
            actor = await self._authenticate(context, method)
            pages = await start(actor)
            async for page in pages:
                for item in page:
                    yield to_msg(item)
        except AuthzError as exc:
            await _abort(context, exc)
        except Exception:
            log.exception("admin call failed", extra={"method": method})
            await context.abort(grpc.StatusCode.INTERNAL, "The admin API failed; operators see the sidecar's log.")

    # --- RPCs ------------------------------------------------------------------------------------------

    async def WhoAmI(self, request: pb.WhoAmIRequest, context: grpc.aio.ServicerContext) -> pb.WhoAmIResponse:  # noqa: N802
        async def run(a: Actor) -> pb.WhoAmIResponse:
            return whoami_msg(await self._svc.whoami(a))

        return await self._call(context, "WhoAmI", run)

    async def ListServers(self, request: pb.ListServersRequest, context: grpc.aio.ServicerContext) -> pb.ListServersResponse:  # noqa: N802
        async def run(a: Actor) -> pb.ListServersResponse:
            return pb.ListServersResponse(servers=[server_msg(v) for v in await self._svc.list_servers(a)])

        return await self._call(context, "ListServers", run)

    async def GetServer(self, request: pb.GetServerRequest, context: grpc.aio.ServicerContext) -> pb.Server:  # noqa: N802
        async def run(a: Actor) -> pb.Server:
            return server_msg(await self._svc.show_server(a, request.name))

        return await self._call(context, "GetServer", run)

    async def GetServerForm(self, request: pb.GetServerFormRequest, context: grpc.aio.ServicerContext) -> pb.ServerForm:  # noqa: N802
        async def run(a: Actor) -> pb.ServerForm:
            return form_msg(await self._svc.server_form(a, request.name))

        return await self._call(context, "GetServerForm", run)

    async def AddServer(self, request: pb.AddServerRequest, context: grpc.aio.ServicerContext) -> pb.AddServerResponse:  # noqa: N802
        async def run(a: Actor) -> pb.AddServerResponse:
            view, signing = await self._svc.add_server(
                a, request.name, request.mode, list(request.headers), list(request.optional), request.description,
                request.upstream_url,
            )
            return pb.AddServerResponse(server=server_msg(view), signing_secret=signing.reveal())

        return await self._call(context, "AddServer", run)

    async def UpdateServer(self, request: pb.UpdateServerRequest, context: grpc.aio.ServicerContext) -> pb.Server:  # noqa: N802
        async def run(a: Actor) -> pb.Server:
            return server_msg(
                await self._svc.update_server(
                    a,
                    request.name,
                    upstream_url=request.upstream_url if request.HasField("upstream_url") else None,
                    description=request.description if request.HasField("description") else None,
                )
            )

        return await self._call(context, "UpdateServer", run)

    async def SetSharedValues(self, request: pb.SetSharedValuesRequest, context: grpc.aio.ServicerContext) -> pb.Server:  # noqa: N802
        async def run(a: Actor) -> pb.Server:
            return server_msg(await self._svc.set_shared(a, request.name, dict(request.values)))

        return await self._call(context, "SetSharedValues", run)

    async def RemoveServer(self, request: pb.RemoveServerRequest, context: grpc.aio.ServicerContext) -> pb.RemoveServerResponse:  # noqa: N802
        async def run(a: Actor) -> pb.RemoveServerResponse:
            await self._svc.remove_server(a, request.name)
            return pb.RemoveServerResponse()

        return await self._call(context, "RemoveServer", run)

    async def RotateSigningSecret(  # noqa: N802
        self, request: pb.RotateSigningSecretRequest, context: grpc.aio.ServicerContext
    ) -> pb.RotateSigningSecretResponse:
        async def run(a: Actor) -> pb.RotateSigningSecretResponse:
            signing = await self._svc.rotate_signing_secret(a, request.name)
            return pb.RotateSigningSecretResponse(server=request.name, signing_secret=signing.reveal())

        return await self._call(context, "RotateSigningSecret", run)

    async def ListPrincipals(self, request: pb.ListPrincipalsRequest, context: grpc.aio.ServicerContext) -> pb.ListPrincipalsResponse:  # noqa: N802
        async def run(a: Actor) -> pb.ListPrincipalsResponse:
            views = await self._svc.list_principals(a, _opt(request.team))
            return pb.ListPrincipalsResponse(principals=[principal_msg(v) for v in views])

        return await self._call(context, "ListPrincipals", run)

    async def AddPrincipal(self, request: pb.AddPrincipalRequest, context: grpc.aio.ServicerContext) -> pb.Principal:  # noqa: N802
        async def run(a: Actor) -> pb.Principal:
            view = await self._svc.add_principal(
                a,
                request.name,
                request.team or "default",
                list(request.roles) or ["user"],
                request.kind or "user",
                request.rate_limit_per_minute if request.HasField("rate_limit_per_minute") else None,
            )
            return principal_msg(view)

        return await self._call(context, "AddPrincipal", run)

    async def DisablePrincipal(self, request: pb.PrincipalRef, context: grpc.aio.ServicerContext) -> pb.Principal:  # noqa: N802
        async def run(a: Actor) -> pb.Principal:
            return principal_msg(await self._svc.set_principal_disabled(a, request.name, True))

        return await self._call(context, "DisablePrincipal", run)

    async def EnablePrincipal(self, request: pb.PrincipalRef, context: grpc.aio.ServicerContext) -> pb.Principal:  # noqa: N802
        async def run(a: Actor) -> pb.Principal:
            return principal_msg(await self._svc.set_principal_disabled(a, request.name, False))

        return await self._call(context, "EnablePrincipal", run)

    async def ListTeams(self, request: pb.ListTeamsRequest, context: grpc.aio.ServicerContext) -> pb.ListTeamsResponse:  # noqa: N802
        async def run(a: Actor) -> pb.ListTeamsResponse:
            return pb.ListTeamsResponse(teams=[team_msg(v) for v in await self._svc.list_teams(a)])

        return await self._call(context, "ListTeams", run)

    async def DisableTeam(self, request: pb.TeamRef, context: grpc.aio.ServicerContext) -> pb.Team:  # noqa: N802
        async def run(a: Actor) -> pb.Team:
            return team_msg(await self._svc.set_team_disabled(a, request.name, True))

        return await self._call(context, "DisableTeam", run)

    async def EnableTeam(self, request: pb.TeamRef, context: grpc.aio.ServicerContext) -> pb.Team:  # noqa: N802
        async def run(a: Actor) -> pb.Team:
            return team_msg(await self._svc.set_team_disabled(a, request.name, False))

        return await self._call(context, "EnableTeam", run)

    async def ListKeys(self, request: pb.ListKeysRequest, context: grpc.aio.ServicerContext) -> pb.ListKeysResponse:  # noqa: N802
        async def run(a: Actor) -> pb.ListKeysResponse:
            return pb.ListKeysResponse(keys=[key_msg(v) for v in await self._svc.list_keys(a, _opt(request.principal))])

        return await self._call(context, "ListKeys", run)

    async def CreateKey(self, request: pb.CreateKeyRequest, context: grpc.aio.ServicerContext) -> pb.CreateKeyResponse:  # noqa: N802
        async def run(a: Actor) -> pb.CreateKeyResponse:
            view, key = await self._svc.create_key(
                a, _opt(request.principal), request.label, _when(request, "expires_at"), list(request.scope)
            )
            return pb.CreateKeyResponse(key=key_msg(view), api_key=key.reveal())

        return await self._call(context, "CreateKey", run)

    async def RevokeKey(self, request: pb.RevokeKeyRequest, context: grpc.aio.ServicerContext) -> pb.GatewayKey:  # noqa: N802
        async def run(a: Actor) -> pb.GatewayKey:
            return key_msg(await self._svc.revoke_key(a, request.key_id))

        return await self._call(context, "RevokeKey", run)

    async def RegenerateKey(self, request: pb.RegenerateKeyRequest, context: grpc.aio.ServicerContext) -> pb.RegenerateKeyResponse:  # noqa: N802
        async def run(a: Actor) -> pb.RegenerateKeyResponse:
            view, key = await self._svc.regenerate_key(a, request.key_id, request.grace_seconds)
            return pb.RegenerateKeyResponse(
                key=key_msg(view), api_key=key.reveal(), replaced=request.key_id, grace_seconds=request.grace_seconds
            )

        return await self._call(context, "RegenerateKey", run)

    async def ListOverrides(self, request: pb.ListOverridesRequest, context: grpc.aio.ServicerContext) -> pb.ListOverridesResponse:  # noqa: N802
        async def run(a: Actor) -> pb.ListOverridesResponse:
            views = await self._svc.list_overrides(a, _opt(request.server), _opt(request.principal))
            return pb.ListOverridesResponse(overrides=[override_msg(v) for v in views])

        return await self._call(context, "ListOverrides", run)

    async def SetOverride(self, request: pb.SetOverrideRequest, context: grpc.aio.ServicerContext) -> pb.Override:  # noqa: N802
        async def run(a: Actor) -> pb.Override:
            return override_msg(
                await self._svc.set_override(
                    a, _opt(request.principal), request.server, dict(request.values), _when(request, "expires_at")
                )
            )

        return await self._call(context, "SetOverride", run)

    async def DeleteOverride(self, request: pb.DeleteOverrideRequest, context: grpc.aio.ServicerContext) -> pb.DeleteOverrideResponse:  # noqa: N802
        async def run(a: Actor) -> pb.DeleteOverrideResponse:
            await self._svc.delete_override(a, _opt(request.principal), request.server)
            return pb.DeleteOverrideResponse()

        return await self._call(context, "DeleteOverride", run)

    async def TestOverride(self, request: pb.TestOverrideRequest, context: grpc.aio.ServicerContext) -> pb.OverrideTestResult:  # noqa: N802
        async def run(a: Actor) -> pb.OverrideTestResult:
            return override_test_msg(await self._svc.test_override(a, request.server, _opt(request.principal)))

        return await self._call(context, "TestOverride", run)

    async def GetCredentialStatus(  # noqa: N802
        self, request: pb.GetCredentialStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetCredentialStatusResponse:
        async def run(a: Actor) -> pb.GetCredentialStatusResponse:
            views = await self._svc.credential_status(a, _opt(request.server), _opt(request.principal))
            return pb.GetCredentialStatusResponse(statuses=[status_msg(v) for v in views])

        return await self._call(context, "GetCredentialStatus", run)

    async def QueryAudit(self, request: pb.QueryAuditRequest, context: grpc.aio.ServicerContext) -> pb.QueryAuditResponse:  # noqa: N802
        async def run(a: Actor) -> pb.QueryAuditResponse:
            views = await self._svc.query_audit(
                a, _opt(request.actor), _opt(request.action), _opt(request.target), _when(request, "since"),
                _when(request, "until"), request.limit or 1000,
            )
            return pb.QueryAuditResponse(events=[audit_msg(v) for v in views])

        return await self._call(context, "QueryAudit", run)

    async def ExportAudit(self, request: pb.ExportAuditRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AuditEvent]:  # noqa: N802
        async def start(a: Actor) -> AsyncIterator[list[AuditView]]:
            return await self._svc.export_audit(
                a, _opt(request.actor), _opt(request.action), _opt(request.target), _when(request, "since"),
                _when(request, "until"),
            )

        async for message in self._stream(context, "ExportAudit", start, audit_msg):
            yield message

    async def QueryUsage(self, request: pb.QueryUsageRequest, context: grpc.aio.ServicerContext) -> pb.QueryUsageResponse:  # noqa: N802
        async def run(a: Actor) -> pb.QueryUsageResponse:
            views = await self._svc.query_usage(
                a, _opt(request.principal), _opt(request.server), _opt(request.tool), _when(request, "since"),
                _when(request, "until"), request.limit or 1000,
            )
            return pb.QueryUsageResponse(records=[usage_msg(v) for v in views])

        return await self._call(context, "QueryUsage", run)

    async def ExportUsage(self, request: pb.ExportUsageRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.UsageRecord]:  # noqa: N802
        async def start(a: Actor) -> AsyncIterator[list[UsageView]]:
            return await self._svc.export_usage(
                a, _opt(request.principal), _opt(request.server), _opt(request.tool), _when(request, "since"),
                _when(request, "until"), request.limit or None,
            )

        async for message in self._stream(context, "ExportUsage", start, usage_msg):
            yield message


async def _abort(context: grpc.aio.ServicerContext, exc: AuthzError) -> None:
    await context.abort(grpc_status(exc), error_message(exc), trailing_metadata=((REASON_TRAILER, exc.reason),))


def _source(peer: str, metadata: Mapping[str, str]) -> str:
    """The caller's address: the gRPC peer, and the client Envoy saw when it forwarded the call."""
    kind, _, rest = peer.partition(":")
    address = rest.rsplit(":", 1)[0].strip("[]") if kind in ("ipv4", "ipv6") else peer
    external = metadata.get("x-envoy-external-address", "")
    return f"{external} via {address}" if external and external != address else address
