"""The Store contract (authz_server/store/base.py), run against every backend."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import pytest

from authz_server.errors import Conflict, InvalidInput, NotFound, StoreError
from authz_server.models import (
    AuthMode,
    Entity,
    HeaderTemplate,
    OverrideStatus,
    Placeholder,
    PrincipalKind,
    Role,
    Sealed,
    SealedRow,
    Snapshot,
    Team,
    new_uid,
)
from authz_server.store import codec, open_store, sql
from authz_server.store.memory import MemoryStore
from authz_server.store.base import Store
from tests.store.conftest import drop_schema
from tests.store.records import (
    T0,
    audit,
    entries,
    key,
    last_seq,
    minutes,
    override,
    principal,
    sealed,
    seed,
    server,
    usage,
)

# --- lifecycle ---------------------------------------------------------------------


async def test_migrate_is_idempotent_and_keeps_data(store: Store) -> None:
    version = await store.schema_version()
    assert version >= 1
    await store.ensure_team("eng", T0)
    await store.migrate()
    await store.migrate()
    assert await store.schema_version() == version
    assert await store.get_team("eng") == Team("eng", False, T0)
    assert entries(await store.changes_since(0)) == [(Entity.TEAM, "eng")]


async def test_a_closed_store_raises_store_error(store: Store) -> None:
    await store.close()
    with pytest.raises(StoreError):
        await store.get_team("eng")
    await store.close()  # closing twice is harmless


# --- master key checks -------------------------------------------------------------------


async def test_key_checks_add_or_replace_each_version(store: Store) -> None:
    assert await store.get_key_checks() == {}
    one, two, one_again = sealed("check-1"), sealed("check-2", version=2), sealed("check-1b")
    await store.put_key_checks({1: one})
    await store.put_key_checks({2: two})
    assert await store.get_key_checks() == {1: one, 2: two}
    await store.put_key_checks({1: one_again})
    assert await store.get_key_checks() == {1: one_again, 2: two}
    assert await store.changes_since(0) == []


# --- teams -----------------------------------------------------------------------------------


async def test_ensure_team_creates_once(store: Store) -> None:
    first = await store.ensure_team("eng", T0)
    again = await store.ensure_team("eng", minutes(60))
    assert first == again == Team("eng", False, T0)
    assert await store.get_team("eng") == first
    assert await store.get_team("nope") is None
    assert entries(await store.changes_since(0)) == [(Entity.TEAM, "eng")]


async def test_list_teams_sorted_by_name(store: Store) -> None:
    names = ["ops", "ab", "a.c", "a-b", "eng", "a0"]
    for name in names:
        await store.ensure_team(name, T0)
    # Code point order, whatever the database's locale.
    assert [t.name for t in await store.list_teams()] == ["a-b", "a.c", "a0", "ab", "eng", "ops"]


async def test_set_team_disabled(store: Store) -> None:
    await store.ensure_team("eng", T0)
    assert await store.set_team_disabled("eng", True) == Team("eng", True, T0)
    assert (await store.get_team("eng")) == Team("eng", True, T0)
    assert await store.set_team_disabled("eng", False) == Team("eng", False, T0)
    with pytest.raises(NotFound):
        await store.set_team_disabled("ghost", True)
    assert entries(await store.changes_since(0)) == [(Entity.TEAM, "eng")] * 3


# --- principals ----------------------------------------------------------------------------------


async def test_principal_round_trip(store: Store) -> None:
    await store.ensure_team("eng", T0)
    alice = principal(
        "p-1",
        "alice",
        kind=PrincipalKind.SERVICE,
        roles=(Role.MANAGER, Role.ADMIN),
        rate_limit_per_minute=120,
        created_at=minutes(3),
    )
    bare = principal("p-2", "bob", roles=(), rate_limit_per_minute=None, created_at=None)
    assert await store.add_principal(alice) == alice
    assert await store.add_principal(bare) == bare
    assert await store.get_principal("p-1") == alice
    assert await store.get_principal_by_name("alice") == alice
    assert await store.get_principal("p-2") == bare
    got = await store.get_principal("p-1")
    assert got is not None and got.roles == (Role.MANAGER, Role.ADMIN) and got.kind is PrincipalKind.SERVICE
    assert await store.get_principal("alice") is None
    assert await store.get_principal_by_name("p-1") is None


async def test_add_principal_refuses_duplicates_and_a_missing_team(store: Store) -> None:
    await store.ensure_team("eng", T0)
    await store.add_principal(principal("p-alice", "alice"))
    with pytest.raises(Conflict):
        await store.add_principal(principal("p-alice", "alice2"))
    with pytest.raises(Conflict):
        await store.add_principal(principal("p-other", "alice"))
    with pytest.raises(NotFound):
        await store.add_principal(principal("p-carol", "carol", team="ghost"))
    assert [p.id for p in await store.list_principals()] == ["p-alice"]
    assert entries(await store.changes_since(0)) == [(Entity.TEAM, "eng"), (Entity.PRINCIPAL, "p-alice")]


async def test_list_principals_sorted_by_name_and_filtered_by_team(store: Store) -> None:
    await store.ensure_team("eng", T0)
    await store.ensure_team("ops", T0)
    await store.add_principal(principal("p-3", "carol", team="ops"))
    await store.add_principal(principal("p-1", "zed"))
    await store.add_principal(principal("p-2", "alice"))
    assert [p.name for p in await store.list_principals()] == ["alice", "carol", "zed"]
    assert [p.name for p in await store.list_principals(team="eng")] == ["alice", "zed"]
    assert [p.name for p in await store.list_principals(team="ops")] == ["carol"]
    assert await store.list_principals(team="ghost") == []


async def test_set_principal_disabled(store: Store) -> None:
    await seed(store)
    since = await last_seq(store)
    disabled = await store.set_principal_disabled("p-alice", True)
    assert disabled == dataclasses.replace(principal("p-alice", "alice"), disabled=True)
    assert await store.get_principal("p-alice") == disabled
    with pytest.raises(NotFound):
        await store.set_principal_disabled("p-ghost", True)
    assert entries(await store.changes_since(since)) == [(Entity.PRINCIPAL, "p-alice")]


# --- servers -------------------------------------------------------------------------------------


async def test_server_round_trip(store: Store) -> None:
    github = server("github")
    bare = server(
        "plain",
        mode=AuthMode.NONE,
        headers=(),
        placeholders=(),
        shared_values={},
        shared_masks={},
        signing_secret=None,
        description="",
        created_at=None,
        updated_at=None,
        upstream_url="",
    )
    assert await store.add_server(github) == github
    assert await store.add_server(bare) == bare
    assert await store.get_server("github") == github
    assert await store.get_server("plain") == bare
    assert await store.get_server("ghost") is None


async def test_add_server_conflict_keeps_the_original(store: Store) -> None:
    await store.add_server(server("github"))
    with pytest.raises(Conflict):
        await store.add_server(server("github", description="impostor"))
    got = await store.get_server("github")
    assert got is not None and got.description == "The github MCP server"
    assert entries(await store.changes_since(0)) == [(Entity.SERVER, "github")]


async def test_list_servers_sorted_by_name(store: Store) -> None:
    for name in ["slack", "github", "git-lab", "a"]:
        await store.add_server(server(name))
    assert [s.name for s in await store.list_servers()] == ["a", "git-lab", "github", "slack"]


async def test_update_server_replaces_all_but_name_and_created_at(store: Store) -> None:
    await store.add_server(server("github"))
    changed = server(
        "github",
        mode=AuthMode.INDIVIDUAL,
        headers=(HeaderTemplate("X-API-Key", "{{TOKEN}}"),),
        placeholders=(Placeholder("TOKEN", True),),
        shared_values={"TOKEN": sealed("new-token", version=3)},
        shared_masks={"TOKEN": "…zz"},
        signing_secret=sealed("new-signing"),
        description="changed",
        created_at=minutes(500),
        updated_at=minutes(30),
        upstream_url="https://mcp.example.com/v1/mcp?x=1",
    )
    updated = await store.update_server(changed)
    expected = dataclasses.replace(changed, created_at=T0)
    assert updated == expected
    assert await store.get_server("github") == expected
    with pytest.raises(NotFound):
        await store.update_server(server("ghost"))
    assert entries(await store.changes_since(0)) == [(Entity.SERVER, "github")] * 2


async def test_remove_server_cascades_its_overrides(store: Store) -> None:
    await seed(store)
    await store.put_override(override("p-alice", "github"))
    await store.put_override(override("p-bob", "github"))
    await store.put_override(override("p-alice", "slack"))
    since = await last_seq(store)

    await store.remove_server("github")

    changes = await store.changes_since(since)
    assert sorted(entries(changes)) == [
        (Entity.OVERRIDE, "p-alice/github"),
        (Entity.OVERRIDE, "p-bob/github"),
        (Entity.SERVER, "github"),
    ]
    assert all(a.seq < b.seq for a, b in zip(changes, changes[1:], strict=False))
    assert await store.get_server("github") is None
    assert await store.get_override("p-alice", "github") is None
    assert [(o.principal_id, o.server) for o in await store.list_overrides()] == [("p-alice", "slack")]
    with pytest.raises(NotFound):
        await store.remove_server("github")


# --- gateway keys ----------------------------------------------------------------------------------


async def test_key_round_trip(store: Store) -> None:
    await seed(store)
    full = key(
        "k-full",
        "p-alice",
        created_at=minutes(1),
        last_used_at=minutes(2),
        expires_at=minutes(3),
        revoked_at=minutes(4),
        scope=("github", "slack:post_message"),
    )
    bare = key("k-bare", "p-bob", label="", created_at=None, scope=())
    assert await store.add_key(full) == full
    assert await store.add_key(bare) == bare
    assert await store.get_key("k-full") == full
    assert await store.get_key("k-bare") == bare
    assert await store.get_key("k-ghost") is None


async def test_add_key_conflict_and_missing_principal(store: Store) -> None:
    await seed(store)
    since = await last_seq(store)
    await store.add_key(key("k-1", "p-alice"))
    with pytest.raises(Conflict):
        await store.add_key(key("k-1", "p-bob"))
    with pytest.raises(NotFound):
        await store.add_key(key("k-2", "p-ghost"))
    assert [k.key_id for k in await store.list_keys()] == ["k-1"]
    assert entries(await store.changes_since(since)) == [(Entity.KEY, "k-1")]


async def test_list_keys_sorted_by_created_at_then_key_id(store: Store) -> None:
    await seed(store)
    await store.add_key(key("k-b", "p-alice", created_at=minutes(2)))
    await store.add_key(key("k-c", "p-bob", created_at=T0))
    await store.add_key(key("k-a", "p-alice", created_at=T0))
    await store.add_key(key("k-d", "p-alice", created_at=minutes(-1)))
    await store.add_key(key("k-z", "p-alice", created_at=None))
    assert [k.key_id for k in await store.list_keys()] == ["k-z", "k-d", "k-a", "k-c", "k-b"]
    assert [k.key_id for k in await store.list_keys("p-alice")] == ["k-z", "k-d", "k-a", "k-b"]
    assert [k.key_id for k in await store.list_keys("p-bob")] == ["k-c"]
    assert await store.list_keys("p-ghost") == []


async def test_revoke_key_keeps_an_earlier_revoked_at(store: Store) -> None:
    await seed(store)
    await store.add_key(key("k-1", "p-alice"))
    since = await last_seq(store)

    assert (await store.revoke_key("k-1", minutes(10))).revoked_at == minutes(10)
    assert (await store.revoke_key("k-1", minutes(20))).revoked_at == minutes(10)
    # An earlier time wins: a grace period cut short.
    assert (await store.revoke_key("k-1", minutes(5))).revoked_at == minutes(5)
    got = await store.get_key("k-1")
    assert got is not None and got.revoked_at == minutes(5) and got.hash == key("k-1", "p-alice").hash
    with pytest.raises(NotFound):
        await store.revoke_key("k-ghost", minutes(1))
    assert entries(await store.changes_since(since)) == [(Entity.KEY, "k-1")] * 3


async def test_touch_keys_records_last_use_without_a_change(store: Store) -> None:
    await seed(store)
    await store.add_key(key("k-1", "p-alice"))
    await store.add_key(key("k-2", "p-alice"))
    since = await last_seq(store)

    await store.touch_keys({"k-1": minutes(5), "k-ghost": minutes(5)})
    await store.touch_keys({})
    assert (await store.get_key("k-1")).last_used_at == minutes(5)  # type: ignore[union-attr]
    assert (await store.get_key("k-2")).last_used_at is None  # type: ignore[union-attr]
    # A replica flushing an older time never moves it back.
    await store.touch_keys({"k-1": minutes(1)})
    assert (await store.get_key("k-1")).last_used_at == minutes(5)  # type: ignore[union-attr]
    await store.touch_keys({"k-1": minutes(9), "k-2": minutes(8)})
    assert [k.last_used_at for k in await store.list_keys()] == [minutes(9), minutes(8)]
    assert await store.changes_since(since) == []


# --- overrides -------------------------------------------------------------------------------------


async def test_override_round_trip_and_replace(store: Store) -> None:
    await seed(store)
    since = await last_seq(store)
    first = override(
        "p-alice",
        "github",
        status=OverrideStatus.INVALID,
        status_reason="upstream said 401",
        status_at=minutes(3),
        expires_at=minutes(600),
    )
    assert await store.put_override(first) == first
    assert await store.get_override("p-alice", "github") == first

    second = override(
        "p-alice",
        "github",
        values={"API_KEY": sealed("rotated"), "CLIENT_ID": sealed("client", version=7)},
        masks={"API_KEY": "…wxyz", "CLIENT_ID": "…"},
        updated_by="p-bob",
        updated_at=minutes(10),
    )
    assert await store.put_override(second) == second
    assert await store.get_override("p-alice", "github") == second
    assert await store.get_override("p-bob", "github") is None
    assert entries(await store.changes_since(since)) == [(Entity.OVERRIDE, "p-alice/github")] * 2


async def test_put_override_needs_principal_and_server(store: Store) -> None:
    await seed(store)
    since = await last_seq(store)
    with pytest.raises(NotFound):
        await store.put_override(override("p-ghost", "github"))
    with pytest.raises(NotFound):
        await store.put_override(override("p-alice", "ghost"))
    assert await store.list_overrides() == []
    assert await store.changes_since(since) == []


async def test_list_overrides_sorted_and_filtered(store: Store) -> None:
    await seed(store)
    for pid, srv in [("p-bob", "slack"), ("p-alice", "slack"), ("p-bob", "github"), ("p-alice", "github")]:
        await store.put_override(override(pid, srv))

    def pairs(found: list) -> list[tuple[str, str]]:
        return [(o.server, o.principal_id) for o in found]

    assert pairs(await store.list_overrides()) == [
        ("github", "p-alice"),
        ("github", "p-bob"),
        ("slack", "p-alice"),
        ("slack", "p-bob"),
    ]
    assert pairs(await store.list_overrides(server="slack")) == [("slack", "p-alice"), ("slack", "p-bob")]
    assert pairs(await store.list_overrides(principal_id="p-bob")) == [("github", "p-bob"), ("slack", "p-bob")]
    assert pairs(await store.list_overrides(server="github", principal_id="p-bob")) == [("github", "p-bob")]
    assert await store.list_overrides(server="ghost") == []


async def test_delete_override(store: Store) -> None:
    await seed(store)
    await store.put_override(override("p-alice", "github"))
    await store.put_override(override("p-bob", "github"))
    since = await last_seq(store)
    await store.delete_override("p-alice", "github")
    assert await store.get_override("p-alice", "github") is None
    assert await store.get_override("p-bob", "github") is not None
    with pytest.raises(NotFound):
        await store.delete_override("p-alice", "github")
    assert entries(await store.changes_since(since)) == [(Entity.OVERRIDE, "p-alice/github")]


async def test_set_override_status(store: Store) -> None:
    await seed(store)
    original = await store.put_override(override("p-alice", "github"))
    since = await last_seq(store)
    updated = await store.set_override_status("p-alice", "github", OverrideStatus.EXPIRED, "token expired", minutes(7))
    expected = dataclasses.replace(
        original, status=OverrideStatus.EXPIRED, status_reason="token expired", status_at=minutes(7)
    )
    assert updated == expected
    assert await store.get_override("p-alice", "github") == expected
    with pytest.raises(NotFound):
        await store.set_override_status("p-bob", "github", OverrideStatus.MISSING, "", minutes(7))
    assert entries(await store.changes_since(since)) == [(Entity.OVERRIDE, "p-alice/github")]


# --- change log ----------------------------------------------------------------------------------------


async def test_every_mutation_logs_its_entity_and_key(store: Store) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    await store.ensure_team("eng", T0)
    await store.ensure_team("eng", T0)  # exists: no change
    await store.set_team_disabled("eng", False)
    await store.add_principal(principal("p-alice", "alice"))
    await store.set_principal_disabled("p-alice", True)
    await store.add_server(server("github"))
    await store.update_server(server("github", description="changed"))
    await store.add_key(key("k-1", "p-alice"))
    await store.revoke_key("k-1", minutes(1))
    await store.touch_keys({"k-1": minutes(2)})  # not a change
    await store.put_override(override("p-alice", "github"))
    await store.set_override_status("p-alice", "github", OverrideStatus.INVALID, "bad", minutes(3))
    await store.delete_override("p-alice", "github")
    await store.put_override(override("p-alice", "github"))
    await store.append_audit([audit(T0, "cli", "keys.create")])  # not a change
    await store.put_key_checks({1: sealed("check")})  # not a change
    await store.remove_server("github")
    await store.prune_audit(minutes(100))  # not a change
    after = datetime.now(UTC) + timedelta(seconds=1)

    changes = await store.changes_since(0)
    assert entries(changes) == [
        (Entity.TEAM, "eng"),
        (Entity.TEAM, "eng"),
        (Entity.PRINCIPAL, "p-alice"),
        (Entity.PRINCIPAL, "p-alice"),
        (Entity.SERVER, "github"),
        (Entity.SERVER, "github"),
        (Entity.KEY, "k-1"),
        (Entity.KEY, "k-1"),
        (Entity.OVERRIDE, "p-alice/github"),
        (Entity.OVERRIDE, "p-alice/github"),
        (Entity.OVERRIDE, "p-alice/github"),
        (Entity.OVERRIDE, "p-alice/github"),
        (Entity.OVERRIDE, "p-alice/github"),  # removed with its server
        (Entity.SERVER, "github"),
    ]
    seqs = [c.seq for c in changes]
    assert seqs[0] >= 1 and all(a < b for a, b in zip(seqs, seqs[1:], strict=False))
    assert all(before <= c.at <= after and c.at.utcoffset() == timedelta(0) for c in changes)


async def test_changes_since_pages_with_limit(store: Store) -> None:
    for name in ["t1", "t2", "t3", "t4", "t5"]:
        await store.ensure_team(name, T0)
    page1 = await store.changes_since(0, limit=2)
    assert [c.entity_key for c in page1] == ["t1", "t2"]
    page2 = await store.changes_since(page1[-1].seq, limit=2)
    assert [c.entity_key for c in page2] == ["t3", "t4"]
    page3 = await store.changes_since(page2[-1].seq, limit=2)
    assert [c.entity_key for c in page3] == ["t5"]
    assert await store.changes_since(page3[-1].seq) == []
    assert await store.changes_since(0, limit=0) == []
    everything = await store.changes_since(0)
    assert [c.seq for c in everything] == [c.seq for c in page1 + page2 + page3]
    assert [c.entity_key for c in await store.changes_since(everything[1].seq)] == ["t3", "t4", "t5"]


async def test_failed_mutations_log_nothing(store: Store) -> None:
    await seed(store)
    await store.add_key(key("k-1", "p-alice"))
    since = await last_seq(store)
    attempts = [
        store.set_team_disabled("ghost", True),
        store.add_principal(principal("p-alice", "alice")),
        store.set_principal_disabled("p-ghost", True),
        store.add_server(server("github")),
        store.update_server(server("ghost")),
        store.remove_server("ghost"),
        store.add_key(key("k-1", "p-alice")),
        store.revoke_key("k-ghost", T0),
        store.put_override(override("p-ghost", "github")),
        store.delete_override("p-alice", "github"),
        store.set_override_status("p-alice", "github", OverrideStatus.MISSING, "", T0),
    ]
    for attempt in attempts:
        with pytest.raises((Conflict, NotFound)):
            await attempt
    assert await store.changes_since(since) == []


async def test_wait_for_changes_returns_by_its_timeout(store: Store) -> None:
    started = time.monotonic()
    await asyncio.wait_for(store.wait_for_changes(0.05), timeout=5)
    assert time.monotonic() - started < 2


# --- snapshot -------------------------------------------------------------------------------------------


async def test_snapshot_of_an_empty_store(store: Store) -> None:
    assert await store.snapshot() == Snapshot(seq=0, teams=(), principals=(), servers=(), keys=(), overrides=())


async def test_snapshot_holds_every_row_sorted_at_the_newest_seq(store: Store) -> None:
    await seed(store)
    await store.ensure_team("ops", T0)
    await store.add_key(key("k-2", "p-bob", created_at=minutes(1)))
    await store.add_key(key("k-1", "p-alice", created_at=minutes(2), revoked_at=minutes(3)))
    await store.put_override(override("p-bob", "slack"))
    await store.put_override(override("p-alice", "slack"))

    snap = await store.snapshot()
    assert snap.seq == await last_seq(store) and snap.seq > 0
    assert snap.teams == tuple(await store.list_teams())
    assert [t.name for t in snap.teams] == ["eng", "ops"]
    assert snap.principals == tuple(await store.list_principals())
    assert [p.name for p in snap.principals] == ["alice", "bob"]
    assert snap.servers == (server("github"), server("slack"))
    assert [k.key_id for k in snap.keys] == ["k-2", "k-1"]  # revoked keys are rows too
    assert snap.overrides == (override("p-alice", "slack"), override("p-bob", "slack"))

    await store.set_principal_disabled("p-bob", True)
    later = await store.snapshot()
    assert later.seq == snap.seq + 1
    assert [p.disabled for p in later.principals] == [False, True]


# --- encoding -------------------------------------------------------------------------------------------


async def test_datetimes_come_back_utc_to_the_microsecond(store: Store) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    west = timezone(timedelta(hours=-7))
    t1 = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=india)
    t2 = datetime(2031, 12, 31, 23, 59, 59, 999999, tzinfo=west)
    t3 = datetime(2025, 6, 1, 0, 0, 0, 1, tzinfo=UTC)

    team = await store.ensure_team("eng", t1)
    await store.add_principal(principal("p-1", "alice", created_at=t2))
    await store.add_server(server("github", created_at=t1, updated_at=t2))
    await store.add_key(key("k-1", "p-1", created_at=t1, expires_at=t2, last_used_at=t3))
    await store.revoke_key("k-1", t2)
    await store.put_override(override("p-1", "github", updated_at=t1, expires_at=t2))
    await store.set_override_status("p-1", "github", OverrideStatus.INVALID, "", t3)
    await store.append_audit([audit(t2, "cli", "x")])

    got_team = await store.get_team("eng")
    got_principal = await store.get_principal("p-1")
    got_server = await store.get_server("github")
    got_key = await store.get_key("k-1")
    got_override = await store.get_override("p-1", "github")
    [got_event] = await store.query_audit()
    assert got_team and got_principal and got_server and got_key and got_override
    pairs = [
        (team.created_at, t1),
        (got_team.created_at, t1),
        (got_principal.created_at, t2),
        (got_server.created_at, t1),
        (got_server.updated_at, t2),
        (got_key.created_at, t1),
        (got_key.expires_at, t2),
        (got_key.last_used_at, t3),
        (got_key.revoked_at, t2),
        (got_override.updated_at, t1),
        (got_override.expires_at, t2),
        (got_override.status_at, t3),
        (got_event.at, t2),
    ]
    for got, sent in pairs:
        assert got == sent
        assert got is not None and got.utcoffset() == timedelta(0)
        assert (got.hour, got.minute, got.microsecond) == (
            sent.astimezone(UTC).hour,
            sent.astimezone(UTC).minute,
            sent.microsecond,
        )


async def test_naive_datetimes_are_refused(store: Store) -> None:
    naive = datetime(2025, 1, 1, 12, 0, 0)
    with pytest.raises(InvalidInput):
        await store.ensure_team("eng", naive)
    await store.ensure_team("eng", T0)
    await store.add_principal(principal("p-1", "alice"))
    with pytest.raises(InvalidInput):
        await store.add_key(key("k-1", "p-1", created_at=naive))
    assert await store.get_key("k-1") is None
    assert entries(await store.changes_since(0)) == [(Entity.TEAM, "eng"), (Entity.PRINCIPAL, "p-1")]


async def test_sealed_values_round_trip_byte_exact(store: Store) -> None:
    awkward = Sealed(2**31 - 1, nonce=bytes(range(12)), ciphertext=bytes(range(256)) + b"\x00\x00")
    empty = Sealed(1, nonce=b"\x00" * 12, ciphertext=b"")
    await seed(store)
    await store.update_server(
        server("github", shared_values={"API_KEY": awkward, "EMPTY": empty}, signing_secret=awkward)
    )
    await store.put_override(override("p-alice", "github", values={"API_KEY": awkward}))
    await store.put_key_checks({7: awkward})

    got_server = await store.get_server("github")
    got_override = await store.get_override("p-alice", "github")
    assert got_server is not None and got_override is not None
    assert got_server.shared_values == {"API_KEY": awkward, "EMPTY": empty}
    assert got_server.shared_values["API_KEY"].ciphertext == bytes(range(256)) + b"\x00\x00"
    assert got_server.signing_secret == awkward
    assert got_override.values["API_KEY"].nonce == bytes(range(12))
    assert (await store.get_key_checks())[7] == awkward


async def test_returned_records_are_copies(store: Store) -> None:
    await seed(store)
    mine = server("mine")
    await store.add_server(mine)
    mine.shared_values.clear()  # the caller's dict, after the call
    got = await store.get_server("mine")
    assert got is not None and set(got.shared_values) == {"API_KEY", "CLIENT_ID"}
    got.shared_masks["API_KEY"] = "tampered"
    got.shared_values.pop("CLIENT_ID")
    again = await store.get_server("mine")
    assert again == server("mine")

    await store.put_override(override("p-alice", "github"))
    found = await store.get_override("p-alice", "github")
    assert found is not None
    found.values.clear()
    assert await store.get_override("p-alice", "github") == override("p-alice", "github")


# --- re-encryption (master-key rotate) -------------------------------------------------------------------


async def _sealed_world(store: Store) -> None:
    """seed's github and slack, a server with no signing secret, and overrides across two principals."""
    await seed(store)
    await store.add_server(server("zed", shared_values={}, signing_secret=None))
    for pid, name in (("p-bob", "github"), ("p-alice", "slack"), ("p-alice", "github")):
        await store.put_override(override(pid, name))


