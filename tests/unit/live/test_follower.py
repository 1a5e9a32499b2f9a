"""live/follower.py, the change-log follower, against a real (in-memory) store: live changes reach the state."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from authz_server.admin.service import Actor, AdminService
from authz_server.crypto.cipher import (
    ENV_KEY_FILE, Keyring, load_keyring, read_key_file, replace_key_file, spec_with_new_version, write_key_file,
)  # fmt: skip
from authz_server.crypto.keys import KeyHasher, parse
from authz_server.errors import StoreError
from authz_server.models import AuthMode, Role, Sealed
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


# --- the master keyring follows its file -----------------------------------------------------------------


async def _keyed_world(tmp_path: Path) -> tuple[MemoryStore, Path, AdminService, StateFollower]:
    """A follower whose keyring came from a key file (version 1), and github with alice's override."""
    path = tmp_path / "master.key"
    write_key_file(path, Keyring.generate_spec())
    store = MemoryStore()
    await store.migrate()
    admin = AdminService(store, load_keyring({ENV_KEY_FILE: str(path)}), KeyHasher(FAST))
    await admin.initialize(Actor.operator())
    op = Actor.operator()
    await admin.add_server(op, "gh", AuthMode.INDIVIDUAL, headers=("Authorization: Bearer {{API_KEY}}",))
    await admin.add_principal(op, "alice", "eng", (Role.USER,))
    await admin.set_override(op, "alice", "gh", {"API_KEY": "tok-1"})
    state = AuthState()
    follower = StateFollower(store, load_keyring({ENV_KEY_FILE: str(path)}), state, VerifiedKeys(state), 0.01)
    await follower.load()
    return store, path, admin, follower


async def _add_version(store: MemoryStore, path: Path) -> AdminService:
    """What `mcp-authz master-key add` does: a new version in the file, its check value in the store."""
    replace_key_file(path, spec_with_new_version(read_key_file(path))[0])
    cli = AdminService(store, load_keyring({ENV_KEY_FILE: str(path)}), KeyHasher(FAST))
    await store.put_key_checks(cli._keyring.check_values())
    return cli


async def test_a_row_under_an_unknown_version_makes_the_follower_reread_the_key_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, path, _, follower = await _keyed_world(tmp_path)
    cli = await _add_version(store, path)  # the file changed, but the follower has not looked yet
    await cli.set_override(Actor.operator(), "alice", "gh", {"API_KEY": "tok-2"})  # sealed under version 2
    caplog.set_level(logging.INFO, logger="authz_server.live.follower")
    await follower.poll_once()
    (entry,) = follower.state.overrides.values()
    assert not entry.corrupt and entry.values["API_KEY"].reveal() == "tok-2"
    reloads = [r for r in caplog.records if r.getMessage() == "master keyring reloaded"]
    assert len(reloads) == 1 and reloads[0].versions == [1, 2] and reloads[0].active_version == 2  # type: ignore[attr-defined]
    assert read_key_file(path).split(",")[0].split(":")[1] not in caplog.text  # versions only, never keys


async def _until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {what} within 2 s")


async def test_a_changed_key_file_or_sighup_is_picked_up_on_the_next_tick(tmp_path: Path) -> None:
    store, path, _, follower = await _keyed_world(tmp_path)
    running = asyncio.create_task(follower.run())
    try:
        await _add_version(store, path)
        await _until(lambda: follower._keyring.active == 2, "reloaded after the file changed")
        follower._keyring.adopt(Keyring.from_spec(Keyring.generate_spec(9)))  # drift that only a re-read repairs
        follower.request_keyring_reload()
        await _until(lambda: follower._keyring.versions == (1, 2), "reloaded on request (SIGHUP)")
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running


async def test_a_key_file_that_does_not_match_the_store_is_refused_and_the_keyring_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, path, _, follower = await _keyed_world(tmp_path)
    before = follower._keyring.versions
    replace_key_file(path, Keyring.generate_spec())  # a different version 1: the wrong file
    assert not await follower.reload_keyring("test")
    assert follower._keyring.versions == before
    (refusal,) = [r for r in caplog.records if r.getMessage().startswith("master key file not reloaded")]
    assert "does not match this store" in refusal.error  # type: ignore[attr-defined]
    (entry,) = follower.state.overrides.values()
    assert entry.values["API_KEY"].reveal() == "tok-1"


async def test_a_keyring_from_the_environment_cannot_be_reloaded_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    store, admin, follower, _ = await _world()
    newer = Keyring.from_spec(spec_with_new_version(Keyring.generate_spec())[0])  # not this store's: fine for the row
    await store.put_key_checks(newer.check_values())
    op = Actor.operator()
    await admin.add_server(op, "gh", AuthMode.INDIVIDUAL, headers=("Authorization: Bearer {{API_KEY}}",))
    await admin.add_principal(op, "alice", "eng", (Role.USER,))
    await AdminService(store, newer, KeyHasher(FAST)).set_override(op, "alice", "gh", {"API_KEY": "tok"})
    await follower.poll_once()
    (entry,) = follower.state.overrides.values()
    assert entry.corrupt  # as before: Check answers 503 rather than inject less
    assert "it comes from the environment, not a file" in caplog.text


class FlakyChecks(MemoryStore):
    """get_key_checks fails while `down`, as a store outage would."""

    down = False

    async def get_key_checks(self) -> dict[int, Sealed]:
        if self.down:
            raise StoreError("The store failed.")
        return await super().get_key_checks()


async def test_a_reload_the_store_could_not_check_is_tried_again(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    write_key_file(path, Keyring.generate_spec())
    store = FlakyChecks()
    await store.migrate()
    await AdminService(store, load_keyring({ENV_KEY_FILE: str(path)}), KeyHasher(FAST)).initialize(Actor.operator())
    state = AuthState()
    follower = StateFollower(store, load_keyring({ENV_KEY_FILE: str(path)}), state, VerifiedKeys(state), 0.01)
    await follower.load()
    replace_key_file(path, spec_with_new_version(read_key_file(path))[0])
    store.down = True
    with pytest.raises(StoreError):
        await follower._watch_keyring()
    store.down = False
    await follower._watch_keyring()
    assert follower._keyring.versions == (1, 2)
