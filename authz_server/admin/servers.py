"""MCP servers: their credential templates, shared values, signing secrets and upstream URLs.

The contract of each operation is stated once, in `AdminOps` (ops.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace

from authz_server.admin import validate
from authz_server.admin.base import AdminBase
from authz_server.admin.policy import Actor
from authz_server.admin.validate import MAX_DESCRIPTION_LEN
from authz_server.admin.views import OverrideIssueView, ServerFormView, ServerView
from authz_server.crypto.cipher import aad_shared, aad_signing
from authz_server.errors import Conflict, InvalidInput
from authz_server.models import AuthMode, McpServer, OverrideStatus, Secret, mask


class ServerAdmin(AdminBase):
    async def add_server(self, actor: Actor, name: str, mode: AuthMode | str, headers: Sequence[str] = (),
                         optional: Iterable[str] = (), description: str = "",
                         upstream_url: str = "") -> tuple[ServerView, Secret]:  # fmt: skip
        async with self._audit(actor, "servers.add", f"server:{name}") as op:
            self._authorize(actor, "servers.add", None)
            validate.check_name(name, "server")
            auth_mode = validate.parse_mode(mode)
            templates = validate.parse_headers(headers, self._reserved_headers)
            placeholders = validate.placeholders(auth_mode, templates, set(optional))
            validate.check_text(description, "description", MAX_DESCRIPTION_LEN)
            validate.check_upstream_url(upstream_url)
            if await self._store.get_server(name) is not None:
                raise Conflict(f"A server named {name} exists already.")
            now = self._now()
            signing = Secret(secrets.token_urlsafe(32))
            server = await self._store.add_server(
                McpServer(
                    name=name,
                    mode=auth_mode,
                    headers=templates,
                    placeholders=placeholders,
                    signing_secret=self._keyring.seal(signing.reveal(), aad_signing(name)),
                    description=description,
                    created_at=now,
                    updated_at=now,
                    upstream_url=upstream_url,
                )
            )
            op.details.update({"mode": auth_mode.value, "placeholders": ",".join(p.name for p in placeholders)})
            if upstream_url:
                op.details["upstream_url"] = upstream_url
            return ServerView.of(server), signing

    async def update_server(self, actor: Actor, name: str, *, upstream_url: str | None = None,
                            description: str | None = None, mode: AuthMode | str | None = None,
                            headers: Sequence[str] | None = None, optional: Iterable[str] | None = None,
                            required: Iterable[str] | None = None,
                            ) -> tuple[ServerView, list[OverrideIssueView]]:  # fmt: skip
        async with self._audit(actor, "servers.update", f"server:{name}") as op:
            self._authorize(actor, "servers.update", None)
            server = await self._server(name)
            if all(v is None for v in (upstream_url, description, mode, headers, optional, required)):
                raise InvalidInput(
                    "Nothing to change: give a mode, headers, optional or required placeholders, "
                    "an upstream URL or a description."
                )
            if upstream_url is not None:
                validate.check_upstream_url(upstream_url)
                op.details["upstream_url"] = upstream_url
                server = replace(server, upstream_url=upstream_url)
            if description is not None:
                validate.check_text(description, "description", MAX_DESCRIPTION_LEN)
                op.details["description"] = "changed"
                server = replace(server, description=description)
            if (mode, headers, optional, required) != (None,) * 4:
                server = self._retemplated(server, mode, headers, optional, required, op.details)
            updated = await self._store.update_server(replace(server, updated_at=self._now()))
            issues = await self._refit_overrides(updated)
            op.details["incompatible"] = str(len(issues))
            return ServerView.of(updated), issues

    def _retemplated(self, server: McpServer, mode: AuthMode | str | None, headers: Sequence[str] | None,
                     optional: Iterable[str] | None, required: Iterable[str] | None,
                     details: dict[str, str]) -> McpServer:  # fmt: skip
        """The server with its new mode, headers and placeholder flags, validated as `add_server`
        validates them. A placeholder kept keeps its flag unless named in `optional` or `required`;
        a new one is required. Shared values of placeholders that are gone, or of a server that
        leaves shared mode, are dropped (and named in `details`)."""
        new_mode = server.mode if mode is None else validate.parse_mode(mode)
        if headers is not None:
            templates = validate.parse_headers(headers, self._reserved_headers)
        else:
            templates = () if new_mode is AuthMode.NONE else server.headers
        names = {p for h in templates for p in h.placeholders()}
        make_optional, make_required = set(optional or ()), set(required or ())
        if make_optional & make_required:
            raise InvalidInput("A placeholder cannot be both optional and required.")
        if make_required - names:
            raise InvalidInput(f"Required {', '.join(sorted(make_required - names))} is not a placeholder of the "
                               f"headers (they use {', '.join(sorted(names)) or 'none'}).")  # fmt: skip
        kept_optional = {p.name for p in server.placeholders if not p.required} & names
        placeholders = validate.placeholders(new_mode, templates, (kept_optional | make_optional) - make_required)
        shared = {f: v for f, v in server.shared_values.items() if new_mode is AuthMode.SHARED and f in names}
        dropped = sorted(set(server.shared_values) - set(shared))
        if dropped:
            details["shared_dropped"] = ",".join(dropped)
        details.update({"mode": new_mode.value, "placeholders": ",".join(
            p.name + ("" if p.required else "?") for p in placeholders)})  # fmt: skip
        if headers is not None:
            details["headers"] = "changed"
        return replace(server, mode=new_mode, headers=templates, placeholders=placeholders, shared_values=shared,
                       shared_masks={f: m for f, m in server.shared_masks.items() if f in shared})  # fmt: skip

    async def _refit_overrides(self, server: McpServer) -> list[OverrideIssueView]:
        """Mark each override of the server that lacks a required placeholder (with the server's
        shared values, in shared mode) `missing`, with why, and report it; one that fits again after
        being marked so is `configured` again. No override is deleted or changed otherwise."""
        if server.mode is AuthMode.NONE:
            return []
        required = [p.name for p in server.placeholders if p.required]
        shared = set(server.shared_values) if server.mode is AuthMode.SHARED else set()
        now = self._now()
        issues: list[OverrideIssueView] = []
        for o in await self._store.list_overrides(server.name):
            missing = tuple(n for n in required if n not in o.values and n not in shared)
            if missing:
                reason = (f"server {server.name} now requires {', '.join(missing)}: set the credential again "
                          f"with 'mcp-authz overrides set --server {server.name}'")  # fmt: skip
                if (o.status, o.status_reason) != (OverrideStatus.MISSING, reason):
                    await self._store.set_override_status(o.principal_id, o.server, OverrideStatus.MISSING, reason, now)
                issues.append(OverrideIssueView(await self._principal_name(o.principal_id), o.server, missing, reason))
            elif o.status is OverrideStatus.MISSING:
                reason = f"fits server {server.name}'s placeholders again"
                await self._store.set_override_status(o.principal_id, o.server, OverrideStatus.CONFIGURED, reason, now)
        return issues

    async def server_form(self, actor: Actor, name: str) -> ServerFormView:
        async with self._audit(actor, "servers.form", f"server:{name}"):
            self._authorize(actor, "servers.form", None)
            server = await self._server(name)
            return ServerFormView(server.name, server.mode.value, server.placeholders)

    async def list_servers(self, actor: Actor) -> list[ServerView]:
        async with self._audit(actor, "servers.list", "servers"):
            self._authorize(actor, "servers.list", None)
            return [ServerView.of(s) for s in await self._store.list_servers()]

    async def show_server(self, actor: Actor, name: str) -> ServerView:
        async with self._audit(actor, "servers.show", f"server:{name}"):
            self._authorize(actor, "servers.show", None)
            return ServerView.of(await self._server(name))

    async def set_shared(self, actor: Actor, name: str, values: Mapping[str, str]) -> ServerView:
        async with self._audit(actor, "servers.set_shared", f"server:{name}") as op:
            self._authorize(actor, "servers.set_shared", None)
            server = await self._server(name)
            if server.mode is not AuthMode.SHARED:
                raise InvalidInput(
                    f"Server {name} is in {server.mode.value} mode; only shared servers have default values"
                    + (
                        ". Each principal sets their own with 'mcp-authz overrides set'."
                        if server.mode is AuthMode.INDIVIDUAL
                        else "."
                    )
                )
            clean = validate.check_values(server, values)
            sealed = {f: self._keyring.seal(v, aad_shared(name, f)) for f, v in clean.items()}
            updated = await self._store.update_server(
                replace(
                    server,
                    shared_values=sealed,
                    shared_masks={f: mask(v) for f, v in clean.items()},
                    updated_at=self._now(),
                )
            )
            op.details["fields"] = ",".join(sorted(clean))
            return ServerView.of(updated)

    async def remove_server(self, actor: Actor, name: str) -> None:
        async with self._audit(actor, "servers.remove", f"server:{name}"):
            self._authorize(actor, "servers.remove", None)
            await self._server(name)
            await self._store.remove_server(name)

    async def rotate_signing_secret(self, actor: Actor, name: str) -> Secret:
        async with self._audit(actor, "servers.rotate_signing_secret", f"server:{name}"):
            self._authorize(actor, "servers.rotate_signing_secret", None)
            server = await self._server(name)
            signing = Secret(secrets.token_urlsafe(32))
            await self._store.update_server(
                replace(
                    server,
                    signing_secret=self._keyring.seal(signing.reveal(), aad_signing(name)),
                    updated_at=self._now(),
                )
            )
            return signing
