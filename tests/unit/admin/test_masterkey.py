"""admin/masterkey.py: rows per key version, re-encryption (idempotent, resumable, online), retiring a version."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from authz_server.admin.masterkey import MasterKeyAdmin
from authz_server.admin.service import Actor, AdminService
from authz_server.crypto.cipher import Keyring, aad_override, aad_shared, aad_signing, spec_with_new_version
from authz_server.crypto.keys import KeyHasher
from authz_server.errors import Conflict, InvalidInput, MasterKeyError, NotFound, StoreError
from authz_server.models import AuthMode, Entity, Role, Sealed, SealedRow
from authz_server.store.memory import MemoryStore

from ..fakes import FAST

OP = Actor.operator()
VALUES = {"github": "ghp_alice_0001", "linear": "lin_shared_0002"}


@dataclass
class World:
    store: MemoryStore
    old: Keyring  # version 1 alone, as a sidecar that has not re-read the file holds it
    svc: AdminService  # the use cases with the old keyring
    keys: MasterKeyAdmin  # with versions 2 (active) and 1
    ids: dict[str, str]


async def _world(store: MemoryStore | None = None) -> World:
    store = store or MemoryStore()
    await store.migrate()
    spec = Keyring.generate_spec()
    old = Keyring.from_spec(spec)
    svc = AdminService(store, old, KeyHasher(FAST))
    await svc.initialize(OP)
    for name, mode in (("github", AuthMode.INDIVIDUAL), ("linear", AuthMode.SHARED), ("open", AuthMode.NONE)):
        headers = () if mode is AuthMode.NONE else ("Authorization: Bearer {{API_KEY}}",)
        await svc.add_server(OP, name, mode, headers=headers)
    await svc.set_shared(OP, "linear", {"API_KEY": VALUES["linear"]})
    ids = {}
    for name in ("alice", "bob", "carol"):
        ids[name] = (await svc.add_principal(OP, name, "eng", (Role.USER,))).id
        await svc.set_override(OP, name, "github", {"API_KEY": f"{VALUES['github']}-{name}"})
    keys = MasterKeyAdmin(store, Keyring.from_spec(spec_with_new_version(spec)[0]), KeyHasher(FAST))
    await keys.record_versions(OP, 2)
    return World(store, old, svc, keys, ids)


def _usage(status: object) -> list[tuple[int, int, int]]:
    return [(v.version, v.servers, v.overrides) for v in status.versions]  # type: ignore[attr-defined]


async def _opens_everything(w: World, ring: Keyring) -> None:
    """Every stored value opens with `ring` and is what was set."""
    linear = await w.store.get_server("linear")
    assert linear is not None and ring.open(linear.shared_values["API_KEY"], aad_shared("linear", "API_KEY")).reveal() == VALUES["linear"]
    for server in await w.store.list_servers():
        assert server.signing_secret is not None
        ring.open(server.signing_secret, aad_signing(server.name))
    for name, pid in w.ids.items():
        override = await w.store.get_override(pid, "github")
        assert override is not None
        got = ring.open(override.values["API_KEY"], aad_override("github", pid, "API_KEY")).reveal()
        assert got == f"{VALUES['github']}-{name}"


async def test_status_counts_rows_per_version_and_rotate_moves_them_all() -> None:
    w = await _world()
    before = await w.keys.status(OP)
    assert before.active == 2 and _usage(before) == [(2, 0, 0), (1, 3, 3)] and before.old_rows == 6
    assert [(v.in_keyring, v.in_store) for v in before.versions] == [(True, True), (True, True)]

    report = await w.keys.rotate(OP, batch=2)

    assert report.resealed == {Entity.SERVER: 3, Entity.OVERRIDE: 3} and report.batches == 4
    assert report.current == 0 and report.unreadable == [] and report.changed_meanwhile == 0
    after = await w.keys.status(OP)
    assert _usage(after) == [(2, 3, 3), (1, 0, 0)] and after.old_rows == 0
    await _opens_everything(w, w.keys.keyring)
    with pytest.raises(MasterKeyError, match="version 2"):
        await _opens_everything(w, w.old)  # really re-encrypted: the old key alone opens nothing


async def test_rotate_is_idempotent_and_logs_each_row_once() -> None:
    w = await _world()
    seq = (await w.store.changes_since(0, 10_000))[-1].seq
    await w.keys.rotate(OP)
    changed = await w.store.changes_since(seq)
    assert sorted((c.entity, c.entity_key) for c in changed) == sorted(
        [(Entity.SERVER, s) for s in ("github", "linear", "open")]
        + [(Entity.OVERRIDE, f"{pid}/github") for pid in w.ids.values()]
    )
    again = await w.keys.rotate(OP)
    assert again.total == 0 and again.current == 6 and again.batches == 0
    assert await w.store.changes_since(changed[-1].seq) == []


class FailingStore(MemoryStore):
    """Fails the `fail_at`-th reseal batch, as a store outage mid-rotation would."""

    fail_at = 2
    calls = 0

    async def reseal(self, rows: Sequence[tuple[SealedRow, SealedRow]]) -> int:
        self.calls += 1
        if self.calls == self.fail_at:
            raise StoreError("The store failed.")
        return await super().reseal(rows)


async def test_an_interrupted_rotation_resumes_where_it_stopped() -> None:
    store = FailingStore()
    w = await _world(store)
    with pytest.raises(StoreError):
        await w.keys.rotate(OP, batch=2)
    halfway = await w.keys.status(OP)
    assert halfway.old_rows == 4  # the first batch (two servers) is done, and stays done

    report = await w.keys.rotate(OP, batch=2)
    assert report.total == 4 and report.current == 2
    assert (await w.keys.status(OP)).old_rows == 0
    await _opens_everything(w, w.keys.keyring)
    outcomes = [(e.action, e.outcome) for e in await store.query_audit(action="master_key.*")]
    assert outcomes == [("master_key.add", "ok"), ("master_key.rotate", "error"), ("master_key.rotate", "ok")]


class RacingStore(MemoryStore):
    """Before the first override batch is resealed, a writer that still has the old keyring sets carol's value."""

    writer: AdminService | None = None

    async def reseal(self, rows: Sequence[tuple[SealedRow, SealedRow]]) -> int:
        if self.writer is not None and rows[0][0].entity is Entity.OVERRIDE:
            writer, self.writer = self.writer, None
            await writer.set_override(OP, "carol", "github", {"API_KEY": f"{VALUES['github']}-carol"})
        return await super().reseal(rows)