async def _all_rows(store: Store, entity: Entity, batch: int) -> list[SealedRow]:
    rows: list[SealedRow] = []
    while page := await store.sealed_rows(entity, rows[-1].key if rows else "", batch):
        assert len(page) <= batch
        rows += page
    return rows


@pytest.mark.parametrize("batch", [1, 2, 100])
async def test_sealed_rows_page_through_every_sealed_value_in_key_order(store: Store, batch: int) -> None:
    await _sealed_world(store)
    servers = await _all_rows(store, Entity.SERVER, batch)
    assert servers == [
        SealedRow(Entity.SERVER, "github", server("github").shared_values, sealed("github-signing")),
        SealedRow(Entity.SERVER, "slack", server("slack").shared_values, sealed("slack-signing")),
        SealedRow(Entity.SERVER, "zed", {}, None),
    ]
    assert servers[0].versions() == {1, 2}
    overrides = await _all_rows(store, Entity.OVERRIDE, batch)
    assert [r.key for r in overrides] == ["p-alice/github", "p-alice/slack", "p-bob/github"]
    assert overrides[2] == SealedRow(Entity.OVERRIDE, "p-bob/github", {"API_KEY": sealed("p-bob-github")})
    assert await store.sealed_rows(Entity.OVERRIDE, "p-bob/github") == []
    assert await store.sealed_rows(Entity.SERVER, limit=0) == []


