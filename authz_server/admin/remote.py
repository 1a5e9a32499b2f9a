"""The admin API's client: `AdminOps` run on a remote sidecar over gRPC.

`RemoteAdmin` implements `AdminOps` and returns the same views as
`AdminService`, so the CLI renders local and remote results with one code
path. Each operation is a line: its arguments go through rpcs.py's table, which
puts every one of them in the request or refuses it with `InvalidInput` (an
argument the server would read differently from how it was given, such as an
empty name that means "not given"); nothing is silently dropped.

The sidecar derives the actor from the gateway key, which goes in the call's
metadata (`authorization: Bearer mgw_…`) and nowhere else. So the actor given
must be `Actor.key_holder()`, which says exactly that; any other is refused.

A refusal comes back as `RemoteError`, an `AuthzError` carrying the server's
reason (the `mcp-authz-reason` trailer) and message, neither ever a secret.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, TypeVar, cast

import grpc

from authz_server.admin import validate
from authz_server.admin.gen import admin_pb2_grpc
from authz_server.admin.ops import DEFAULT_LIMIT, MAX_LIMIT, PAGE_SIZE, AdminOps
from authz_server.admin.policy import Actor
from authz_server.admin.rpcs import LOCAL_ONLY, Rpc, Stream, rpcs_of
from authz_server.admin.views import (
    AuditView, CredentialStatusView, GatewayKeyView, OverrideIssueView, OverrideTestView, OverrideView,
    PrincipalDeletedView, PrincipalView, ServerFormView, ServerView, TeamView, UsageView, WhoAmIView,
)  # fmt: skip
from authz_server.admin.wire import REASON_TRAILER
from authz_server.errors import InvalidInput, RemoteError
from authz_server.models import AuthMode, PrincipalKind, Role, Secret

_T = TypeVar("_T")


def _error(target: str, exc: grpc.RpcError) -> RemoteError:
    """The RemoteError of a failed call: the server's reason and message, or a transport failure."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return RemoteError("error", f"The call to the admin API at {target} failed.")
    reason = dict(exc.trailing_metadata() or ()).get(REASON_TRAILER)
    if reason is None:
        # No answer from the admin API itself: the transport failed, or it is no mcp-authz sidecar.
        name = exc.code().name.lower()
        return RemoteError(name, f"The admin API at {target} did not answer ({name}): is the sidecar running there?")
    return RemoteError(str(reason), exc.details() or "The admin API refused the call.")


