"""The change-log follower against a real (in-memory) store: live changes reach the state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from authz_server.admin.service import Actor, AdminService
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import KeyHasher, parse
from authz_server.models import AuthMode, Role
from authz_server.state import AuthState, StateFollower
from authz_server.store.memory import MemoryStore

from .world import FAST


async def _world() -> tuple[MemoryStore, AdminService, StateFollower]:
    keyring = Keyring.from_spec(Keyring.generate_spec())
    store = MemoryStore()
    await store.migrate()
    admin = AdminService(store, keyring, KeyHasher(FAST))
    await admin.initialize(Actor.operator())
    follower = StateFollower(store, keyring, AuthState(), poll_interval=0.05)
    await follower.load()
    return store, admin, follower


async def test_changes_apply_and_verified_keys_are_evicted_when_revoked() -> None:
    _, admin, follower = await _world()
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

    st.keys[view.key_id].verified_digest = parse(key.reveal()).digest  # as after a first use
    await admin.set_principal_disabled(op, "alice", True)
    await follower.poll_once()
    assert st.principals[principal_id].disabled
    assert st.keys[view.key_id].verified_digest is not None  # unrelated change: still verified
    await admin.revoke_key(op, view.key_id)
    await follower.poll_once()
    assert st.keys[view.key_id].verified_digest is None and st.keys[view.key_id].revoked_at is not None
    assert follower.evictions == 1

    await admin.delete_override(op, "alice", "gh")
    await admin.remove_server(op, "gh")
    await follower.poll_once()
    assert (principal_id, "gh") not in st.overrides and "gh" not in st.servers
    assert follower.seen_seq == st.seq


async def test_grace_period_keeps_the_key_usable_until_its_time() -> None:
    _, admin, follower = await _world()
    op = Actor.operator()
    await admin.add_principal(op, "bob", "eng", (Role.USER,))
    view, _ = await admin.create_key(op, "bob")
    await admin.regenerate_key(op, view.key_id, grace_seconds=60)
    await follower.poll_once()
    revoked_at = follower.state.keys[view.key_id].revoked_at
    now = datetime.now(UTC)
    assert revoked_at is not None and now.timestamp() < revoked_at <= (now + timedelta(seconds=61)).timestamp()