async def test_reseal_replaces_only_the_sealed_values_and_logs_each_row(store: Store) -> None:
    await _sealed_world(store)
    await store.set_override_status("p-alice", "github", OverrideStatus.INVALID, "upstream said 401", minutes(5))
    before_server = await store.get_server("github")
    before_override = await store.get_override("p-alice", "github")
    assert before_server is not None and before_override is not None
    old_server, old_override = (await store.sealed_rows(Entity.SERVER, limit=1))[0], (
        await store.sealed_rows(Entity.OVERRIDE, limit=1))[0]  # fmt: skip
    new_server = SealedRow(Entity.SERVER, "github", {"API_KEY": sealed("new-api", 3)}, sealed("new-signing", 3))
    new_override = SealedRow(Entity.OVERRIDE, "p-alice/github", {"API_KEY": sealed("new-alice", 3)})
    seq = await last_seq(store)

    assert await store.reseal([(old_server, new_server), (old_override, new_override)]) == 2

    assert entries(await store.changes_since(seq)) == [(Entity.SERVER, "github"), (Entity.OVERRIDE, "p-alice/github")]
    assert await store.get_server("github") == dataclasses.replace(
        before_server, shared_values=new_server.values, signing_secret=new_server.signing
    )
    assert await store.get_override("p-alice", "github") == dataclasses.replace(before_override, values=new_override.values)
    assert (await store.sealed_rows(Entity.SERVER, limit=1))[0] == new_server