class RemoteAdmin:
    """`AdminOps` over the admin gRPC API of the sidecar at `target` (HOST:PORT).

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
        self._stub = admin_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> RemoteAdmin:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    # --- the one way every operation goes ----------------------------------------------------

    async def _run(self, op: Callable[..., Coroutine[Any, Any, _T]], given: Mapping[str, Any]) -> _T:
        """Run AdminOps operation `op` with the arguments `given` (its `locals()`) on the sidecar."""
        name = op.__name__
        arguments = {k: v for k, v in given.items() if k not in ("self", "actor")}
        if given["actor"] != Actor.key_holder():
            raise ValueError(f"RemoteAdmin.{name} acts as the holder of its gateway key: pass Actor.key_holder().")
        if name in LOCAL_ONLY:
            raise InvalidInput(f"{name} runs on the sidecar's host only, in the local CLI: the admin API has no such call.")
        rpc = next((r for r in rpcs_of(name) if r.matches(arguments)), None)
        if rpc is None:
            raise InvalidInput(f"{name}: {', '.join(rpcs_of(name)[0].fixed)} must be True or False.")
        request = rpc.build(arguments)
        if isinstance(rpc.reply, Stream):
            return cast(_T, self._pages(rpc, rpc.reply, request, arguments))
        try:
            reply = await getattr(self._stub, rpc.name)(request, metadata=self._metadata(), timeout=self._timeout)
        except grpc.RpcError as exc:
            raise _error(self._target, exc) from None
        return cast(_T, rpc.reply.result(reply))

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._key.reveal()}"), ("x-request-id", str(uuid.uuid4())))

    def _pages(self, rpc: Rpc, stream: Stream, request: Any, arguments: Mapping[str, Any]) -> AsyncIterator[list[Any]]:
        """The streamed rows in pages of `page_size`; a `limit` the request has no field for is
        applied here: the stream is cancelled once that many rows arrived."""
        page_size = validate.check_count(arguments.get("page_size", PAGE_SIZE), "The page size", stream.unit, MAX_LIMIT)
        limit = arguments.get("limit") if "limit" in rpc.local else None
        if limit is not None:
            validate.check_count(limit, "The limit", stream.unit)
        return self._read(rpc.name, request, stream, page_size, limit)

    async def _read(self, method: str, request: Any, stream: Stream, page_size: int,
                    limit: int | None) -> AsyncIterator[list[Any]]:  # fmt: skip
        call = getattr(self._stub, method)(request, metadata=self._metadata())
        page: list[Any] = []
        left = limit
        try:
            async for message in call:
                page.append(stream.codec.view(message))
                if left is not None:
                    left -= 1
                if len(page) >= page_size or left == 0:
                    yield page
                    page = []
                if left == 0:
                    call.cancel()
                    return
        except grpc.RpcError as exc:
            raise _error(self._target, exc) from None
        if page:
            yield page

    # --- the operations: AdminOps states each one's contract ---------------------------------

    async def whoami(self, actor: Actor) -> WhoAmIView:
        return await self._run(AdminOps.whoami, locals())

    async def list_servers(self, actor: Actor) -> list[ServerView]:
        return await self._run(AdminOps.list_servers, locals())

    async def show_server(self, actor: Actor, name: str) -> ServerView:
        return await self._run(AdminOps.show_server, locals())

    async def server_form(self, actor: Actor, name: str) -> ServerFormView:
        return await self._run(AdminOps.server_form, locals())

    async def add_server(self, actor: Actor, name: str, mode: AuthMode | str, headers: Sequence[str] = (),
                         optional: Iterable[str] = (), description: str = "",
                         upstream_url: str = "") -> tuple[ServerView, Secret]:  # fmt: skip
        return await self._run(AdminOps.add_server, locals())

    async def update_server(self, actor: Actor, name: str, *, upstream_url: str | None = None,
                            description: str | None = None, mode: AuthMode | str | None = None,
                            headers: Sequence[str] | None = None, optional: Iterable[str] | None = None,
                            required: Iterable[str] | None = None,
                            ) -> tuple[ServerView, list[OverrideIssueView]]:  # fmt: skip
        return await self._run(AdminOps.update_server, locals())

    async def set_shared(self, actor: Actor, name: str, values: Mapping[str, str]) -> ServerView:
        return await self._run(AdminOps.set_shared, locals())

    async def remove_server(self, actor: Actor, name: str) -> None:
        return await self._run(AdminOps.remove_server, locals())

    async def rotate_signing_secret(self, actor: Actor, name: str) -> Secret:
        return await self._run(AdminOps.rotate_signing_secret, locals())

    async def add_principal(self, actor: Actor, name: str, team: str, roles: Iterable[Role | str],
                            kind: PrincipalKind | str = PrincipalKind.USER,
                            rate_limit_per_minute: int | None = None) -> PrincipalView:  # fmt: skip
        return await self._run(AdminOps.add_principal, locals())

    async def list_principals(self, actor: Actor, team: str | None = None) -> list[PrincipalView]:
        return await self._run(AdminOps.list_principals, locals())

    async def set_principal_disabled(self, actor: Actor, name: str, disabled: bool) -> PrincipalView:
        return await self._run(AdminOps.set_principal_disabled, locals())

    async def update_principal(self, actor: Actor, name: str, *, roles: Iterable[Role | str] | None = None,
                               team: str | None = None, kind: PrincipalKind | str | None = None,
                               rate_limit_per_minute: int | None = None) -> PrincipalView:  # fmt: skip
        return await self._run(AdminOps.update_principal, locals())

    async def delete_principal(self, actor: Actor, name: str) -> PrincipalDeletedView:
        return await self._run(AdminOps.delete_principal, locals())

    async def list_teams(self, actor: Actor) -> list[TeamView]:
        return await self._run(AdminOps.list_teams, locals())

    async def set_team_disabled(self, actor: Actor, name: str, disabled: bool) -> TeamView:
        return await self._run(AdminOps.set_team_disabled, locals())

    async def create_key(self, actor: Actor, principal_name: str | None, label: str = "",
                         expires_at: datetime | None = None,
                         scope: Iterable[str] = ()) -> tuple[GatewayKeyView, Secret]:  # fmt: skip
        return await self._run(AdminOps.create_key, locals())

    async def list_keys(self, actor: Actor, principal_name: str | None = None) -> list[GatewayKeyView]:
        return await self._run(AdminOps.list_keys, locals())

    async def revoke_key(self, actor: Actor, key_id: str) -> GatewayKeyView:
        return await self._run(AdminOps.revoke_key, locals())

    async def regenerate_key(self, actor: Actor, key_id: str, grace_seconds: int = 0) -> tuple[GatewayKeyView, Secret]:
        return await self._run(AdminOps.regenerate_key, locals())

    async def set_override(self, actor: Actor, principal_name: str | None, server_name: str,
                           values: Mapping[str, str], expires_at: datetime | None = None) -> OverrideView:  # fmt: skip
        return await self._run(AdminOps.set_override, locals())

    async def list_overrides(self, actor: Actor, server_name: str | None = None,
                             principal_name: str | None = None) -> list[OverrideView]:  # fmt: skip
        return await self._run(AdminOps.list_overrides, locals())

    async def delete_override(self, actor: Actor, principal_name: str | None, server_name: str) -> None:
        return await self._run(AdminOps.delete_override, locals())

    async def credential_status(self, actor: Actor, server_name: str | None = None,
                                principal_name: str | None = None) -> list[CredentialStatusView]:  # fmt: skip
        return await self._run(AdminOps.credential_status, locals())

    async def test_override(self, actor: Actor, server_name: str, principal_name: str | None = None) -> OverrideTestView:
        return await self._run(AdminOps.test_override, locals())

    async def query_audit(self, actor: Actor, actor_name: str | None = None, action: str | None = None,
                          target: str | None = None, since: datetime | None = None, until: datetime | None = None,
                          limit: int = DEFAULT_LIMIT) -> list[AuditView]:  # fmt: skip
        return await self._run(AdminOps.query_audit, locals())

    async def export_audit(self, actor: Actor, actor_name: str | None = None, action: str | None = None,
                           target: str | None = None, since: datetime | None = None, until: datetime | None = None,
                           limit: int | None = None, page_size: int = PAGE_SIZE,
                           ) -> AsyncIterator[list[AuditView]]:  # fmt: skip
        return await self._run(AdminOps.export_audit, locals())

    async def query_usage(self, actor: Actor, principal_name: str | None = None,
                          server_name: str | None = None, tool: str | None = None,
                          since: datetime | None = None, until: datetime | None = None,
                          limit: int = DEFAULT_LIMIT) -> list[UsageView]:  # fmt: skip
        return await self._run(AdminOps.query_usage, locals())

    async def export_usage(self, actor: Actor, principal_name: str | None = None,
                           server_name: str | None = None, tool: str | None = None,
                           since: datetime | None = None, until: datetime | None = None, limit: int | None = None,
                           page_size: int = PAGE_SIZE) -> AsyncIterator[list[UsageView]]:  # fmt: skip
        return await self._run(AdminOps.export_usage, locals())

    async def prune_usage(self, actor: Actor, before: datetime) -> int:
        return await self._run(AdminOps.prune_usage, locals())
