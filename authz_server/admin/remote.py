"""The admin API's client: `AdminService`'s operations, run on a remote sidecar over gRPC.

`RemoteAdmin` has AdminService's method names and signatures and returns the
same views, so the CLI renders local and remote results with one code path.
The `actor` argument every method takes is ignored: the sidecar derives the
actor from the gateway key, which goes in the call's metadata
(`authorization: Bearer mgw_…`) and nowhere else.

A refusal comes back as `RemoteError`, an `AuthzError` carrying the server's
reason (the `mcp-authz-reason` trailer) and message, neither ever a secret.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from authz_server.admin import api
from authz_server.admin.gen import admin_pb2 as pb
from authz_server.admin.gen import admin_pb2_grpc
from authz_server.admin.service import (
    Actor,
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
from authz_server.errors import RemoteError
from authz_server.models import AuthMode, PrincipalKind, Role, Secret

PAGE = 500  # streamed records handed to the caller at a time


def _error(target: str, exc: grpc.RpcError) -> RemoteError:
    """The RemoteError of a failed call: the server's reason and message, or a transport failure."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return RemoteError("error", f"The call to the admin API at {target} failed.")
    reason = dict(exc.trailing_metadata() or ()).get(api.REASON_TRAILER)
    if reason is None:
        # No answer from the admin API itself: the transport failed, or it is no mcp-authz sidecar.
        name = exc.code().name.lower()
        return RemoteError(name, f"The admin API at {target} did not answer ({name}): is the sidecar running there?")
    return RemoteError(str(reason), exc.details() or "The admin API refused the call.")


def _stamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value.astimezone(UTC))
    return stamp