async def test_reseal_leaves_a_row_changed_or_deleted_since_it_was_read(store: Store) -> None:
    await _sealed_world(store)
    rows = {r.key: r for r in await store.sealed_rows(Entity.OVERRIDE)}
    github = (await store.sealed_rows(Entity.SERVER, limit=1))[0]
    # Meanwhile: alice's github override gets a new value, bob's is deleted, the github server's signing secret changes.
    await store.put_override(override("p-alice", "github", values={"API_KEY": sealed("typed-meanwhile", 2)}))
    await store.delete_override("p-bob", "github")
    await store.update_server(server("github", signing_secret=sealed("rotated-meanwhile", 2)))
    seq = await last_seq(store)

    def bump(row: SealedRow) -> SealedRow:
        return dataclasses.replace(row, values={f: sealed(f"re-{row.key}-{f}", 3) for f in row.values})

    pairs = [(rows[k], bump(rows[k])) for k in ("p-alice/github", "p-bob/github", "p-alice/slack")]
    assert await store.reseal([*pairs, (github, bump(github))]) == 1  # only alice's slack override was unchanged

    assert entries(await store.changes_since(seq)) == [(Entity.OVERRIDE, "p-alice/slack")]
    alice = await store.get_override("p-alice", "github")
    assert alice is not None and alice.values == {"API_KEY": sealed("typed-meanwhile", 2)}
    assert await store.get_override("p-bob", "github") is None
    got = await store.get_server("github")
    assert got is not None and got.signing_secret == sealed("rotated-meanwhile", 2)
    assert await store.reseal([]) == 0


