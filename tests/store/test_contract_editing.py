"""The Store contract for editing principals and trimming the change log, run against every backend."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest

from authz_server.admin.service import Actor, AdminService
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import KeyHasher
from authz_server.errors import NotFound
from authz_server.live.follower import StateFollower
from authz_server.live.tables import AuthState
from authz_server.live.verified import VerifiedKeys
from authz_server.models import AuthMode, Entity, PrincipalKind, Role
from authz_server.store.base import Store
from tests.unit.fakes import FAST
from tests.store.records import T0, audit, entries, key, last_seq, override, principal, seed, usage


async def test_update_principal_replaces_kind_team_roles_and_rate_limit(store: Store) -> None:
    await seed(store)
    await store.ensure_team("ops", T0)
    since = await last_seq(store)
    alice = await store.get_principal("p-alice")
    assert alice is not None
    wanted = dataclasses.replace(
        alice, kind=PrincipalKind.SERVICE, team="ops", roles=(Role.ADMIN, Role.USER), rate_limit_per_minute=30
    )
    # Only those four change: a different name, disabled flag or creation time is ignored.
    sent = dataclasses.replace(wanted, name="mallory", disabled=True, created_at=T0 + timedelta(days=1))
    assert await store.update_principal(sent) == wanted
    assert await store.get_principal("p-alice") == wanted
    assert await store.get_principal_by_name("alice") == wanted
    cleared = await store.update_principal(dataclasses.replace(wanted, rate_limit_per_minute=None))
    assert cleared.rate_limit_per_minute is None
    assert entries(await store.changes_since(since)) == [(Entity.PRINCIPAL, "p-alice")] * 2


async def test_update_principal_needs_the_principal_and_its_team(store: Store) -> None:
    await seed(store)
    since = await last_seq(store)
    with pytest.raises(NotFound):
        await store.update_principal(principal("p-ghost", "ghost"))
    with pytest.raises(NotFound):
        await store.update_principal(principal("p-alice", "alice", team="nowhere"))
    assert (await store.get_principal("p-alice")).team == "eng"  # type: ignore[union-attr]
    assert await store.changes_since(since) == []


async def test_delete_principal_takes_its_keys_and_overrides_but_not_its_records(store: Store) -> None:
    await seed(store)
    await store.add_key(key("k-a1", "p-alice"))
    await store.add_key(key("k-a2", "p-alice"))
    await store.add_key(key("k-b1", "p-bob"))
    await store.put_override(override("p-alice", "github"))
    await store.put_override(override("p-alice", "slack"))
    await store.put_override(override("p-bob", "github"))
    await store.append_audit([audit(T0, "p-alice", "keys.create", "key:k-a1")])
    await store.append_usage([usage(T0, "p-alice")])
    since = await last_seq(store)

    await store.delete_principal("p-alice")

    changes = await store.changes_since(since)
    assert sorted(entries(changes)) == [
        (Entity.KEY, "k-a1"),
        (Entity.KEY, "k-a2"),
        (Entity.OVERRIDE, "p-alice/github"),
        (Entity.OVERRIDE, "p-alice/slack"),
        (Entity.PRINCIPAL, "p-alice"),
    ]
    assert await store.get_principal("p-alice") is None
    assert [k.key_id for k in await store.list_keys()] == ["k-b1"]
    assert [(o.principal_id, o.server) for o in await store.list_overrides()] == [("p-bob", "github")]
    assert [e.actor for e in await store.query_audit()] == ["p-alice"]
    assert [r.principal_id for r in await store.query_usage()] == ["p-alice"]
    with pytest.raises(NotFound):
        await store.delete_principal("p-alice")
    # The name is free again, under a new id.
    await store.add_principal(principal("p-alice2", "alice"))


async def _log_rows(store: Store, n: int) -> list[int]:
    for i in range(n):
        await store.ensure_team(f"t{i}", T0)
    return [c.seq for c in await store.changes_since(0, limit=1_000_000)]


async def test_trim_changes_by_count_keeps_the_newest(store: Store) -> None:
    seqs = await _log_rows(store, 6)
    assert await store.oldest_change_seq() == seqs[0]
    assert await store.trim_changes() == 0  # no bound given: nothing goes
    assert await store.trim_changes(keep=10) == 0
    assert await store.trim_changes(keep=4) == 2
    assert [c.seq for c in await store.changes_since(0)] == seqs[2:]
    assert await store.oldest_change_seq() == seqs[2]
    # Never the newest row: a snapshot's seq stays the newest seq ever logged.
    assert await store.trim_changes(keep=0) == 3
    assert [c.seq for c in await store.changes_since(0)] == seqs[-1:]
    assert (await store.snapshot()).seq == seqs[-1]
    # A seq is never reused after trimming.
    await store.ensure_team("later", T0)
    assert [c.seq for c in await store.changes_since(seqs[-1])][0] > seqs[-1]


async def test_trim_changes_by_age(store: Store) -> None:
    seqs = await _log_rows(store, 3)
    assert await store.trim_changes(before=datetime(2000, 1, 1, tzinfo=UTC)) == 0
    future = datetime.now(UTC) + timedelta(hours=1)
    assert await store.trim_changes(before=future) == 2
    assert [c.seq for c in await store.changes_since(0)] == seqs[-1:]
    assert await store.oldest_change_seq() == seqs[-1]


async def test_oldest_change_seq_of_an_empty_log_is_zero(store: Store) -> None:
    assert await store.oldest_change_seq() == 0
    assert await store.trim_changes(keep=1, before=datetime.now(UTC)) == 0


async def test_a_follower_behind_the_trimmed_log_ends_as_a_fresh_load(store: Store) -> None:
    """On every backend: a follower that stopped reading while principals were edited and deleted
    and the log was trimmed past its point reloads, and holds what a fresh load holds."""
    keyring = Keyring.from_spec(Keyring.generate_spec())
    admin = AdminService(store, keyring, KeyHasher(FAST))
    op = Actor.operator()
    await admin.initialize(op)
    await admin.add_server(op, "gh", AuthMode.INDIVIDUAL, headers=("Authorization: Bearer {{API_KEY}}",))
    for name in ("alice", "bob"):
        await admin.add_principal(op, name, "eng", (Role.USER,))
        await admin.create_key(op, name)
        await admin.set_override(op, name, "gh", {"API_KEY": f"{name}-token-0123456789"})

    def follower() -> StateFollower:
        state = AuthState()
        return StateFollower(store, keyring, state, VerifiedKeys(state), poll_interval=0.05)

    lagging = follower()
    await lagging.load()
    await admin.delete_principal(op, "bob")
    await admin.update_principal(op, "alice", team="ops", rate_limit_per_minute=7)
    await admin.update_server(op, "gh", headers=["Authorization: Bearer {{API_KEY}}", "X-Org: {{ORG}}"])
    await admin.add_principal(op, "carol", "eng", (Role.USER,))
    await store.trim_changes(keep=1)
    await lagging.poll_once()

    fresh = follower()
    await fresh.load()
    a, b = lagging.state, fresh.state
    assert (a.seq, a.teams, a.principals, a.servers, a.keys, a.overrides) == (
        b.seq, b.teams, b.principals, b.servers, b.keys, b.overrides)  # fmt: skip
    assert sorted(p.name for p in a.principals.values()) == ["admin", "alice", "carol"]
