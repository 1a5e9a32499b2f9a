"""Principals (users and service accounts), their teams, and who the caller is.

The contract of each operation is stated once, in `AdminOps` (ops.py).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import replace

from authz_server.admin import validate
from authz_server.admin.base import AdminBase
from authz_server.admin.policy import CLI_ACTOR_ID, Actor, authorize_grant
from authz_server.admin.views import PrincipalDeletedView, PrincipalView, TeamView, WhoAmIView
from authz_server.crypto import keys as gateway_keys
from authz_server.errors import Conflict, InvalidInput, NotFound
from authz_server.models import Principal, PrincipalKind, Role

_PRINCIPAL_ID_LEN = 12
MAX_RATE_LIMIT = 1_000_000  # requests per minute


def _check_rate_limit(per_minute: int) -> int:
    if isinstance(per_minute, bool) or not isinstance(per_minute, int) or not 1 <= per_minute <= MAX_RATE_LIMIT:
        raise InvalidInput(f"The rate limit must be between 1 and {MAX_RATE_LIMIT} requests per minute.")
    return per_minute


def new_principal_id() -> str:
    return "p_" + "".join(secrets.choice(gateway_keys.ALPHABET) for _ in range(_PRINCIPAL_ID_LEN))


class PrincipalAdmin(AdminBase):
    async def whoami(self, actor: Actor) -> WhoAmIView:
        async with self._audit(actor, "whoami", "self"):
            self._authorize(actor, "whoami", None)
            if actor.is_operator:
                return WhoAmIView(CLI_ACTOR_ID, CLI_ACTOR_ID, "operator", "", tuple(r.value for r in actor.roles))
            me = await self._store.get_principal(actor.principal_id)
            if me is None:
                raise NotFound("Your principal no longer exists.")
            return WhoAmIView(me.id, me.name, me.kind.value, me.team, tuple(r.value for r in me.roles))

    async def add_principal(self, actor: Actor, name: str, team: str, roles: Iterable[Role | str],
                            kind: PrincipalKind | str = PrincipalKind.USER,
                            rate_limit_per_minute: int | None = None) -> PrincipalView:  # fmt: skip
        async with self._audit(actor, "principals.add", f"principal:{name}") as op:
            self._authorize(actor, "principals.add", None)
            validate.check_name(name, "principal")
            validate.check_name(team, "team")
            role_tuple = validate.parse_roles(roles)
            principal_kind = validate.parse_kind(kind)
            if rate_limit_per_minute is not None:
                _check_rate_limit(rate_limit_per_minute)
            if await self._store.get_principal_by_name(name) is not None:
                raise Conflict(f"A principal named {name} exists already.")
            now = self._now()
            await self._store.ensure_team(team, now)
            principal = await self._store.add_principal(
                Principal(
                    id=new_principal_id(),
                    name=name,
                    kind=principal_kind,
                    team=team,
                    roles=role_tuple,
                    rate_limit_per_minute=rate_limit_per_minute,
                    created_at=now,
                )
            )
            op.details.update(
                {
                    "id": principal.id,
                    "team": team,
                    "kind": principal_kind.value,
                    "roles": ",".join(r.value for r in role_tuple),
                }
            )
            return PrincipalView.of(principal)

    async def list_principals(self, actor: Actor, team: str | None = None) -> list[PrincipalView]:
        async with self._audit(actor, "principals.list", f"team:{team}" if team else "principals"):
            self._authorize(actor, "principals.list", None)
            if team is not None:
                validate.check_name(team, "team")
            return [PrincipalView.of(p) for p in await self._store.list_principals(team)]

    async def set_principal_disabled(self, actor: Actor, name: str, disabled: bool) -> PrincipalView:
        action = "principals.disable" if disabled else "principals.enable"
        async with self._audit(actor, action, f"principal:{name}"):
            self._authorize(actor, action, None)
            principal = await self._principal(name)
            return PrincipalView.of(await self._store.set_principal_disabled(principal.id, disabled))

    async def update_principal(self, actor: Actor, name: str, *, roles: Iterable[Role | str] | None = None,
                               team: str | None = None, kind: PrincipalKind | str | None = None,
                               rate_limit_per_minute: int | None = None) -> PrincipalView:  # fmt: skip
        async with self._audit(actor, "principals.update", f"principal:{name}") as op:
            self._authorize(actor, "principals.update", None)
            principal = await self._principal(name)
            if roles is None and team is None and kind is None and rate_limit_per_minute is None:
                raise InvalidInput("Nothing to change: give roles, a team, a kind or a rate limit.")
            updated = principal
            if roles is not None:
                role_tuple = validate.parse_roles(roles)
                authorize_grant(actor, role_tuple)
                if Role.ADMIN in principal.roles and Role.ADMIN not in role_tuple:
                    await self._keep_an_admin(principal, "lose the admin role")
                updated = replace(updated, roles=role_tuple)
                op.details["roles"] = ",".join(r.value for r in role_tuple)
            if kind is not None:
                updated = replace(updated, kind=validate.parse_kind(kind))
                op.details["kind"] = updated.kind.value
            if rate_limit_per_minute is not None:
                # 0 lifts the limit; anything else must be a valid one.
                limit = None if rate_limit_per_minute == 0 else _check_rate_limit(rate_limit_per_minute)
                updated = replace(updated, rate_limit_per_minute=limit)
                op.details["rate_limit_per_minute"] = str(limit or "none")
            if team is not None:
                validate.check_name(team, "team")
                await self._store.ensure_team(team, self._now())
                updated = replace(updated, team=team)
                op.details["team"] = team
            return PrincipalView.of(await self._store.update_principal(updated))

    async def delete_principal(self, actor: Actor, name: str) -> PrincipalDeletedView:
        async with self._audit(actor, "principals.delete", f"principal:{name}") as op:
            self._authorize(actor, "principals.delete", None)
            principal = await self._principal(name)
            if Role.ADMIN in principal.roles:
                await self._keep_an_admin(principal, "be deleted")
            keys = await self._store.list_keys(principal.id)
            overrides = await self._store.list_overrides(principal_id=principal.id)
            await self._store.delete_principal(principal.id)
            op.details.update({"id": principal.id, "keys_revoked": str(len(keys)),
                               "overrides_deleted": str(len(overrides))})  # fmt: skip
            return PrincipalDeletedView(principal.id, principal.name, len(keys), len(overrides))

    async def _keep_an_admin(self, principal: Principal, change: str) -> None:
        """Refuse to leave the store without an enabled admin principal: nobody could then manage
        it through the admin API."""
        others = [p for p in await self._store.list_principals()
                  if p.id != principal.id and Role.ADMIN in p.roles and not p.disabled]  # fmt: skip
        if not others:
            raise InvalidInput(
                f"{principal.name} is the last enabled admin and cannot {change}: make another principal an admin first."
            )

    async def list_teams(self, actor: Actor) -> list[TeamView]:
        async with self._audit(actor, "teams.list", "teams"):
            self._authorize(actor, "teams.list", None)
            return [TeamView.of(t) for t in await self._store.list_teams()]

    async def set_team_disabled(self, actor: Actor, name: str, disabled: bool) -> TeamView:
        action = "teams.disable" if disabled else "teams.enable"
        async with self._audit(actor, action, f"team:{name}"):
            self._authorize(actor, action, None)
            validate.check_name(name, "team")
            if await self._store.get_team(name) is None:
                raise NotFound(f"No team named {name}.")
            return TeamView.of(await self._store.set_team_disabled(name, disabled))