async def test_remove_key_check_forgets_one_version(store: Store) -> None:
    await store.put_key_checks({1: sealed("check-1"), 2: sealed("check-2", 2)})
    await store.remove_key_check(1)
    await store.remove_key_check(9)  # none: nothing happens
    assert await store.get_key_checks() == {2: sealed("check-2", 2)}
    assert await store.changes_since(0) == []  # not a change


# --- audit ----------------------------------------------------------------------------------------------


@pytest.fixture
def events() -> list:
    return [
        audit(T0, "cli", "keys.create", "k-1"),
        audit(minutes(1), "p-alice", "keys.revoke", "k-1", request_id="req-1"),
        audit(
            minutes(2),
            "-",
            "authn.failure",
            outcome="key_unknown",
            details={"reason": "key_unknown", "key_id": "abc123", "source": "10.0.0.1"},
        ),
        audit(minutes(3), "cli", "keysX.other", "k-1"),
        audit(minutes(4), "p-bob", "Keys.create", "github"),
        audit(minutes(5), "cli", "keys%odd", "github", outcome="denied"),
    ]


async def test_audit_round_trip_assigns_increasing_ids(store: Store, events: list) -> None:
    await store.append_audit(events[:2])
    await store.append_audit(events[2:])
    await store.append_audit([])
    found = await store.query_audit()
    ids = [e.id for e in found]
    assert all(isinstance(i, int) for i in ids) and ids == sorted(set(ids))  # type: ignore[type-var]
    assert [dataclasses.replace(e, id=None) for e in found] == events
    assert found[2].details == {"reason": "key_unknown", "key_id": "abc123", "source": "10.0.0.1"}
    assert await store.changes_since(0) == []


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"actor": "cli"}, [0, 3, 5]),
        ({"action": "keys.revoke"}, [1]),
        ({"action": "keys.*"}, [0, 1]),  # a prefix: not keysX.*, not Keys.*, not keys%
        ({"action": "keys*"}, [0, 1, 3, 5]),
        ({"action": "keys%*"}, [5]),
        ({"action": "*"}, [0, 1, 2, 3, 4, 5]),
        ({"action": "keys"}, []),
        ({"target": "k-1"}, [0, 1, 3]),
        ({"since": minutes(1)}, [1, 2, 3, 4, 5]),  # since is inclusive
        ({"until": minutes(2)}, [0, 1]),  # until is exclusive
        ({"since": minutes(1), "until": minutes(4)}, [1, 2, 3]),
        ({"limit": 2}, [0, 1]),  # the oldest first
        ({"actor": "cli", "action": "keys*", "target": "github"}, [5]),
        ({"actor": "cli", "since": minutes(3), "limit": 1}, [3]),
        ({"actor": "nobody"}, []),
        ({"limit": 0}, []),
    ],
)
async def test_query_audit_filters(store: Store, events: list, filters: dict, expected: list[int]) -> None:
    await store.append_audit(events)
    found = await store.query_audit(**filters)
    assert [dataclasses.replace(e, id=None) for e in found] == [events[i] for i in expected]


