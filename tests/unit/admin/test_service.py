"""admin/service.py: what only the local operator, who holds the store, does: `initialize` and
`verify_master_key`. Each operation is tested with its resource: test_servers.py, test_keys.py..."""

from __future__ import annotations

import pytest

from authz_server.admin.service import AdminService
from authz_server.crypto import keys as gateway_keys
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import KeyHasher
from authz_server.errors import ConfigError, Conflict, MasterKeyError
from authz_server.models import Role
from authz_server.store.memory import MemoryStore

from ..fakes import FAST, OP, AdminWorld, Clock


async def test_initialize_creates_admin_with_working_key(world: AdminWorld) -> None:
    w = world
    admin = await w.store.get_principal_by_name("admin")
    assert admin is not None and admin.roles == (Role.ADMIN,) and admin.team == "default"
    assert admin.id.startswith("p_") and len(admin.id) == 14
    assert [t.name for t in await w.store.list_teams()] == ["default"]
    (key,) = await w.store.list_keys(admin.id)
    parsed = gateway_keys.parse(w.admin_key.reveal())
    assert parsed.key_id == key.key_id and key.label == "initial admin key"
    assert w.hasher.verify(key.hash, w.admin_key.reveal())
    assert not w.hasher.verify(key.hash, gateway_keys.generate()[1].reveal())
    assert set(await w.store.get_key_checks()) == {1}
    await w.svc.verify_master_key()


async def test_initialize_refuses_twice(world: AdminWorld) -> None:
    with pytest.raises(Conflict, match="already initialised"):
        await world.svc.initialize(OP, admin_name="root")
    assert await world.store.get_principal_by_name("root") is None
    events = await world.store.query_audit(action="init")
    assert [(e.outcome, e.details["reason"]) for e in events[1:]] == [("error", "conflict")]


async def test_wrong_master_key_is_refused_before_anything() -> None:
    store = MemoryStore()
    await store.migrate()
    right = AdminService(store, Keyring.from_spec(Keyring.generate_spec()), KeyHasher(FAST), Clock())
    await right.initialize(OP)
    wrong = AdminService(store, Keyring.from_spec(Keyring.generate_spec()), KeyHasher(FAST), Clock())
    with pytest.raises(MasterKeyError, match="does not match this store"):
        await wrong.verify_master_key()
    other_version = AdminService(store, Keyring.from_spec(Keyring.generate_spec(version=7)), KeyHasher(FAST))
    with pytest.raises(MasterKeyError, match="None of the master key versions"):
        await other_version.verify_master_key()


async def test_uninitialised_store_is_a_config_error() -> None:
    store = MemoryStore()
    await store.migrate()
    svc = AdminService(store, Keyring.from_spec(Keyring.generate_spec()), KeyHasher(FAST))
    with pytest.raises(ConfigError, match="not initialised") as info:
        await svc.verify_master_key()
    assert type(info.value) is ConfigError
    await svc.verify_master_key(require_initialized=False)