async def test_a_row_written_meanwhile_is_left_to_its_writer_then_resealed_on_the_next_pass() -> None:
    store = RacingStore()
    w = await _world(store)
    store.writer = w.svc
    report = await w.keys.rotate(OP)
    # carol's row changed under the first pass (sealed again under version 1 by the stale writer);
    # the second pass moved it too.
    assert report.resealed == {Entity.SERVER: 3, Entity.OVERRIDE: 3} and report.changed_meanwhile == 0
    assert (await w.keys.status(OP)).old_rows == 0
    await _opens_everything(w, w.keys.keyring)


async def test_an_unreadable_row_is_named_and_the_rest_is_resealed() -> None:
    w = await _world()
    bob = await w.store.get_override(w.ids["bob"], "github")
    assert bob is not None
    await w.store.put_override(dataclasses.replace(bob, values={"API_KEY": Sealed(1, b"\0" * 12, b"tampered-bytes-00")}))
    report = await w.keys.rotate(OP)
    assert report.total == 5
    assert report.unreadable == [f"override:{w.ids['bob']}/github: A stored credential does not decrypt for its row "
                                 "(tampered, or moved between rows)."]  # fmt: skip
    assert (await w.keys.status(OP)).rows_under(1) == 1
    with pytest.raises(Conflict, match="1 row is still sealed under master key version 1"):
        await w.keys.retire(OP, 1)


async def test_retire_is_refused_while_rows_use_the_version_or_while_it_seals() -> None:
    w = await _world()
    with pytest.raises(Conflict, match="6 rows are still sealed under master key version 1: run 'mcp-authz master-key rotate'"):
        await w.keys.retire(OP, 1)
    with pytest.raises(Conflict, match="active one"):
        await w.keys.retire(OP, 2)
    with pytest.raises(NotFound, match="no master key version 5"):
        await w.keys.retire(OP, 5)
    assert set(await w.store.get_key_checks()) == {1, 2}

    await w.keys.rotate(OP)
    await w.keys.retire(OP, 1)
    assert set(await w.store.get_key_checks()) == {2}
    # A stale key file holding version 1 alone no longer opens this store: it cannot seal under a retired version.
    with pytest.raises(MasterKeyError, match="None of the master key versions"):
        await w.svc.verify_master_key()
    await w.keys.retire(OP, 1)  # run again (the file still has it, say): completes, harmlessly
    actions = [(e.action, e.outcome, e.details.get("version")) for e in await w.store.query_audit(action="master_key.*")]
    assert actions[-3:] == [("master_key.rotate", "ok", None), ("master_key.retire", "ok", "1"), ("master_key.retire", "ok", "1")]


async def test_rotate_refuses_a_silly_batch_and_nothing_audited_holds_key_material() -> None:
    w = await _world()
    with pytest.raises(InvalidInput, match="batch"):
        await w.keys.rotate(OP, batch=0)
    await w.keys.rotate(OP)
    text = repr(await w.store.query_audit()) + repr(await w.keys.status(OP))
    for secret in (*VALUES.values(), "ghp_"):
        assert secret not in text


async def test_rotate_refuses_an_old_copy_of_the_key_file() -> None:
    w = await _world()
    stale = MasterKeyAdmin(w.store, w.old, KeyHasher(FAST))  # version 1 alone, while the store knows version 2
    with pytest.raises(Conflict, match="knows master key version 2, newer than this key file's active version 1"):
        await stale.rotate(OP)
    assert (await w.keys.status(OP)).rows_under(1) == 6


async def test_a_standby_version_does_not_make_rotate_refuse_and_rows_stay_under_the_active_one() -> None:
    ring = Keyring.from_spec(spec_with_new_version(Keyring.generate_spec(), active=False)[0])  # 2 on standby behind 1
    store = MemoryStore()
    await store.migrate()
    await AdminService(store, ring, KeyHasher(FAST)).initialize(OP)  # the store knows version 2, newer than active
    keys = MasterKeyAdmin(store, ring, KeyHasher(FAST))
    report = await keys.rotate(OP)
    assert report.active == 1 and report.total == 0
    assert [(v.version, v.active, v.in_store) for v in (await keys.status(OP)).versions] == [(2, False, True), (1, True, True)]