async def test_query_audit_resumes_after_an_id(store: Store, events: list) -> None:
    await store.append_audit(events)
    ids = [e.id for e in await store.query_audit()]
    assert [e.id for e in await store.query_audit(after_id=ids[1])] == ids[2:]
    assert [e.id for e in await store.query_audit(after_id=ids[1], limit=2)] == ids[2:4]
    assert [e.id for e in await store.query_audit(after_id=ids[0], actor="cli")] == [ids[3], ids[5]]
    assert await store.query_audit(after_id=ids[-1]) == []
    assert [e.id for e in await store.query_audit(after_id=0)] == ids


async def test_prune_audit_deletes_older_events(store: Store, events: list) -> None:
    await store.append_audit(events)
    before_prune = await store.query_audit()
    assert await store.prune_audit(minutes(2)) == 2
    assert await store.prune_audit(minutes(2)) == 0
    remaining = await store.query_audit()
    assert [e.id for e in remaining] == [e.id for e in before_prune[2:]]
    await store.append_audit([audit(minutes(9), "cli", "servers.add")])
    newest = (await store.query_audit())[-1]
    assert newest.id is not None and newest.id > max(e.id for e in before_prune)  # type: ignore[type-var]
    assert await store.prune_audit(minutes(100)) == 5
    assert await store.query_audit() == []
    assert await store.changes_since(0) == []


# --- usage records ------------------------------------------------------------------------------------------