class RemoteAdmin:
    """`AdminService` over the admin gRPC API of the sidecar at `target` (HOST:PORT).

    With `tls`, the server's certificate is verified against `ca` (PEM), or the system's roots
    when `ca` is None; the caller (the CLI) refuses clear text to anything but this host.
    """

    def __init__(self, target: str, key: Secret, *, timeout: float = 30.0, tls: bool = False,
                 ca: bytes | None = None) -> None:  # fmt: skip
        self._target = target
        self._key = key
        self._timeout = timeout
        if tls or ca is not None:
            self._channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=ca))
        else:
            self._channel = grpc.aio.insecure_channel(target)
        self._stub = admin_pb2_grpc.AdminStub(self._channel)

    async def __aenter__(self) -> RemoteAdmin:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._key.reveal()}"), ("x-request-id", str(uuid.uuid4())))

    async def _unary(self, method: str, request: Any) -> Any:
        try:
            return await getattr(self._stub, method)(request, metadata=self._metadata(), timeout=self._timeout)
        except grpc.RpcError as exc:
            raise _error(self._target, exc) from None

    async def _pages(self, method: str, request: Any, to_view: Any) -> AsyncIterator[list[Any]]:
        call = getattr(self._stub, method)(request, metadata=self._metadata())
        page: list[Any] = []
        try:
            async for message in call:
                page.append(to_view(message))
                if len(page) >= PAGE:
                    yield page
                    page = []
        except grpc.RpcError as exc:
            raise _error(self._target, exc) from None
        if page:
            yield page

    # --- the operations (same names and arguments as AdminService; `actor` is ignored) ---------

    async def whoami(self, actor: Actor) -> WhoAmIView:
        return api.whoami_view(await self._unary("WhoAmI", pb.WhoAmIRequest()))

    async def list_servers(self, actor: Actor) -> list[ServerView]:
        reply = await self._unary("ListServers", pb.ListServersRequest())
        return [api.server_view(m) for m in reply.servers]

    async def show_server(self, actor: Actor, name: str) -> ServerView:
        return api.server_view(await self._unary("GetServer", pb.GetServerRequest(name=name)))

    async def server_form(self, actor: Actor, name: str) -> ServerFormView:
        return api.form_view(await self._unary("GetServerForm", pb.GetServerFormRequest(name=name)))

    async def add_server(
        self,
        actor: Actor,
        name: str,
        mode: AuthMode | str,
        headers: Sequence[str] = (),
        optional: Iterable[str] = (),
        description: str = "",
        upstream_url: str = "",
    ) -> tuple[ServerView, Secret]:
        request = pb.AddServerRequest(
            name=name, mode=AuthMode(mode).value if isinstance(mode, AuthMode) else mode, headers=list(headers),
            optional=list(optional), description=description, upstream_url=upstream_url,
        )
        reply = await self._unary("AddServer", request)
        return api.server_view(reply.server), Secret(reply.signing_secret)

    async def update_server(
        self, actor: Actor, name: str, *, upstream_url: str | None = None, description: str | None = None
    ) -> ServerView:
        request = pb.UpdateServerRequest(name=name)
        if upstream_url is not None:
            request.upstream_url = upstream_url
        if description is not None:
            request.description = description
        return api.server_view(await self._unary("UpdateServer", request))

    async def set_shared(self, actor: Actor, name: str, values: Mapping[str, str]) -> ServerView:
        return api.server_view(
            await self._unary("SetSharedValues", pb.SetSharedValuesRequest(name=name, values=dict(values)))
        )

    async def remove_server(self, actor: Actor, name: str) -> None:
        await self._unary("RemoveServer", pb.RemoveServerRequest(name=name))

    async def rotate_signing_secret(self, actor: Actor, name: str) -> Secret:
        reply = await self._unary("RotateSigningSecret", pb.RotateSigningSecretRequest(name=name))
        return Secret(reply.signing_secret)

    async def add_principal(
        self,
        actor: Actor,
        name: str,
        team: str,
        roles: Iterable[Role | str],
        kind: PrincipalKind | str = PrincipalKind.USER,
        rate_limit_per_minute: int | None = None,
    ) -> PrincipalView:
        request = pb.AddPrincipalRequest(
            name=name,
            team=team,
            roles=[r.value if isinstance(r, Role) else r for r in roles],
            kind=kind.value if isinstance(kind, PrincipalKind) else kind,
        )
        if rate_limit_per_minute is not None:
            request.rate_limit_per_minute = rate_limit_per_minute
        return api.principal_view(await self._unary("AddPrincipal", request))

    async def list_principals(self, actor: Actor, team: str | None = None) -> list[PrincipalView]:
        reply = await self._unary("ListPrincipals", pb.ListPrincipalsRequest(team=team or ""))
        return [api.principal_view(m) for m in reply.principals]

    async def set_principal_disabled(self, actor: Actor, name: str, disabled: bool) -> PrincipalView:
        method = "DisablePrincipal" if disabled else "EnablePrincipal"
        return api.principal_view(await self._unary(method, pb.PrincipalRef(name=name)))

    async def list_teams(self, actor: Actor) -> list[TeamView]:
        reply = await self._unary("ListTeams", pb.ListTeamsRequest())
        return [api.team_view(m) for m in reply.teams]

    async def set_team_disabled(self, actor: Actor, name: str, disabled: bool) -> TeamView:
        method = "DisableTeam" if disabled else "EnableTeam"
        return api.team_view(await self._unary(method, pb.TeamRef(name=name)))

    async def create_key(
        self,
        actor: Actor,
        principal_name: str | None,
        label: str = "",
        expires_at: datetime | None = None,
        scope: Iterable[str] = (),
    ) -> tuple[GatewayKeyView, Secret]:
        request = pb.CreateKeyRequest(
            principal=principal_name or "", label=label, expires_at=_stamp(expires_at), scope=list(scope)
        )
        reply = await self._unary("CreateKey", request)
        return api.key_view(reply.key), Secret(reply.api_key)

    async def list_keys(self, actor: Actor, principal_name: str | None = None) -> list[GatewayKeyView]:
        reply = await self._unary("ListKeys", pb.ListKeysRequest(principal=principal_name or ""))
        return [api.key_view(m) for m in reply.keys]

    async def revoke_key(self, actor: Actor, key_id: str) -> GatewayKeyView:
        return api.key_view(await self._unary("RevokeKey", pb.RevokeKeyRequest(key_id=key_id)))

    async def regenerate_key(
        self, actor: Actor, key_id: str, grace_seconds: int = 0
    ) -> tuple[GatewayKeyView, Secret]:
        reply = await self._unary("RegenerateKey", pb.RegenerateKeyRequest(key_id=key_id, grace_seconds=grace_seconds))
        return api.key_view(reply.key), Secret(reply.api_key)

    async def set_override(
        self,
        actor: Actor,
        principal_name: str | None,
        server_name: str,
        values: Mapping[str, str],
        expires_at: datetime | None = None,
    ) -> OverrideView:
        request = pb.SetOverrideRequest(
            server=server_name, principal=principal_name or "", values=dict(values), expires_at=_stamp(expires_at)
        )
        return api.override_view(await self._unary("SetOverride", request))

    async def list_overrides(
        self, actor: Actor, server_name: str | None = None, principal_name: str | None = None
    ) -> list[OverrideView]:
        request = pb.ListOverridesRequest(server=server_name or "", principal=principal_name or "")
        reply = await self._unary("ListOverrides", request)
        return [api.override_view(m) for m in reply.overrides]

    async def delete_override(self, actor: Actor, principal_name: str | None, server_name: str) -> None:
        await self._unary(
            "DeleteOverride", pb.DeleteOverrideRequest(server=server_name, principal=principal_name or "")
        )

    async def credential_status(
        self, actor: Actor, server_name: str | None = None, principal_name: str | None = None
    ) -> list[CredentialStatusView]:
        request = pb.GetCredentialStatusRequest(server=server_name or "", principal=principal_name or "")
        reply = await self._unary("GetCredentialStatus", request)
        return [api.status_view(m) for m in reply.statuses]

    async def test_override(
        self, actor: Actor, server_name: str, principal_name: str | None = None
    ) -> OverrideTestView:
        request = pb.TestOverrideRequest(server=server_name, principal=principal_name or "")
        return api.override_test_view(await self._unary("TestOverride", request))

    async def query_audit(
        self,
        actor: Actor,
        actor_name: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[AuditView]:
        request = pb.QueryAuditRequest(
            actor=actor_name or "", action=action or "", target=target or "", since=_stamp(since),
            until=_stamp(until), limit=limit,
        )
        reply = await self._unary("QueryAudit", request)
        return [api.audit_view(m) for m in reply.events]

    async def export_audit(
        self,
        actor: Actor,
        actor_name: str | None = None,
        action: str | None = None,
        target: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> AsyncIterator[list[AuditView]]:
        request = pb.ExportAuditRequest(
            actor=actor_name or "", action=action or "", target=target or "", since=_stamp(since), until=_stamp(until)
        )
        return self._pages("ExportAudit", request, api.audit_view)

    async def query_usage(
        self,
        actor: Actor,
        principal_name: str | None = None,
        server_name: str | None = None,
        tool: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
    ) -> list[UsageView]:
        request = pb.QueryUsageRequest(
            principal=principal_name or "", server=server_name or "", tool=tool or "", since=_stamp(since),
            until=_stamp(until), limit=limit,
        )
        reply = await self._unary("QueryUsage", request)
        return [api.usage_view(m) for m in reply.records]

    async def export_usage(
        self,
        actor: Actor,
        principal_name: str | None = None,
        server_name: str | None = None,
        tool: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[list[UsageView]]:
        request = pb.ExportUsageRequest(
            principal=principal_name or "", server=server_name or "", tool=tool or "", since=_stamp(since),
            until=_stamp(until), limit=limit or 0,
        )
        return self._pages("ExportUsage", request, api.usage_view)
