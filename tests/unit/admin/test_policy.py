"""admin/policy.py, the one role check: the whole matrix against a specification written apart from
the code, then through the service: who may act on whom, and a refusal that tells nothing."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from authz_server.admin.service import Actor, AdminService
from authz_server.errors import PermissionDenied
from authz_server.models import OverrideStatus, Principal, PrincipalKind, Role

from ..fakes import GH_TOKEN, LINEAR_TOKEN, OP, T0, AcceptingProbe, AdminWorld, add_github

ALL_ACTIONS = [
    "init",
    "servers.add",
    "servers.list",
    "servers.show",
    "servers.set_shared",
    "servers.remove",
    "servers.rotate_signing_secret",
    "principals.add",
    "principals.list",
    "principals.disable",
    "principals.enable",
    "teams.list",
    "teams.disable",
    "teams.enable",
    "keys.create",
    "keys.list",
    "keys.revoke",
    "keys.regenerate",
    "overrides.set",
    "overrides.list",
    "overrides.delete",
    "overrides.status",
    "overrides.test",
    "usage.query",
    "usage.export",
    "usage.prune",
    "servers.update",
    "servers.form",
    "whoami",
    "audit.query",
    "audit.export",
]
# Usage records belong to a principal too; pruning them is retention, for admins.
OWNED = {a for a in ALL_ACTIONS if a.startswith(("keys.", "overrides."))} | {"usage.query", "usage.export"}
# What a manager may do on someone else who does not outrank them: never keys.
MANAGED = {a for a in OWNED if not a.startswith("keys.")}
ANY_ROLE = {"whoami", "servers.form"}  # no values: any authenticated principal
# The target of an action: the actor itself, another principal with one role, nobody (a name or
# key that does not exist, or an action on no principal's thing), or a listing of everyone.
TARGETS = ("self", "user", "manager", "admin", "missing", "everyone")


def _expected(role: Role | None, action: str, target: str) -> bool:
    """The specification, written independently of the code: DESIGN.md "Principals and roles"."""
    if role is Role.ADMIN:
        return True
    if role is not None and action in ANY_ROLE:
        return True
    if role is Role.MANAGER and action in {"servers.list", "servers.show"}:
        return True
    if role is None or action not in OWNED:
        return False
    if target == "self":
        return True
    if role is Role.MANAGER and action in MANAGED:
        if target == "everyone":
            return True  # the listing then leaves out whoever outranks the manager
        return target in ("user", "manager")  # not above a manager; an admin is, and nobody may act on "missing"
    return False


def _target(target: str, role: Role | None) -> Principal | None:
    if target == "self":
        return Principal("p_self", "me", PrincipalKind.USER, "t", (role,) if role else ())
    if target in ("user", "manager", "admin"):
        return Principal(f"p_{target}", target, PrincipalKind.USER, "t", (Role(target),))
    return None


def _matrix() -> Iterator[tuple[Role | None, str, str, bool]]:
    for role in (Role.ADMIN, Role.MANAGER, Role.USER, None):
        for action in ALL_ACTIONS:
            for target in TARGETS:
                yield role, action, target, _expected(role, action, target)


@pytest.mark.parametrize(("role", "action", "target", "allowed"), list(_matrix()))
def test_authorize_matrix(role: Role | None, action: str, target: str, allowed: bool) -> None:
    actor = Actor("p_self", frozenset({role}) if role else frozenset())
    principal = _target(target, role)
    everyone = target == "everyone"
    if allowed:
        AdminService._authorize(actor, action, principal, everyone=everyone)
    else:
        with pytest.raises(PermissionDenied) as refused:
            AdminService._authorize(actor, action, principal, everyone=everyone)
        # The refusal names the action, never the target: a missing one is refused alike.
        assert refused.value.message == f"You are not allowed to do {action} on this target."


def test_the_matrix_covers_the_corrected_contract() -> None:
    """The rows the corrected role model is about, spelled out (issue 11)."""
    table = {(r, a, t): ok for r, a, t, ok in _matrix()}
    for action in ("keys.create", "keys.regenerate", "keys.revoke", "keys.list"):
        assert table[(Role.MANAGER, action, "self")]
        for target in ("user", "manager", "admin", "missing"):
            assert not table[(Role.MANAGER, action, target)], (action, target)
            assert not table[(Role.USER, action, target)], (action, target)
        assert not table[(Role.MANAGER, action, "everyone")]
        assert table[(Role.USER, action, "self")]
    for action in ("overrides.set", "overrides.delete", "overrides.test", "overrides.status", "overrides.list"):
        assert table[(Role.MANAGER, action, "user")] and table[(Role.MANAGER, action, "manager")]
        assert not table[(Role.MANAGER, action, "admin")] and not table[(Role.MANAGER, action, "missing")]
        assert not table[(Role.USER, action, "user")] and not table[(Role.USER, action, "manager")]
    assert all(table[(Role.ADMIN, a, t)] for a in ALL_ACTIONS for t in TARGETS)


def test_a_principal_ranks_by_its_highest_role() -> None:
    manager = Actor("p_m", frozenset({Role.MANAGER}))
    both = Principal("p_mu", "mu", PrincipalKind.USER, "t", (Role.MANAGER, Role.USER))
    boss = Principal("p_au", "au", PrincipalKind.SERVICE, "t", (Role.ADMIN, Role.USER))
    AdminService._authorize(manager, "overrides.set", both)  # holds "user", which the manager lacks: not above
    with pytest.raises(PermissionDenied):
        AdminService._authorize(manager, "overrides.set", boss)
    # A manager who is also a user ranks as a manager; an admin who is also anything is an admin.
    manager_user = Actor("p_x", frozenset({Role.MANAGER, Role.USER}))
    AdminService._authorize(manager_user, "usage.query", both)
    with pytest.raises(PermissionDenied):
        AdminService._authorize(manager_user, "keys.create", both)
    AdminService._authorize(Actor("p_y", frozenset({Role.ADMIN, Role.USER})), "keys.create", boss)


def test_authorize_spot_checks() -> None:
    user = Actor("p_u", frozenset({Role.USER}))
    me = Principal("p_u", "u", PrincipalKind.USER, "t", (Role.USER,))
    someone = Principal("p_v", "v", PrincipalKind.USER, "t", (Role.USER,))
    AdminService._authorize(user, "keys.revoke", me)
    with pytest.raises(PermissionDenied, match="not allowed to do keys.revoke"):
        AdminService._authorize(user, "keys.revoke", someone)
    with pytest.raises(PermissionDenied):
        AdminService._authorize(user, "servers.list")
    manager = Actor("p_m", frozenset({Role.MANAGER}))
    AdminService._authorize(manager, "overrides.delete", someone)
    with pytest.raises(PermissionDenied):
        AdminService._authorize(manager, "keys.regenerate", someone)
    with pytest.raises(PermissionDenied):
        AdminService._authorize(manager, "principals.add")
    AdminService._authorize(OP, "servers.remove")
    AdminService._authorize(OP, "keys.create", Principal("p_a", "a", PrincipalKind.USER, "t", (Role.ADMIN,)))
    assert OP == Actor("cli", frozenset({Role.ADMIN}))


async def test_users_act_only_on_their_own_and_cannot_probe(world: AdminWorld) -> None:
    w = world
    await add_github(w)
    bob = await w.svc.add_principal(OP, "bob", "default", ["user"])
    await w.svc.add_principal(OP, "eve", "default", ["user"])
    as_bob = Actor(bob.id, frozenset({Role.USER}))
    mine, key = await w.svc.create_key(as_bob, "bob", "mine")
    w.secrets.append(key.reveal())
    eve_key, _ = await w.svc.create_key(OP, "eve", "eve's")
    # The same refusal whether the target exists or not.
    messages = []
    for call in (
        lambda: w.svc.create_key(as_bob, "eve"),
        lambda: w.svc.create_key(as_bob, "nobody"),
        lambda: w.svc.revoke_key(as_bob, eve_key.key_id),
        lambda: w.svc.revoke_key(as_bob, "ZZZZZZZ"),
        lambda: w.svc.regenerate_key(as_bob, eve_key.key_id),
        lambda: w.svc.list_keys(as_bob, "eve"),
        lambda: w.svc.set_override(as_bob, "eve", "github", {"API_KEY": GH_TOKEN}),
        lambda: w.svc.delete_override(as_bob, "nobody", "github"),
        lambda: w.svc.add_server(as_bob, "x", "none"),
        lambda: w.svc.list_servers(as_bob),
        lambda: w.svc.list_principals(as_bob),
    ):
        with pytest.raises(PermissionDenied) as info:
            await call()
        messages.append(info.value.message.split(" on ")[0])
    assert "eve" not in " ".join(messages) and "nobody" not in " ".join(messages)
    assert messages[0] == messages[1] and messages[2] == messages[3]
    # Listing without a filter shows a user only their own keys and overrides.
    assert [v.key_id for v in await w.svc.list_keys(as_bob)] == [mine.key_id]
    await w.svc.set_override(as_bob, "bob", "github", {"API_KEY": GH_TOKEN})
    await w.svc.set_override(OP, "eve", "github", {"API_KEY": LINEAR_TOKEN})
    assert [(v.principal, v.updated_by) for v in await w.svc.list_overrides(as_bob)] == [("bob", "bob")]
    assert (await w.svc.revoke_key(as_bob, mine.key_id)).status == "revoked"
    denied = await w.store.query_audit(actor=bob.id)
    assert sum(e.outcome == "denied" for e in denied) == 11
    assert {e.details["reason"] for e in denied if e.outcome == "denied"} == {"permission_denied"}


# --- the role model through the service: who may act on whom ------------------------------------------

# The cast: every role twice, so each actor has a self, a user, a manager and an admin other than itself.
CAST = {"ada": Role.ADMIN, "mia": Role.MANAGER, "max": Role.MANAGER, "uma": Role.USER, "ulf": Role.USER}
# (actor, whose) -> the target's name: the actor itself, or another principal with that role.
WHOM = {
    ("ada", "self"): "ada", ("ada", "user"): "uma", ("ada", "manager"): "mia", ("ada", "admin"): "admin",
    ("mia", "self"): "mia", ("mia", "user"): "uma", ("mia", "manager"): "max", ("mia", "admin"): "ada",
    ("uma", "self"): "uma", ("uma", "user"): "ulf", ("uma", "manager"): "mia", ("uma", "admin"): "ada",
}  # fmt: skip
GHOST_NAME, GHOST_KEY = "nobody-here", "ZZZZZZZ"


@dataclass
class Cast:
    w: AdminWorld
    svc: AdminService  # the world's store, with an upstream for `overrides test`
    actors: dict[str, Actor]
    ids: dict[str, str]


@pytest.fixture
async def cast(world: AdminWorld) -> Cast:
    w = world
    _, signing = await w.svc.add_server(
        OP, "github", "individual", ["Authorization: Bearer {{API_KEY}}"], upstream_url="http://127.0.0.1:9/mcp"
    )
    w.secrets.append(signing.reveal())
    ids = {"admin": (await w.store.get_principal_by_name("admin")).id}  # type: ignore[union-attr]
    actors = {}
    for name, role in CAST.items():
        ids[name] = (await w.svc.add_principal(OP, name, "default", [role.value])).id
        actors[name] = Actor(ids[name], frozenset({role}))
    svc = AdminService(w.store, w.keyring, w.hasher, w.clock, AcceptingProbe())
    return Cast(w, svc, actors, ids)


async def _a_key(c: Cast, name: str) -> str:
    if name == GHOST_NAME:
        return GHOST_KEY
    view, secret = await c.svc.create_key(OP, name, "stage")
    c.w.secrets.append(secret.reveal())
    return view.key_id


async def _an_override(c: Cast, name: str) -> None:
    if name != GHOST_NAME:
        await c.svc.set_override(OP, name, "github", {"API_KEY": GH_TOKEN})


async def _regenerate(c: Cast, actor: Actor, t: str) -> object:
    return await c.svc.regenerate_key(actor, await _a_key(c, t))


async def _revoke(c: Cast, actor: Actor, t: str) -> object:
    return await c.svc.revoke_key(actor, await _a_key(c, t))


async def _delete_override(c: Cast, actor: Actor, t: str) -> None:
    await _an_override(c, t)
    await c.svc.delete_override(actor, t, "github")


async def _test_override(c: Cast, actor: Actor, t: str) -> object:
    await _an_override(c, t)
    return await c.svc.test_override(actor, "github", t)


async def _export_usage(c: Cast, actor: Actor, t: str) -> None:
    async for _ in await c.svc.export_usage(actor, principal_name=t):
        pass


# Each operation by `actor` on the principal named `t`, the stage (a key, an override) set by the operator.
KEY_OPS = {
    "keys.create": lambda c, actor, t: c.svc.create_key(actor, t, "by the actor"),
    "keys.regenerate": _regenerate,
    "keys.revoke": _revoke,
    "keys.list": lambda c, actor, t: c.svc.list_keys(actor, t),
}
OVERRIDE_OPS = {
    "overrides.set": lambda c, actor, t: c.svc.set_override(actor, t, "github", {"API_KEY": LINEAR_TOKEN}),
    "overrides.delete": _delete_override,
    "overrides.test": _test_override,
    "overrides.status": lambda c, actor, t: c.svc.credential_status(actor, "github", t),
    "overrides.list": lambda c, actor, t: c.svc.list_overrides(actor, "github", t),
    "usage.query": lambda c, actor, t: c.svc.query_usage(actor, principal_name=t),
    "usage.export": _export_usage,
}

# (actor's role, whose) -> allowed. Keys: only one's own, unless an admin. Overrides and usage:
# a manager's for anyone not above them (never an admin's); a user's only their own.
KEY_RIGHTS = {
    ("admin", "self"): True, ("admin", "user"): True, ("admin", "manager"): True, ("admin", "admin"): True,
    ("manager", "self"): True, ("manager", "user"): False, ("manager", "manager"): False, ("manager", "admin"): False,
    ("user", "self"): True, ("user", "user"): False, ("user", "manager"): False, ("user", "admin"): False,
}  # fmt: skip
OVERRIDE_RIGHTS = {
    ("admin", "self"): True, ("admin", "user"): True, ("admin", "manager"): True, ("admin", "admin"): True,
    ("manager", "self"): True, ("manager", "user"): True, ("manager", "manager"): True, ("manager", "admin"): False,
    ("user", "self"): True, ("user", "user"): False, ("user", "manager"): False, ("user", "admin"): False,
}  # fmt: skip
ACTOR_OF = {"admin": "ada", "manager": "mia", "user": "uma"}


def _service_cases() -> Iterator[object]:
    for ops, rights in ((KEY_OPS, KEY_RIGHTS), (OVERRIDE_OPS, OVERRIDE_RIGHTS)):
        for op in ops:
            for (role, whose), allowed in rights.items():
                yield pytest.param(op, role, whose, allowed, id=f"{role}-{op}-{whose}")


@pytest.mark.parametrize(("op", "role", "whose", "allowed"), list(_service_cases()))
async def test_who_may_act_on_whom(cast: Cast, op: str, role: str, whose: str, allowed: bool) -> None:
    c = cast
    name = ACTOR_OF[role]
    actor, target = c.actors[name], WHOM[(name, whose)]
    run = {**KEY_OPS, **OVERRIDE_OPS}[op]
    keys_before = await c.w.store.list_keys(c.ids[target])
    override_before = await c.w.store.get_override(c.ids[target], "github")
    if allowed:
        await run(c, actor, target)
        return
    with pytest.raises(PermissionDenied) as refused:
        await run(c, actor, target)
    # Nothing changed: no key issued, none revoked, no credential set.
    staged = 1 if op in ("keys.regenerate", "keys.revoke") else 0
    keys_after = await c.w.store.list_keys(c.ids[target])
    assert len(keys_after) == len(keys_before) + staged
    assert all(k.revoked_at is None for k in keys_after)
    if op == "overrides.set":
        assert await c.w.store.get_override(c.ids[target], "github") == override_before
    if op in ("overrides.delete", "overrides.test"):
        stored = await c.w.store.get_override(c.ids[target], "github")
        assert stored is not None and stored.status is OverrideStatus.CONFIGURED and stored.updated_by == "cli"
    # Nobody can tell a refusal from a principal (or key) that does not exist.
    with pytest.raises(PermissionDenied) as ghost:
        await run(c, actor, GHOST_NAME)
    assert ghost.value.message == refused.value.message
    assert target not in refused.value.message
    denied = [e for e in await c.w.store.query_audit(action=op) if e.outcome == "denied"]
    assert len(denied) == 2 and all(e.actor == actor.principal_id for e in denied)


async def test_a_managers_key_for_someone_else_is_never_issued(cast: Cast) -> None:
    """The escalation of issue 11: a manager asking for an admin's (or a user's) key gets none."""
    c = cast
    mia = c.actors["mia"]
    for target in ("ada", "admin", "uma", "max"):
        before = len(await c.w.store.list_keys(c.ids[target]))
        with pytest.raises(PermissionDenied):
            await c.svc.create_key(mia, target, "escalate")
        with pytest.raises(PermissionDenied):
            await c.svc.regenerate_key(mia, await _a_key(c, target))
        assert len(await c.w.store.list_keys(c.ids[target])) == before + 1  # only the operator's stage key
    # Her own, by name or implied.
    own, secret = await c.svc.create_key(mia, "mia", "mine")
    c.w.secrets.append(secret.reveal())
    _, secret = await c.svc.create_key(mia, None, "mine too")
    c.w.secrets.append(secret.reveal())
    new, secret = await c.svc.regenerate_key(mia, own.key_id)
    c.w.secrets.append(secret.reveal())
    assert (await c.svc.revoke_key(mia, new.key_id)).status == "revoked"
    # Listing "all keys" shows a manager only her own.
    assert {v.principal for v in await c.svc.list_keys(mia)} == {"mia"}
    assert {v.principal for v in await c.svc.list_keys(c.actors["ada"])} >= {"mia", "ada", "admin", "uma", "max"}


async def test_a_managers_listings_of_everyone_leave_out_admins(cast: Cast) -> None:
    c = cast
    for name in ("admin", "ada", "mia", "max", "uma", "ulf"):
        await c.svc.set_override(OP, name, "github", {"API_KEY": GH_TOKEN})
    everyone = {"admin", "ada", "mia", "max", "uma", "ulf"}
    below_admin = {"mia", "max", "uma", "ulf"}
    mia, ada, uma = c.actors["mia"], c.actors["ada"], c.actors["uma"]
    assert {v.principal for v in await c.svc.list_overrides(mia)} == below_admin
    assert {v.principal for v in await c.svc.list_overrides(mia, "github")} == below_admin
    assert {r.principal for r in await c.svc.credential_status(mia)} == below_admin
    assert {r.principal for r in await c.svc.credential_status(mia, "github")} == below_admin
    assert {v.principal for v in await c.svc.list_overrides(ada)} == everyone
    assert {r.principal for r in await c.svc.credential_status(OP, "github")} == everyone
    assert {v.principal for v in await c.svc.list_overrides(uma)} == {"uma"}
    assert {r.principal for r in await c.svc.credential_status(uma)} == {"uma"}
    # Nothing of an admin's, not even a masked value, in what the manager got.
    dump = repr(await c.svc.list_overrides(mia)) + repr(await c.svc.credential_status(mia))
    assert "'ada'" not in dump and "'admin'" not in dump


async def test_a_manager_still_manages_servers_reading_but_not_the_rest(cast: Cast) -> None:
    c = cast
    mia = c.actors["mia"]
    assert [s.name for s in await c.svc.list_servers(mia)] == ["github"]
    assert (await c.svc.show_server(mia, "github")).name == "github"
    for call in (
        lambda: c.svc.rotate_signing_secret(mia, "github"),
        lambda: c.svc.set_team_disabled(mia, "default", True),
        lambda: c.svc.set_principal_disabled(mia, "uma", True),
        lambda: c.svc.list_principals(mia),
        lambda: c.svc.query_audit(mia),
        lambda: c.svc.prune_usage(mia, T0),
    ):
        with pytest.raises(PermissionDenied):
            await call()