async def test_usage_round_trip_keeps_every_field(store: Store) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    sent = [
        usage(
            datetime(2025, 3, 1, 17, 30, 0, 654321, tzinfo=india),
            request_id="3f0c-req",
            key_id="AbC1234",
            tool="repo/search.v2",
            mcp_method="tools/call",
            upstream_status=502,
            request_bytes=2**40 + 3,
            response_bytes=0,
            duration_ms=1234.567891,
        ),
        usage(
            minutes(1),
            principal_id="",
            server_name="",
            request_id="",
            key_id="",
            tool="",
            mcp_method="",
            decision="deny",
            reason="key_unknown",
            upstream_status=0,
            request_bytes=0,
            response_bytes=0,
            duration_ms=0,
        ),
    ]
    await store.append_usage(sent)
    await store.append_usage([])
    got = await store.query_usage()
    assert [dataclasses.replace(r, id=None) for r in got] == sent
    first, second = got
    assert isinstance(first.id, int) and isinstance(second.id, int) and first.id < second.id
    assert first.at == datetime(2025, 3, 1, 12, 0, 0, 654321, tzinfo=UTC)
    assert first.at.utcoffset() == timedelta(0) and first.at.microsecond == 654321
    assert (first.request_id, first.key_id, first.tool, first.mcp_method) == (
        "3f0c-req",
        "AbC1234",
        "repo/search.v2",
        "tools/call",
    )
    assert (first.upstream_status, first.request_bytes, first.response_bytes) == (502, 2**40 + 3, 0)
    assert type(first.duration_ms) is float and first.duration_ms == 1234.567891
    assert type(second.duration_ms) is float and second.duration_ms == 0.0
    assert (second.principal_id, second.decision, second.reason) == ("", "deny", "key_unknown")
    assert await store.changes_since(0) == []


@pytest.fixture
def usage_records() -> list:
    return [
        usage(T0, "p-alice", "github", tool="search"),
        usage(minutes(1), "p-bob", "github", tool="search"),
        usage(minutes(2), "p-alice", "slack", tool="post"),
        usage(
            minutes(3), "", "github", tool="", mcp_method="", decision="deny", reason="key_unknown", upstream_status=401
        ),
        usage(minutes(4), "p-alice", "github", tool="create_issue"),
        usage(minutes(5), "p-bob", "slack", tool="post"),
    ]


# One store per backend for the whole table: a fresh PostgreSQL schema per case costs more than the queries.
USAGE_FILTERS: list[tuple[dict, list[int]]] = [
    ({}, [0, 1, 2, 3, 4, 5]),
    ({"principal_id": "p-alice"}, [0, 2, 4]),
    ({"principal_id": ""}, [3]),
    ({"server": "github"}, [0, 1, 3, 4]),
    ({"tool": "post"}, [2, 5]),
    ({"tool": ""}, [3]),
    ({"since": minutes(1)}, [1, 2, 3, 4, 5]),  # since is inclusive
    ({"until": minutes(2)}, [0, 1]),  # until is exclusive
    ({"since": minutes(1), "until": minutes(4)}, [1, 2, 3]),
    ({"principal_id": "p-alice", "server": "github"}, [0, 4]),
    ({"principal_id": "p-alice", "server": "github", "since": minutes(1)}, [4]),
    ({"server": "slack", "tool": "post", "until": minutes(5)}, [2]),
    ({"principal_id": "p-bob", "tool": "search", "since": T0, "until": minutes(9)}, [1]),
    ({"limit": 2}, [0, 1]),  # the oldest first
    ({"server": "github", "since": minutes(1), "limit": 2}, [1, 3]),
    ({"principal_id": "p-nobody"}, []),
    ({"since": minutes(2), "until": minutes(2)}, []),
    ({"limit": 0}, []),
]


async def test_query_usage_filters(store: Store, usage_records: list) -> None:
    # Written out of time order, as replicas flush: results still come oldest first.
    for i in (3, 0, 5):
        await store.append_usage([usage_records[i]])
    await store.append_usage([usage_records[i] for i in (1, 4, 2)])
    for filters, expected in USAGE_FILTERS:
        found = await store.query_usage(**filters)
        assert [dataclasses.replace(r, id=None) for r in found] == [usage_records[i] for i in expected], filters


async def test_query_usage_orders_by_time_then_id(store: Store) -> None:
    late, early = usage(minutes(5), request_id="late"), usage(T0, request_id="early")
    tie_a, tie_b = usage(minutes(1), request_id="tie-a"), usage(minutes(1), request_id="tie-b")
    await store.append_usage([late, tie_a])
    await store.append_usage([early, tie_b])
    found = await store.query_usage()
    assert [r.request_id for r in found] == ["early", "tie-a", "tie-b", "late"]
    by_id = sorted(found, key=lambda r: r.id)  # type: ignore[arg-type, return-value]
    assert [r.request_id for r in by_id] == ["late", "tie-a", "early", "tie-b"]


async def test_records_written_again_are_stored_once(store: Store, usage_records: list, events: list) -> None:
    """A write-behind batch retried after its commit reply was lost, or replayed from the spool,
    carries the same uids: the store adds nothing it has already."""
    await store.append_usage(usage_records[:2])
    await store.append_usage(usage_records)  # the first two again, and the rest
    await store.append_audit(events[:1])
    await store.append_audit(events)
    await store.append_audit(events[1:2])
    stored = await store.query_usage()
    assert [r.uid for r in stored] == [r.uid for r in usage_records]  # each once, and the uid round-trips
    assert [e.uid for e in await store.query_audit()] == [e.uid for e in events]
    fresh = [dataclasses.replace(r, uid=new_uid()) for r in usage_records[:1]]
    await store.append_usage(fresh)  # the same values, another record: stored
    assert len(await store.query_usage()) == len(usage_records) + 1


