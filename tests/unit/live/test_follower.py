"""live/follower.py, the change-log follower, against a real (in-memory) store: live changes reach the state."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest

from authz_server.admin.service import Actor, AdminService
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import KeyHasher, parse
from authz_server.models import AuthMode, Role
from authz_server.live.follower import StateFollower
from authz_server.live.tables import AuthState
from authz_server.live.verified import VerifiedKeys
from authz_server.store.memory import MemoryStore

from ..fakes import FAST


async def _world() -> tuple[MemoryStore, AdminService, StateFollower, VerifiedKeys]:
    keyring = Keyring.from_spec(Keyring.generate_spec())
    store = MemoryStore()
    await store.migrate()
    admin = AdminService(store, keyring, KeyHasher(FAST))
    await admin.initialize(Actor.operator())
    state = AuthState()
    verified = VerifiedKeys(state)
    follower = StateFollower(store, keyring, state, verified, poll_interval=0.05)
    await follower.load()
    return store, admin, follower, verified


async def test_changes_apply_and_verified_keys_are_evicted_when_revoked() -> None:
    _, admin, follower, verified = await _world()
    op = Actor.operator()
    await admin.add_server(op, "gh", AuthMode.INDIVIDUAL, headers=("Authorization: Bearer {{API_KEY}}",))
    await admin.add_principal(op, "alice", "eng", (Role.USER,))
    view, key = await admin.create_key(op, "alice")
    await admin.set_override(op, "alice", "gh", {"API_KEY": "tok-1"})
    assert await follower.poll_once() > 0
    st = follower.state
    principal_id = st.keys[view.key_id].principal_id
    assert st.overrides[(principal_id, "gh")].values["API_KEY"].reveal() == "tok-1"
    assert st.servers["gh"].mode is AuthMode.INDIVIDUAL and st.servers["gh"].signing_secret

    digest = parse(key.reveal()).digest
    assert verified.record(st.keys[view.key_id], digest)  # as after a first use
    await admin.set_principal_disabled(op, "alice", True)
    await follower.poll_once()
    assert st.principals[principal_id].disabled
    assert verified.get(view.key_id) == digest  # unrelated change: still verified
    await admin.revoke_key(op, view.key_id)
    await follower.poll_once()
    assert verified.get(view.key_id) is None and st.keys[view.key_id].revoked_at is not None
    assert verified.evictions == 1

    await admin.delete_override(op, "alice", "gh")
    await admin.remove_server(op, "gh")
    await follower.poll_once()
    assert (principal_id, "gh") not in st.overrides and "gh" not in st.servers
    assert follower.seen_seq == st.seq


async def test_a_reload_forgets_verified_keys_and_removal_evicts_them() -> None:
    store, admin, follower, verified = await _world()
    op = Actor.operator()
    await admin.add_principal(op, "carol", "eng", (Role.USER,))
    view, key = await admin.create_key(op, "carol")
    await follower.poll_once()
    assert verified.record(follower.state.keys[view.key_id], parse(key.reveal()).digest)
    await follower.load()  # a fresh snapshot: nothing counts as verified, and nothing counts as evicted
    assert view.key_id not in verified and verified.evictions == 0
    assert verified.record(follower.state.keys[view.key_id], parse(key.reveal()).digest)
    await admin.revoke_key(op, view.key_id)

    async def gone(key_id: str) -> None:
        return None

    store.get_key = gone  # type: ignore[method-assign]  # the row is gone by the time the follower reads it
    await follower.poll_once()
    assert view.key_id not in follower.state.keys and view.key_id not in verified and verified.evictions == 1


async def test_grace_period_keeps_the_key_usable_until_its_time() -> None:
    _, admin, follower, _ = await _world()
    op = Actor.operator()
    await admin.add_principal(op, "bob", "eng", (Role.USER,))
    view, _ = await admin.create_key(op, "bob")
    await admin.regenerate_key(op, view.key_id, grace_seconds=60)
    await follower.poll_once()
    revoked_at = follower.state.keys[view.key_id].revoked_at
    now = datetime.now(UTC)
    assert revoked_at is not None and now.timestamp() < revoked_at <= (now + timedelta(seconds=61)).timestamp()


def _tables(follower: StateFollower) -> tuple[object, ...]:
    st = follower.state
    return st.seq, st.teams, st.principals, st.servers, st.keys, st.overrides


async def test_a_follower_behind_the_trimmed_log_reloads_once_and_matches_a_fresh_load(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, admin, follower, _ = await _world()
    op = Actor.operator()
    await admin.add_server(op, "gh", AuthMode.INDIVIDUAL, headers=("Authorization: Bearer {{API_KEY}}",))
    await admin.add_principal(op, "alice", "eng", (Role.USER,))
    await admin.add_principal(op, "bob", "eng", (Role.USER,))
    view, _ = await admin.create_key(op, "bob")
    await admin.set_override(op, "bob", "gh", {"API_KEY": "tok-bob"})
    await follower.poll_once()
    assert view.key_id in follower.state.keys
    # The follower stops reading while changes happen, deletions among them, and the log is trimmed
    # past its point: the rows that said bob and his key are gone would never reach it.
    await admin.delete_principal(op, "bob")
    await admin.update_principal(op, "alice", roles=["manager"], rate_limit_per_minute=5)
    await admin.update_server(op, "gh", headers=["Authorization: Bearer {{API_KEY}}", "X-Org: {{ORG}}"])
    for i in range(5):
        await admin.add_principal(op, f"u{i}", "eng", (Role.USER,))
    assert await store.trim_changes(keep=2) > 0
    assert follower.state.seq < await store.oldest_change_seq() - 1

    with caplog.at_level(logging.INFO, logger="authz_server.live.follower"):
        await follower.poll_once()
        await follower.poll_once()
    reloads = [r for r in caplog.records if "trimmed past" in r.getMessage()]
    assert len(reloads) == 1 and reloads[0].levelno == logging.WARNING

    fresh_state = AuthState()
    fresh = StateFollower(store, follower._keyring, fresh_state, VerifiedKeys(fresh_state), 0.05)
    await fresh.load()
    assert _tables(follower) == _tables(fresh)
    assert view.key_id not in follower.state.keys
    alice = next(p for p in follower.state.principals.values() if p.name == "alice")
    assert (alice.roles, alice.rate_limit_per_minute) == ((Role.MANAGER,), 5)


async def test_a_gap_in_the_log_alone_is_no_reason_to_reload(caplog: pytest.LogCaptureFixture) -> None:
    store, admin, follower, _ = await _world()
    store._seq += 5  # a seq drawn and rolled back (PostgreSQL sequences do that): a gap, nothing trimmed
    await admin.add_principal(Actor.operator(), "dave", "eng", (Role.USER,))
    with caplog.at_level(logging.INFO, logger="authz_server.live.follower"):
        assert await follower.poll_once() == 2  # the team and dave
    assert not [r for r in caplog.records if "trimmed past" in r.getMessage()]
    assert any(p.name == "dave" for p in follower.state.principals.values())
