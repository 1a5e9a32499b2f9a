"""admin/keys.py: gateway keys: creating (label, expiry, scope), status and listing, revoking,
regenerating with and without a grace period; a whole key where a key id belongs is refused."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from authz_server.admin.service import Actor, AdminService
from authz_server.admin.views import key_status
from authz_server.crypto import keys as gateway_keys
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import KeyHasher
from authz_server.errors import Conflict, InvalidInput, NotFound
from authz_server.store.memory import MemoryStore

from ..fakes import FAST, OP, T0, AdminWorld, add_github, assert_no_key, redacted


async def test_create_key_with_label_expiry_and_scope(world: AdminWorld) -> None:
    w = world
    await add_github(w)
    await w.svc.add_principal(OP, "bob", "default", ["user"])
    expires = T0 + timedelta(days=30)
    view, key = await w.svc.create_key(
        OP, "bob", "laptop", expires, ["github", " github:create_issue ", "github"]
    )
    w.secrets.append(key.reveal())
    assert view.principal == "bob" and view.label == "laptop" and view.status == "active"
    assert view.scope == ("github", "github:create_issue") and view.expires_at == expires
    assert gateway_keys.parse(key.reveal()).key_id == view.key_id
    stored = await w.store.get_key(view.key_id)
    assert stored is not None and w.hasher.verify(stored.hash, key.reveal())
    assert set(view.to_json()) == {
        "key_id", "principal", "label", "created_at", "last_used_at", "expires_at", "revoked_at", "scope", "status"
    }
    assert view.to_json()["expires_at"] == "2026-03-31T12:00:00Z"
    # A naive expiry is taken as UTC.
    naive, k2 = await w.svc.create_key(OP, "bob", expires_at=datetime(2026, 4, 1))
    w.secrets.append(k2.reveal())
    assert naive.expires_at == datetime(2026, 4, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"scope": ["nope"]}, InvalidInput, "names server nope, which does not exist"),
        ({"scope": ["GitHub"]}, InvalidInput, "Scope entry 1 is not"),
        ({"scope": ["github", "github:"]}, InvalidInput, "Scope entry 2 is not"),
        ({"scope": ["github:bad tool"]}, InvalidInput, "Scope entry 1"),
        ({"expires_at": T0}, InvalidInput, "expiry must be in the future"),
        ({"expires_at": T0 - timedelta(days=1)}, InvalidInput, "expiry must be in the future"),
        ({"label": "x" * 101}, InvalidInput, "label is longer than 100"),
        ({"label": "a\nb"}, InvalidInput, "label contains a control character"),
        ({"principal_name": "nobody"}, NotFound, "No principal named nobody"),
    ],
)
async def test_create_key_validation(world: AdminWorld, kwargs: dict, error: type, message: str) -> None:
    await add_github(world)
    args = {"principal_name": "admin"} | kwargs
    with pytest.raises(error, match=message):
        await world.svc.create_key(OP, **args)
    assert len(await world.store.list_keys()) == 1  # only the admin's initial key


async def test_key_status_and_listing(world: AdminWorld) -> None:
    w = world
    await w.svc.add_principal(OP, "bob", "default", ["user"])
    short, _ = await w.svc.create_key(OP, "bob", "short", T0 + timedelta(hours=1))
    keep, _ = await w.svc.create_key(OP, "bob", "keep")
    gone, _ = await w.svc.create_key(OP, "bob", "gone")
    revoked = await w.svc.revoke_key(OP, gone.key_id)
    assert revoked.status == "revoked" and revoked.revoked_at == T0
    w.clock.advance(hours=2)
    listing = {v.label: v for v in await w.svc.list_keys(OP, "bob")}
    statuses = {label: v.status for label, v in listing.items()}
    assert statuses == {"short": "expired", "keep": "active", "gone": "revoked"}
    everyone = await w.svc.list_keys(OP)
    assert sorted(v.principal for v in everyone) == ["admin", "bob", "bob", "bob"]
    for v in everyone:
        assert "hash" not in v.to_json() and not any(str(x).startswith("$argon2") for x in v.to_json().values())
    with pytest.raises(NotFound):
        await w.svc.revoke_key(OP, "AAAAAAA")
    assert short.key_id in listing["short"].key_id and keep.status == "active"


@pytest.mark.parametrize(
    ("key_id", "message"),
    [
        ("abc", "A key id is 7 letters and digits"),
        ("abc-def", "A key id is 7 letters and digits"),
        ("mgw_" + "A" * 32, "That is a whole gateway key"),
    ],
)
async def test_key_id_validation_never_echoes(world: AdminWorld, key_id: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        await world.svc.revoke_key(OP, key_id)
    assert message in info.value.message and key_id not in info.value.message


async def test_regenerate_without_grace_revokes_at_once(world: AdminWorld) -> None:
    w = world
    await add_github(w)
    await w.svc.add_principal(OP, "bob", "default", ["user"])
    old, old_key = await w.svc.create_key(OP, "bob", "ci", T0 + timedelta(days=7), ["github"])
    w.clock.advance(minutes=1)
    new, new_key = await w.svc.regenerate_key(OP, old.key_id)
    w.secrets += [old_key.reveal(), new_key.reveal()]
    assert new.key_id != old.key_id and new_key != old_key
    assert (new.principal, new.label, new.scope, new.expires_at) == ("bob", "ci", ("github",), T0 + timedelta(days=7))
    assert new.created_at == T0 + timedelta(minutes=1) and new.status == "active"
    stored_old = await w.store.get_key(old.key_id)
    assert stored_old is not None and stored_old.revoked_at == T0 + timedelta(minutes=1)
    assert key_status(stored_old, w.clock()) == "revoked"
    with pytest.raises(Conflict, match="already revoked or replaced"):
        await w.svc.regenerate_key(OP, old.key_id)


async def test_regenerate_with_grace_keeps_old_key_briefly(world: AdminWorld) -> None:
    w = world
    await w.svc.add_principal(OP, "bob", "default", ["user"])
    old, _ = await w.svc.create_key(OP, "bob", "app")
    new, _ = await w.svc.regenerate_key(OP, old.key_id, grace_seconds=600)
    stored_old = await w.store.get_key(old.key_id)
    assert stored_old is not None and stored_old.revoked_at == T0 + timedelta(seconds=600)
    assert key_status(stored_old, w.clock()) == "active"
    w.clock.advance(seconds=601)
    statuses = {v.key_id: v.status for v in await w.svc.list_keys(OP, "bob")}
    assert statuses == {old.key_id: "revoked", new.key_id: "active"}
    # Revoking during the grace period cuts it short.
    other, _ = await w.svc.create_key(OP, "bob", "other")
    await w.svc.regenerate_key(OP, other.key_id, grace_seconds=600)
    assert (await w.svc.revoke_key(OP, other.key_id)).revoked_at == w.clock()
    for bad in (-1, 30 * 86400 + 1):
        with pytest.raises(InvalidInput, match="grace period"):
            await w.svc.regenerate_key(OP, new.key_id, grace_seconds=bad)


async def test_regenerate_expired_key_is_refused(world: AdminWorld) -> None:
    w = world
    view, _ = await w.svc.create_key(OP, "admin", "soon", T0 + timedelta(hours=1))
    w.clock.advance(hours=1)
    with pytest.raises(Conflict, match="has expired"):
        await w.svc.regenerate_key(OP, view.key_id)


# --- a whole key where a key id belongs ---------------------------------------------------------


@pytest.mark.parametrize("operation", ["revoke", "regenerate"])
async def test_revoking_a_whole_key_is_refused_and_the_audit_shows_only_its_key_id(operation: str) -> None:
    store = MemoryStore()
    await store.migrate()
    svc = AdminService(store, Keyring.from_spec(Keyring.generate_spec()), KeyHasher(FAST), lambda: T0)
    _, _, admin_key = await svc.initialize(Actor.operator())
    key_id, key = gateway_keys.parse(admin_key.reveal()).key_id, admin_key.reveal()
    call = svc.revoke_key if operation == "revoke" else svc.regenerate_key
    with pytest.raises(InvalidInput) as refused:
        await call(Actor.operator(), key)
    assert_no_key(refused.value.message, key)
    events = await store.query_audit(limit=1000)
    (event,) = [e for e in events if e.action == f"keys.{operation}"]
    assert event.outcome == "error"
    assert event.target == f"key:{redacted(key_id)}"
    for e in events:
        assert_no_key(repr(e), key)