async def test_append_usage_refuses_a_bad_batch_whole(store: Store) -> None:
    good = usage(T0)
    naive = usage(datetime(2025, 3, 1, 12, 0, 0))
    with pytest.raises(InvalidInput, match="timezone-aware"):
        await store.append_usage([good, naive])
    for bad, field_name in [
        (usage(T0, decision="maybe"), "decision"),
        (usage(T0, upstream_status=-1), "upstream_status"),
        (usage(T0, request_bytes=-5), "request_bytes"),
        (usage(T0, duration_ms=float("nan")), "duration_ms"),
        (usage(T0, tool=None), "tool"),
    ]:
        with pytest.raises(InvalidInput, match=field_name) as caught:
            await store.append_usage([good, bad])
        assert "2 of 2" in str(caught.value)
    assert await store.query_usage() == []


async def test_append_usage_takes_a_large_batch(store: Store) -> None:
    batch = [usage(T0 + timedelta(milliseconds=i), request_id=f"r{i}", duration_ms=i / 8) for i in range(1500)]
    await store.append_usage(batch)
    found = await store.query_usage(limit=10_000)
    assert [r.request_id for r in found] == [f"r{i}" for i in range(1500)]
    assert found[777].duration_ms == 777 / 8
    assert [r.request_id for r in await store.query_usage(since=batch[1000].at, limit=3)] == ["r1000", "r1001", "r1002"]


async def test_prune_usage_deletes_older_records(store: Store, usage_records: list) -> None:
    await store.append_usage(usage_records)
    before_prune = await store.query_usage()
    assert await store.prune_usage(minutes(2)) == 2  # strictly older than `before`
    assert await store.prune_usage(minutes(2)) == 0
    remaining = await store.query_usage()
    assert [r.id for r in remaining] == [r.id for r in before_prune[2:]]
    assert remaining[0].at == minutes(2)
    await store.append_usage([usage(minutes(9))])
    newest = (await store.query_usage())[-1]
    assert newest.id is not None and newest.id > max(r.id for r in before_prune)  # type: ignore[type-var]
    assert await store.prune_usage(minutes(100)) == 5
    assert await store.query_usage() == []
    assert await store.changes_since(0) == []


async def test_usage_writes_never_reach_the_change_log(store: Store) -> None:
    await seed(store)
    since = await last_seq(store)
    await store.append_usage([usage(T0), usage(minutes(1), "p-bob")])
    await store.query_usage(principal_id="p-bob")
    await store.prune_usage(minutes(1))
    assert await store.changes_since(since) == []
    assert (await store.snapshot()).seq == since


# --- migrating a store created at schema version 1 ---------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def persistent_url(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[str]:
    """A store URL whose schema outlives one store object (memory:// has nothing to migrate)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/v1.db"
    else:
        base = request.getfixturevalue("pg_base_url")
        schema = f"t_{uuid.uuid4().hex[:20]}"
        yield f"{base}?schema={schema}"
        await drop_schema(base, schema)


class _RowWith:
    """A row plus defaults for columns it lacks: how a newer codec reads an older schema's row."""

    def __init__(self, row: object, **defaults: object) -> None:
        self._row, self._defaults = row, defaults

    def __getitem__(self, key: str) -> object:
        return self._defaults[key] if key in self._defaults else self._row[key]  # type: ignore[index]


def _as_version_1(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the SQL stores apply only 0001 and read and write servers and audit events without the later columns."""
    every, encode, decode = sql.load_migrations, codec.RowCodec.encode_server, codec.RowCodec.decode_server
    encode_audit, decode_audit = codec.RowCodec.encode_audit, codec.RowCodec.decode_audit
    later = ("upstream_url",)  # server columns added after version 1, each last in SERVER_COLUMNS
    monkeypatch.setattr(sql, "load_migrations", lambda dialect: every(dialect)[:1])
    monkeypatch.setattr(sql, "SERVER_COLUMNS", codec.SERVER_COLUMNS[: -len(later)])
    monkeypatch.setattr(codec.RowCodec, "encode_server", lambda self, s: encode(self, s)[: -len(later)])
    monkeypatch.setattr(codec.RowCodec, "decode_server", lambda self, row: decode(self, _RowWith(row, upstream_url="")))
    monkeypatch.setattr(sql, "AUDIT_COLUMNS", codec.AUDIT_COLUMNS[:-1])  # uid (version 4) is last
    monkeypatch.setattr(codec.RowCodec, "encode_audit", lambda self, e: encode_audit(self, e)[:-1])
    monkeypatch.setattr(codec.RowCodec, "decode_audit", lambda self, row: decode_audit(self, _RowWith(row, uid=None)))


async def test_a_version_1_store_migrates_to_the_newest_and_keeps_its_data(
    persistent_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    every = sql.load_migrations
    with monkeypatch.context() as old_code:
        _as_version_1(old_code)
        old = await open_store(persistent_url)  # only 0001 applied
        try:
            assert await old.schema_version() == 1
            await seed(old)
            await old.add_key(key("k-1", "p-alice", scope=("github",)))
            await old.put_override(override("p-alice", "github"))
            await old.put_key_checks({1: sealed("check")})
            await old.append_audit([audit(T0, "cli", "keys.create", "k-1")])
            with pytest.raises(StoreError):
                await old.query_usage()
            snap, changes, events = await old.snapshot(), await old.changes_since(0), await old.query_audit()
        finally:
            await old.close()

    newest = len(every("sqlite"))
    assert newest == len(every("postgres")) == MemoryStore.SCHEMA_VERSION == 4
    new = await open_store(persistent_url)  # open_store migrates: 0002 to 0004
    try:
        assert await new.schema_version() == newest
        assert await new.snapshot() == snap
        assert all(s.upstream_url == "" for s in snap.servers)  # the new column's default
        assert await new.changes_since(0) == changes
        assert await new.query_audit() == events
        assert await new.get_key_checks() == {1: sealed("check")}
        await new.append_usage([usage(T0)])
        github = await new.get_server("github")
        assert github is not None
        await new.update_server(dataclasses.replace(github, upstream_url="http://127.0.0.1:9/mcp"))
        await new.migrate()  # idempotent: nothing re-applied, nothing lost
        assert await new.schema_version() == newest
        assert [dataclasses.replace(r, id=None) for r in await new.query_usage()] == [usage(T0)]
        assert (await new.get_server("github")).upstream_url == "http://127.0.0.1:9/mcp"  # type: ignore[union-attr]
    finally:
        await new.close()
