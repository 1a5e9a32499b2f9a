"""admin/principals.py: principals and teams, and who am I."""

from __future__ import annotations

import pytest

from authz_server.admin.service import Actor
from authz_server.errors import Conflict, InvalidInput, NotFound, PermissionDenied

from ..fakes import OP, AdminWorld, SelfServiceWorld


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"name": "Bob"}, InvalidInput, "principal name is invalid"),
        ({"team": "Team A"}, InvalidInput, "team name is invalid"),
        ({"roles": ["root"]}, InvalidInput, "Roles must be among"),
        ({"roles": []}, InvalidInput, "at least one role"),
        ({"kind": "robot"}, InvalidInput, "kind must be user or service"),
        ({"rate_limit_per_minute": 0}, InvalidInput, "rate limit"),
        ({"name": "admin"}, Conflict, "admin exists already"),
    ],
)
async def test_add_principal_validation(world: AdminWorld, kwargs: dict, error: type, message: str) -> None:
    args = {"name": "bob", "team": "default", "roles": ["user"]} | kwargs
    with pytest.raises(error, match=message):
        await world.svc.add_principal(OP, **args)


async def test_principals_and_teams(world: AdminWorld) -> None:
    w = world
    bot = await w.svc.add_principal(
        OP, "ci-bot", "platform", ["user", "manager", "user"], kind="service", rate_limit_per_minute=600
    )
    assert (bot.kind, bot.team, bot.roles) == ("service", "platform", ("manager", "user"))
    assert bot.rate_limit_per_minute == 600
    assert bot.to_json()["created_at"] == "2026-03-01T12:00:00Z"
    assert [t.name for t in await w.svc.list_teams(OP)] == ["default", "platform"]
    assert [p.name for p in await w.svc.list_principals(OP)] == ["admin", "ci-bot"]
    assert [p.name for p in await w.svc.list_principals(OP, team="platform")] == ["ci-bot"]
    disabled = await w.svc.set_principal_disabled(OP, "ci-bot", True)
    assert disabled.disabled and (await w.store.get_principal(bot.id)).disabled  # type: ignore[union-attr]
    assert not (await w.svc.set_principal_disabled(OP, "ci-bot", False)).disabled
    assert (await w.svc.set_team_disabled(OP, "platform", True)).disabled
    assert (await w.store.get_team("platform")).disabled  # type: ignore[union-attr]
    assert not (await w.svc.set_team_disabled(OP, "platform", False)).disabled
    with pytest.raises(NotFound, match="No team named nope"):
        await w.svc.set_team_disabled(OP, "nope", True)
    with pytest.raises(NotFound, match="No principal named nope"):
        await w.svc.set_principal_disabled(OP, "nope", True)


async def test_whoami_and_server_form_for_every_role(w: SelfServiceWorld) -> None:
    me = await w.svc.whoami(w.alice)
    assert (me.name, me.roles) == ("alice", ("user",))
    assert (await w.svc.whoami(OP)).id == "cli"
    form = await w.svc.server_form(w.alice, "github")
    assert (form.mode, [(p.name, p.required) for p in form.placeholders]) == ("individual", [("API_KEY", True)])
    with pytest.raises(PermissionDenied):
        await w.svc.server_form(Actor("p_nobody", frozenset()), "github")
    with pytest.raises(NotFound):
        await w.svc.server_form(w.alice, "ghost")
