"""Overrides (a principal's own credentials for a server), their status, and testing them upstream.

Values are sealed per (server, principal, placeholder) and shown only as masks;
nothing here decrypts a value for display. Only `overrides test` opens one, to
send it upstream exactly as Check would. The contract of each operation is stated
once, in `AdminOps` (ops.py).
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import urlsplit

from authz_server.admin import validate
from authz_server.admin.base import AdminBase
from authz_server.admin.policy import CLI_ACTOR_ID, Actor
from authz_server.admin.probe import ProbeFailed
from authz_server.admin.views import CredentialStatusView, OverrideTestView, OverrideView, iso
from authz_server.crypto.cipher import aad_override, aad_signing
from authz_server.errors import InvalidInput, NotFound
from authz_server.models import AuthMode, McpServer, Override, OverrideStatus, Principal, mask
from authz_server.pipeline.mutate import sign
from authz_server.rules import IDENTITY_HEADERS, PLACEHOLDER_RE, REQUEST_ID_HEADER


def _request_target(url: str) -> str:
    """The path and query an upstream receives for `url` (what a signature covers)."""
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _target(principal_name: str | None, server_name: str) -> str:
    """The audit target of one principal's override (None: the caller's own, until it is looked up)."""
    return f"override:{principal_name or '(own)'}/{server_name}"


class OverrideAdmin(AdminBase):
    async def set_override(self, actor: Actor, principal_name: str | None, server_name: str,
                           values: Mapping[str, str], expires_at: datetime | None = None) -> OverrideView:  # fmt: skip
        async with self._audit(actor, "overrides.set", _target(principal_name, server_name)) as op:
            principal = await self._owned_principal(actor, "overrides.set", principal_name)
            op.target = _target(principal.name, server_name)  # the real name: found by --target override:NAME/…
            server = await self._credentialed(server_name)
            clean = validate.check_values(server, values)
            now = self._now()
            expiry = None if expires_at is None else validate.as_utc(expires_at)
            if expiry is not None:
                if expiry <= now:
                    raise InvalidInput("The expiry must be in the future.")
                op.details["expires_at"] = iso(expiry) or ""
            override = await self._store.put_override(
                Override(
                    principal_id=principal.id,
                    server=server.name,
                    values={
                        f: self._keyring.seal(v, aad_override(server.name, principal.id, f)) for f, v in clean.items()
                    },
                    masks={f: mask(v) for f, v in clean.items()},
                    updated_by=actor.principal_id,
                    updated_at=now,
                    status=OverrideStatus.CONFIGURED,
                    status_at=now,
                    expires_at=expiry,
                )
            )
            op.details["fields"] = ",".join(sorted(clean))
            return await self._override_view(override, {principal.id: principal})

    async def list_overrides(self, actor: Actor, server_name: str | None = None,
                             principal_name: str | None = None) -> list[OverrideView]:  # fmt: skip
        target = "overrides"
        if server_name or principal_name:
            target = f"override:{principal_name or '*'}/{server_name or '*'}"
        async with self._audit(actor, "overrides.list", target):
            if server_name is not None:
                validate.check_name(server_name, "server")
            people = {p.id: p for p in await self._store.list_principals()}
            visible: frozenset[str] | None = None
            if principal_name is not None:
                principal_id: str | None = (await self._owned_principal(actor, "overrides.list", principal_name)).id
            elif self._sees_everyone(actor, "overrides.list"):
                principal_id = None
                visible = self._visible(actor, "overrides.list", people.values())
            else:
                self._authorize(actor, "overrides.list", people.get(actor.principal_id))
                principal_id = actor.principal_id
            stored = await self._store.list_overrides(server_name, principal_id)
            return [
                await self._override_view(o, people) for o in stored if visible is None or o.principal_id in visible
            ]

    async def delete_override(self, actor: Actor, principal_name: str | None, server_name: str) -> None:
        async with self._audit(actor, "overrides.delete", _target(principal_name, server_name)) as op:
            principal = await self._owned_principal(actor, "overrides.delete", principal_name)
            op.target = _target(principal.name, server_name)
            validate.check_name(server_name, "server")
            if await self._store.get_override(principal.id, server_name) is None:
                raise NotFound(f"{principal.name} has no override for server {server_name}.")
            await self._store.delete_override(principal.id, server_name)

    async def credential_status(self, actor: Actor, server_name: str | None = None,
                                principal_name: str | None = None) -> list[CredentialStatusView]:  # fmt: skip
        target = f"override:{principal_name or '*'}/{server_name or '*'}"
        async with self._audit(actor, "overrides.status", target) as op:
            if server_name is not None:
                servers = [await self._credentialed(server_name)]
            else:
                servers = [s for s in await self._store.list_servers() if s.mode is not AuthMode.NONE]
            people = {p.id: p for p in await self._store.list_principals()}
            if principal_name is not None:
                principals = [await self._owned_principal(actor, "overrides.status", principal_name)]
                principal_id: str | None = principals[0].id
            elif self._sees_everyone(actor, "overrides.status"):
                visible = self._visible(actor, "overrides.status", people.values())
                principals = [p for p in people.values() if visible is None or p.id in visible]
                principal_id = None
            else:
                me = people.get(actor.principal_id)
                self._authorize(actor, "overrides.status", me)
                principals, principal_id = ([me] if me else []), actor.principal_id
            overrides = {
                (o.principal_id, o.server): o
                for o in await self._store.list_overrides(server_name, principal_id)
            }
            now = self._now()
            rows = [
                await self._status_row(s, p, overrides.get((p.id, s.name)), people, now)
                for s in servers
                for p in sorted(principals, key=lambda p: p.name)
            ]
            op.details["count"] = str(len(rows))
            return rows

    async def test_override(self, actor: Actor, server_name: str, principal_name: str | None = None) -> OverrideTestView:
        async with self._audit(actor, "overrides.test", _target(principal_name, server_name)) as op:
            principal = await self._owned_principal(actor, "overrides.test", principal_name)
            op.target = _target(principal.name, server_name)
            server = await self._credentialed(server_name)
            if not server.upstream_url:
                raise InvalidInput(
                    f"Server {server_name} has no upstream URL to test against; an admin sets one with "
                    f"'mcp-authz servers update {server_name} --upstream-url URL'."
                )
            override = await self._store.get_override(principal.id, server.name)
            if override is None:
                raise NotFound(f"{principal.name} has no override for server {server_name}.")
            headers = self._probe_headers(server, principal, override, actor.request_id)
            try:
                status = await self._probe.initialize(server.upstream_url, headers)
            except ProbeFailed as failed:
                status, detail = 0, failed.message
            else:
                detail = f"upstream answered {status}"
            now = self._now()
            if 200 <= status < 300:
                result, new_status = "ok", OverrideStatus.CONFIGURED
            elif status in (401, 403):
                result, new_status = "rejected", OverrideStatus.INVALID
            else:
                result, new_status = "inconclusive", None
            after = override.status
            if new_status is not None:
                reason = f"overrides test: {detail}"
                with contextlib.suppress(NotFound):  # deleted meanwhile: nothing to mark
                    after = (
                        await self._store.set_override_status(principal.id, server.name, new_status, reason, now)
                    ).status
            op.details.update({"result": result, "http_status": str(status), "principal": principal.name})
            return OverrideTestView(principal.name, server.name, result, status, detail, after.value)

    async def _credentialed(self, server_name: str) -> McpServer:
        """The server named, which must take credentials (be in shared or individual mode)."""
        server = await self._server(server_name)
        if server.mode is AuthMode.NONE:
            raise InvalidInput(f"Server {server_name} is in none mode: it takes no credentials.")
        return server

    def _probe_headers(
        self, server: McpServer, principal: Principal, override: Override, request_id: str
    ) -> list[tuple[str, str]]:
        """The headers Check would set: the rendered credential, the identity and a signature."""
        values = {
            name: self._keyring.open(sealed, aad_override(server.name, principal.id, name))
            for name, sealed in override.values.items()
        }
        out: list[tuple[str, str]] = []
        for header in server.headers:
            missing = False

            def fill(match: re.Match[str]) -> str:
                nonlocal missing
                secret = values.get(match.group(1))
                if secret is None:
                    missing = True
                    return ""
                return secret.reveal()

            value = PLACEHOLDER_RE.sub(fill, header.template)
            if not missing or not header.placeholders():
                out.append((header.name.lower(), value))
        identity = (principal.name, principal.kind.value, principal.team, ",".join(r.value for r in principal.roles))
        out += [(n, v) for n, v in zip(IDENTITY_HEADERS, identity) if v]
        request_id = request_id or str(uuid.uuid4())
        out.append((REQUEST_ID_HEADER, request_id))
        if server.signing_secret is not None:
            secret = self._keyring.open(server.signing_secret, aad_signing(server.name)).reveal().encode()
            timestamp = str(int(time.time()))
            path = _request_target(server.upstream_url)
            out.append((self._timestamp_header, timestamp))
            out.append((self._signature_header, sign(secret, timestamp, "POST", path, identity, request_id)))
        return out

    async def _status_row(
        self,
        server: McpServer,
        principal: Principal,
        override: Override | None,
        people: Mapping[str, Principal],
        now: datetime,
    ) -> CredentialStatusView:
        if override is not None:
            view = await self._override_view(override, people)
            reason = override.status_reason
            if view.status == OverrideStatus.EXPIRED.value and override.expires_at is not None:
                reason = f"expired at {iso(override.expires_at)}: set it again"
            return CredentialStatusView(
                server.name, server.mode.value, principal.name, principal.kind.value, principal.team, view.status,
                "override", view.masks, view.updated_by, override.updated_at, reason,
            )
        if server.mode is AuthMode.SHARED:
            required = {p.name for p in server.placeholders if p.required}
            ok = bool(server.shared_values) and required <= set(server.shared_values)
            return CredentialStatusView(
                server.name, server.mode.value, principal.name, principal.kind.value, principal.team,
                "configured" if ok else "missing", "shared" if ok else "",
                tuple(sorted(server.shared_masks.items())) if ok else (), "", None,
                "the server's shared default" if ok else "the server's shared default is not set",
            )
        return CredentialStatusView(
            server.name, server.mode.value, principal.name, principal.kind.value, principal.team, "missing", "",
            (), "", None, "no personal credential set",
        )

    async def _override_view(self, o: Override, people: Mapping[str, Principal]) -> OverrideView:
        owner = people.get(o.principal_id) or await self._store.get_principal(o.principal_id)
        if o.updated_by == CLI_ACTOR_ID:
            updated_by = CLI_ACTOR_ID
        else:
            by = people.get(o.updated_by) or await self._store.get_principal(o.updated_by)
            updated_by = by.name if by else o.updated_by
        expired = o.expires_at is not None and o.expires_at <= self._now()
        return OverrideView(
            principal=owner.name if owner else o.principal_id,
            kind=owner.kind.value if owner else "",
            server=o.server,
            masks=tuple(sorted(o.masks.items())),
            updated_by=updated_by,
            updated_at=o.updated_at,
            status=OverrideStatus.EXPIRED.value if expired else o.status.value,
            status_reason=o.status_reason,
            expires_at=o.expires_at,
        )
