"""admin/principals.py: principals and teams, and who am I."""

from __future__ import annotations

import pytest

from authz_server.admin.policy import authorize_grant
from authz_server.admin.service import Actor
from authz_server.models import Role
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


# --- principals update and delete ------------------------------------------------------------------


async def test_update_principal_changes_roles_team_kind_and_rate_limit(world: AdminWorld) -> None:
    await world.svc.add_principal(OP, "bob", "default", ["user"])
    view = await world.svc.update_principal(OP, "bob", roles=["manager"], team="platform", kind="service",
                                            rate_limit_per_minute=120)  # fmt: skip
    assert (view.roles, view.team, view.kind, view.rate_limit_per_minute) == (("manager",), "platform", "service", 120)
    assert [t.name for t in await world.svc.list_teams(OP)] == ["default", "platform"]  # created when missing
    assert (await world.svc.update_principal(OP, "bob", rate_limit_per_minute=0)).rate_limit_per_minute is None
    (event, cleared) = (await world.store.query_audit(action="principals.update"))[-2:]
    assert (event.outcome, event.details["roles"], event.details["team"]) == ("ok", "manager", "platform")
    assert cleared.details["rate_limit_per_minute"] == "none"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({}, InvalidInput, "Nothing to change"),
        ({"roles": []}, InvalidInput, "at least one role"),
        ({"roles": ["root"]}, InvalidInput, "Roles must be among"),
        ({"team": "Team A"}, InvalidInput, "team name is invalid"),
        ({"kind": "robot"}, InvalidInput, "kind must be user or service"),
        ({"rate_limit_per_minute": -1}, InvalidInput, "rate limit"),
        ({"name": "ghost", "team": "x"}, NotFound, "No principal named ghost"),
    ],
)
async def test_update_principal_refuses_bad_input(world: AdminWorld, kwargs: dict, error: type, message: str) -> None:
    await world.svc.add_principal(OP, "bob", "default", ["user"])
    args = {"name": "bob"} | kwargs
    with pytest.raises(error, match=message):
        await world.svc.update_principal(OP, **args)
    assert (await world.store.get_principal_by_name("bob")).roles == (Role.USER,)  # type: ignore[union-attr]


async def test_only_admins_update_or_delete_and_nobody_grants_above_their_rank(w: SelfServiceWorld) -> None:
    for actor, target in ((w.mia, "alice"), (w.mia, "mia"), (w.alice, "bob"), (w.alice, "alice")):
        with pytest.raises(PermissionDenied):
            await w.svc.update_principal(actor, target, roles=["admin"])
        with pytest.raises(PermissionDenied):
            await w.svc.update_principal(actor, target, rate_limit_per_minute=5)
        with pytest.raises(PermissionDenied):
            await w.svc.delete_principal(actor, target)
    # A refusal does not tell whether the name exists.
    with pytest.raises(PermissionDenied):
        await w.svc.update_principal(w.mia, "ghost", roles=["user"])
    # The rank rule itself: a manager never makes an admin, whatever the role check lets through.
    with pytest.raises(PermissionDenied, match="above your own"):
        authorize_grant(w.mia, [Role.ADMIN])
    authorize_grant(w.mia, [Role.MANAGER, Role.USER])
    assert (await w.store.get_principal_by_name("alice")).roles == (Role.USER,)  # type: ignore[union-attr]


async def test_the_last_enabled_admin_keeps_the_role_and_is_not_deleted(world: AdminWorld) -> None:
    with pytest.raises(InvalidInput, match="last enabled admin"):
        await world.svc.update_principal(OP, "admin", roles=["user"])
    with pytest.raises(InvalidInput, match="last enabled admin"):
        await world.svc.delete_principal(OP, "admin")
    await world.svc.add_principal(OP, "ada", "default", ["admin"])
    await world.svc.set_principal_disabled(OP, "ada", True)
    with pytest.raises(InvalidInput, match="last enabled admin"):
        await world.svc.delete_principal(OP, "admin")  # a disabled admin does not count
    await world.svc.set_principal_disabled(OP, "ada", False)
    me = Actor.of((await world.store.get_principal_by_name("admin")))  # type: ignore[arg-type]
    assert (await world.svc.update_principal(me, "admin", roles=["user"])).roles == ("user",)
    with pytest.raises(InvalidInput, match="ada is the last enabled admin"):
        await world.svc.delete_principal(OP, "ada")


async def test_delete_principal_revokes_keys_and_overrides_and_keeps_records(w: SelfServiceWorld) -> None:
    _, key = await w.svc.create_key(w.alice, None, "laptop")
    await w.svc.create_key(OP, "alice", "ci")
    await w.svc.set_override(w.alice, None, "github", {"API_KEY": "alice-token-0123456789"})
    gone = await w.svc.delete_principal(OP, "alice")
    assert (gone.name, gone.id, gone.keys_revoked, gone.overrides_deleted) == ("alice", w.alice.principal_id, 2, 1)
    assert await w.store.get_principal(w.alice.principal_id) is None
    assert await w.store.list_keys(w.alice.principal_id) == []
    assert await w.store.list_overrides(principal_id=w.alice.principal_id) == []
    assert len(await w.store.query_audit(actor=w.alice.principal_id)) >= 2  # her own calls stay
    (event,) = await w.store.query_audit(action="principals.delete")
    assert event.details == {"id": w.alice.principal_id, "keys_revoked": "2", "overrides_deleted": "1"}
    assert key.reveal() not in str(event)
    with pytest.raises(NotFound, match="No principal named alice"):
        await w.svc.delete_principal(OP, "alice")
