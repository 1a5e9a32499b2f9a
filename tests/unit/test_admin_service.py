"""AdminService: validation, every use case, the audit trail, encryption binding and the role check."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest

from authz_server.admin.service import Actor, AdminService
from authz_server.admin.views import GatewayKeyView, key_status
from authz_server.crypto import keys as gateway_keys
from authz_server.crypto.cipher import Keyring, aad_override, aad_shared, aad_signing
from authz_server.crypto.keys import Argon2Params, KeyHasher
from authz_server.errors import (
    ConfigError,
    Conflict,
    CorruptRow,
    InvalidInput,
    MasterKeyError,
    NotFound,
    PermissionDenied,
)
from authz_server.models import AuthMode, GatewayKey, OverrideStatus, Principal, PrincipalKind, Role, Secret
from authz_server.store.memory import MemoryStore

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
OP = Actor.operator()
# Cheap Argon2 for tests: the cost parameters are not what is under test here.
FAST = Argon2Params(time_cost=1, memory_cost_kib=8, parallelism=1)

GH_TOKEN = "ghp_abcdefghijklmnopqrstuvwxyz0123456789"
LINEAR_TOKEN = "lin_api_ZYXWVUTSRQPONMLKJIHGFEDCBA9876"
CLIENT_ID = "client-id-42-secretish"


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@dataclass
class World:
    svc: AdminService
    store: MemoryStore
    keyring: Keyring
    hasher: KeyHasher
    clock: Clock
    admin_key: Secret
    # Every secret this test saw; none may ever show up in an audit event.
    secrets: list[str] = field(default_factory=list)


@pytest.fixture
async def world() -> World:
    store = MemoryStore()
    await store.migrate()
    keyring = Keyring.from_spec(Keyring.generate_spec())
    hasher = KeyHasher(FAST)
    clock = Clock()
    svc = AdminService(store, keyring, hasher, clock)
    _, _, key = await svc.initialize(OP)
    return World(svc, store, keyring, hasher, clock, key, [key.reveal()])


async def _audit(w: World) -> list:
    return await w.store.query_audit(limit=10_000)


async def _add_github(w: World, mode: str = "individual") -> None:
    _, signing = await w.svc.add_server(OP, "github", mode, ["Authorization: Bearer {{API_KEY}}"])
    w.secrets.append(signing.reveal())


async def _add_multi(w: World) -> None:
    _, signing = await w.svc.add_server(
        OP,
        "crm",
        "shared",
        ["X-API-Key: {{API_KEY}}", "X-Client-ID: {{CLIENT_ID}}", "X-Trace: t={{TRACE}}"],
        optional={"TRACE"},
    )
    w.secrets.append(signing.reveal())


# --- init and master key ---------------------------------------------------------------


async def test_initialize_creates_admin_with_working_key(world: World) -> None:
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


async def test_initialize_refuses_twice(world: World) -> None:
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


# --- servers ------------------------------------------------------------------------------

BEARER = ["Authorization: Bearer {{API_KEY}}"]


@pytest.mark.parametrize(
    ("name", "mode", "headers", "optional", "message"),
    [
        ("GitHub", "shared", BEARER, set(), "server name is invalid"),
        ("-gh", "shared", BEARER, set(), "server name is invalid"),
        ("gh", "oauth", BEARER, set(), "mode must be none, shared or individual"),
        ("gh", "none", BEARER, set(), "none mode injects no credentials"),
        ("gh", "none", [], {"API_KEY"}, "no placeholders to make optional"),
        ("gh", "shared", [], set(), "needs at least one header with a placeholder"),
        ("gh", "individual", ["X-Static: constant"], set(), "needs at least one header with a placeholder"),
        ("gh", "shared", ["Authorization Bearer {{API_KEY}}"], set(), "must be 'Name: value'"),
        ("gh", "shared", ["Bad Name: {{API_KEY}}"], set(), "not an HTTP header name"),
        ("gh", "shared", [":path: /x/{{API_KEY}}"], set(), "pseudo-headers"),
        ("gh", "shared", ["Host: {{API_KEY}}"], set(), "Header Host is reserved"),
        ("gh", "shared", ["X-User-Id: {{API_KEY}}"], set(), "reserved"),
        ("gh", "shared", ["x-user-roles: {{API_KEY}}"], set(), "reserved"),
        ("gh", "shared", ["X-Request-ID: {{API_KEY}}"], set(), "reserved"),
        ("gh", "shared", ["x-mcp-authz-signature: {{API_KEY}}"], set(), "reserved"),
        ("gh", "shared", ["X-MCP-Authz-Timestamp: {{API_KEY}}"], set(), "reserved"),
        ("gh", "shared", ["Content-Length: {{API_KEY}}"], set(), "reserved"),
        ("gh", "shared", ["Transfer-Encoding: {{API_KEY}}"], set(), "reserved"),
        ("gh", "shared", ["X-A: {{A}}", "x-a: {{B}}"], set(), "given twice"),
        ("gh", "shared", ["X-A:   "], set(), "empty value template"),
        ("gh", "shared", ["X-A: {{api_key}}"], set(), "not a placeholder"),
        ("gh", "shared", ["X-A: {{A}}\r\nX-Evil: 1"], set(), "control character"),
        ("gh", "shared", BEARER, {"TOKEN"}, "Optional TOKEN is not a placeholder"),
        ("gh", "shared", BEARER, {"sk-live-123"}, "(an unknown name) is not a placeholder"),
    ],
)
async def test_add_server_validation(
    world: World, name: str, mode: str, headers: list[str], optional: set[str], message: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        await world.svc.add_server(OP, name, mode, headers, optional)
    assert message in info.value.message
    assert "sk-live-123" not in info.value.message
    assert await world.store.list_servers() == []


async def test_add_server_templates_placeholders_and_signing_secret(world: World) -> None:
    w = world
    view, signing = await w.svc.add_server(
        OP,
        "crm",
        AuthMode.SHARED,
        ["X-API-Key: {{API_KEY}}", "X-Client-ID: {{ CLIENT_ID }}", "X-Trace: t={{TRACE}}-{{API_KEY}}"],
        optional={"TRACE"},
        description="the CRM",
    )
    assert view.name == "crm" and view.mode == "shared" and view.description == "the CRM"
    assert view.placeholders == (("API_KEY", True), ("CLIENT_ID", True), ("TRACE", False))
    assert view.headers == (
        "X-API-Key: {{API_KEY}}",
        "X-Client-ID: {{ CLIENT_ID }}",
        "X-Trace: t={{TRACE}}-{{API_KEY}}",
    )
    assert view.shared_status == "missing" and view.has_signing_secret and view.created_at == T0
    stored = await w.store.get_server("crm")
    assert stored is not None and stored.signing_secret is not None
    assert len(signing.reveal()) >= 40
    assert w.keyring.open(stored.signing_secret, aad_signing("crm")) == signing
    with pytest.raises(CorruptRow):
        w.keyring.open(stored.signing_secret, aad_signing("github"))
    with pytest.raises(Conflict, match="exists already"):
        await w.svc.add_server(OP, "crm", "none")
    none_view, _ = await w.svc.add_server(OP, "public", "none")
    assert none_view.placeholders == () and none_view.headers == () and none_view.shared_status is None
    assert [s.name for s in await w.svc.list_servers(OP)] == ["crm", "public"]
    assert (await w.svc.show_server(OP, "crm")).to_json()["placeholders"][2] == {"name": "TRACE", "required": False}


async def test_set_shared_seals_each_value_to_its_row(world: World) -> None:
    w = world
    await _add_multi(w)
    w.clock.advance(minutes=5)
    view = await w.svc.set_shared(OP, "crm", {"API_KEY": GH_TOKEN, "CLIENT_ID": CLIENT_ID})
    w.secrets += [GH_TOKEN, CLIENT_ID]
    assert dict(view.shared_masks) == {"API_KEY": "ghp_…6789", "CLIENT_ID": "clie…tish"}
    assert view.shared_status == "configured" and view.updated_at == T0 + timedelta(minutes=5)
    stored = await w.store.get_server("crm")
    assert stored is not None
    assert w.keyring.open(stored.shared_values["API_KEY"], aad_shared("crm", "API_KEY")).reveal() == GH_TOKEN
    # Swapped between fields, servers or kinds of row, a ciphertext does not open.
    for aad in (aad_shared("crm", "CLIENT_ID"), aad_shared("other", "API_KEY"), aad_override("crm", "p_x", "API_KEY")):
        with pytest.raises(CorruptRow):
            w.keyring.open(stored.shared_values["API_KEY"], aad)
    assert GH_TOKEN not in repr(view) and GH_TOKEN not in str(view.to_json())


async def test_set_shared_refusals(world: World) -> None:
    w = world
    await _add_github(w, "individual")
    with pytest.raises(InvalidInput, match="individual mode.*overrides set"):
        await w.svc.set_shared(OP, "github", {"API_KEY": GH_TOKEN})
    await _add_multi(w)
    with pytest.raises(InvalidInput, match="needs a value for CLIENT_ID"):
        await w.svc.set_shared(OP, "crm", {"API_KEY": GH_TOKEN})
    with pytest.raises(NotFound, match="No server named nope"):
        await w.svc.set_shared(OP, "nope", {"API_KEY": GH_TOKEN})


async def test_rotate_signing_secret_and_remove_server(world: World) -> None:
    w = world
    await _add_github(w)
    before = await w.store.get_server("github")
    w.clock.advance(seconds=30)
    new = await w.svc.rotate_signing_secret(OP, "github")
    after = await w.store.get_server("github")
    assert before and after and after.signing_secret and before.signing_secret
    assert w.keyring.open(after.signing_secret, aad_signing("github")) == new
    assert w.keyring.open(before.signing_secret, aad_signing("github")) != new
    assert after.updated_at == T0 + timedelta(seconds=30)
    bob = await w.svc.add_principal(OP, "bob", "default", ["user"])
    await w.svc.set_override(OP, "bob", "github", {"API_KEY": GH_TOKEN})
    await w.svc.remove_server(OP, "github")
    assert await w.store.get_server("github") is None
    assert await w.store.get_override(bob.id, "github") is None
    with pytest.raises(NotFound):
        await w.svc.remove_server(OP, "github")
    with pytest.raises(NotFound):
        await w.svc.rotate_signing_secret(OP, "github")


# --- principals and teams ------------------------------------------------------------------


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
async def test_add_principal_validation(world: World, kwargs: dict, error: type, message: str) -> None:
    args = {"name": "bob", "team": "default", "roles": ["user"]} | kwargs
    with pytest.raises(error, match=message):
        await world.svc.add_principal(OP, **args)


async def test_principals_and_teams(world: World) -> None:
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


# --- keys -----------------------------------------------------------------------------------


async def test_create_key_with_label_expiry_and_scope(world: World) -> None:
    w = world
    await _add_github(w)
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
async def test_create_key_validation(world: World, kwargs: dict, error: type, message: str) -> None:
    await _add_github(world)
    args = {"principal_name": "admin"} | kwargs
    with pytest.raises(error, match=message):
        await world.svc.create_key(OP, **args)
    assert len(await world.store.list_keys()) == 1  # only the admin's initial key


async def test_key_status_and_listing(world: World) -> None:
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
async def test_key_id_validation_never_echoes(world: World, key_id: str, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        await world.svc.revoke_key(OP, key_id)
    assert message in info.value.message and key_id not in info.value.message


async def test_regenerate_without_grace_revokes_at_once(world: World) -> None:
    w = world
    await _add_github(w)
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


async def test_regenerate_with_grace_keeps_old_key_briefly(world: World) -> None:
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


async def test_regenerate_expired_key_is_refused(world: World) -> None:
    w = world
    view, _ = await w.svc.create_key(OP, "admin", "soon", T0 + timedelta(hours=1))
    w.clock.advance(hours=1)
    with pytest.raises(Conflict, match="has expired"):
        await w.svc.regenerate_key(OP, view.key_id)


# --- overrides -------------------------------------------------------------------------------

SECRET_VALUE = "sk-live-DO-NOT-LEAK-0123456789"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "No values given for server crm"),
        ({"API_KEY": GH_TOKEN}, "needs a value for CLIENT_ID"),
        ({"API_KEY": GH_TOKEN, "CLIENT_ID": CLIENT_ID, "SECRET": SECRET_VALUE}, "Unknown placeholder SECRET"),
        ({"API_KEY": GH_TOKEN, "CLIENT_ID": CLIENT_ID, SECRET_VALUE: "x"}, "Unknown placeholder (an unknown name)"),
        ({"API_KEY": "", "CLIENT_ID": CLIENT_ID}, "The value of API_KEY is empty"),
        ({"API_KEY": SECRET_VALUE + "\r\nX-Evil: 1", "CLIENT_ID": CLIENT_ID}, "API_KEY contains a control character"),
        ({"API_KEY": SECRET_VALUE + "\n", "CLIENT_ID": CLIENT_ID}, "API_KEY contains a control character"),
        ({"API_KEY": SECRET_VALUE, "CLIENT_ID": "a\x00b"}, "CLIENT_ID contains a control character"),
        ({"API_KEY": SECRET_VALUE, "CLIENT_ID": "a\tb"}, "CLIENT_ID contains a control character"),
        ({"API_KEY": SECRET_VALUE, "CLIENT_ID": "a\u2028b"}, "CLIENT_ID contains a control character"),
        ({"API_KEY": SECRET_VALUE * 300, "CLIENT_ID": CLIENT_ID}, "API_KEY is longer than 8 KiB"),
        ({"API_KEY": SECRET_VALUE, "CLIENT_ID": CLIENT_ID, "TRACE": ""}, "The value of TRACE is empty"),
    ],
)
async def test_override_value_validation(world: World, values: dict[str, str], message: str) -> None:
    w = world
    await _add_multi(w)
    await w.svc.add_principal(OP, "bob", "default", ["user"])
    with pytest.raises(InvalidInput) as info:
        await w.svc.set_override(OP, "bob", "crm", values)
    assert message in info.value.message
    assert SECRET_VALUE not in info.value.message and GH_TOKEN not in info.value.message
    assert await w.store.list_overrides() == []
    (event,) = await w.store.query_audit(action="overrides.set")
    assert event.outcome == "error" and SECRET_VALUE not in str(event)


async def test_override_8kib_boundary_and_optional(world: World) -> None:
    w = world
    await _add_multi(w)
    await w.svc.add_principal(OP, "bob", "default", ["user"])
    view = await w.svc.set_override(OP, "bob", "crm", {"API_KEY": "k" * 8192, "CLIENT_ID": CLIENT_ID})
    assert dict(view.masks) == {"API_KEY": "kkkk…kkkk", "CLIENT_ID": "clie…tish"}
    view = await w.svc.set_override(OP, "bob", "crm", {"API_KEY": "short123", "CLIENT_ID": "c", "TRACE": "t" * 20})
    assert dict(view.masks) == {"API_KEY": "…23", "CLIENT_ID": "…", "TRACE": "tttt…tttt"}


async def test_set_override_seals_to_row_and_records_who(world: World) -> None:
    w = world
    await _add_github(w)
    bob = await w.svc.add_principal(OP, "bob", "default", ["user"])
    carol = await w.svc.add_principal(OP, "carol", "default", ["manager"])
    w.clock.advance(minutes=3)
    view = await w.svc.set_override(OP, "bob", "github", {"API_KEY": GH_TOKEN})
    w.secrets.append(GH_TOKEN)
    assert (view.principal, view.kind, view.server, view.updated_by, view.status) == (
        "bob", "user", "github", "cli", "configured"
    )
    assert dict(view.masks) == {"API_KEY": "ghp_…6789"} and view.updated_at == T0 + timedelta(minutes=3)
    stored = await w.store.get_override(bob.id, "github")
    assert stored is not None and stored.updated_by == "cli" and stored.status is OverrideStatus.CONFIGURED
    assert w.keyring.open(stored.values["API_KEY"], aad_override("github", bob.id, "API_KEY")).reveal() == GH_TOKEN
    for aad in (
        aad_override("github", carol.id, "API_KEY"),
        aad_override("linear", bob.id, "API_KEY"),
        aad_shared("github", "API_KEY"),
    ):
        with pytest.raises(CorruptRow):
            w.keyring.open(stored.values["API_KEY"], aad)
    # A manager sets it: updated_by is the manager's id, shown by name.
    manager = Actor(carol.id, frozenset({Role.MANAGER}))
    again = await w.svc.set_override(manager, "bob", "github", {"API_KEY": LINEAR_TOKEN})
    w.secrets.append(LINEAR_TOKEN)
    assert again.updated_by == "carol"
    assert (await w.store.get_override(bob.id, "github")).updated_by == carol.id  # type: ignore[union-attr]
    (listed,) = await w.svc.list_overrides(OP, server_name="github")
    assert listed.to_json() == {
        "principal": "bob",
        "kind": "user",
        "server": "github",
        "values": {"API_KEY": "lin_…9876"},
        "updated_by": "carol",
        "updated_at": "2026-03-01T12:03:00Z",
        "expires_at": None,
        "status": "configured",
        "status_reason": "",
    }


async def test_override_refusals_listing_and_delete(world: World) -> None:
    w = world
    await w.svc.add_server(OP, "public", "none")
    await _add_github(w)
    await w.svc.add_principal(OP, "bob", "default", ["user"])
    await w.svc.add_principal(OP, "deploy", "default", ["user"], kind=PrincipalKind.SERVICE)
    with pytest.raises(InvalidInput, match="none mode"):
        await w.svc.set_override(OP, "bob", "public", {"API_KEY": GH_TOKEN})
    with pytest.raises(NotFound, match="No server named nope"):
        await w.svc.set_override(OP, "bob", "nope", {"API_KEY": GH_TOKEN})
    with pytest.raises(NotFound, match="No principal named nobody"):
        await w.svc.set_override(OP, "nobody", "github", {"API_KEY": GH_TOKEN})
    await w.svc.set_override(OP, "bob", "github", {"API_KEY": GH_TOKEN})
    await w.svc.set_override(OP, "deploy", "github", {"API_KEY": LINEAR_TOKEN})
    listing = await w.svc.list_overrides(OP)
    assert sorted((v.principal, v.kind) for v in listing) == [("bob", "user"), ("deploy", "service")]
    assert [v.principal for v in await w.svc.list_overrides(OP, principal_name="deploy")] == ["deploy"]
    for v in listing:
        assert GH_TOKEN not in str(v.to_json()) and LINEAR_TOKEN not in str(v.to_json())
    await w.svc.delete_override(OP, "bob", "github")
    assert [v.principal for v in await w.svc.list_overrides(OP)] == ["deploy"]
    with pytest.raises(NotFound, match="bob has no override for server github"):
        await w.svc.delete_override(OP, "bob", "github")


# --- audit -----------------------------------------------------------------------------------


async def test_every_operation_writes_one_audit_event_without_secrets(world: World) -> None:
    w = world
    calls = [
        ("servers.add", lambda: w.svc.add_server(OP, "crm", "shared", ["X-API-Key: {{API_KEY}}"])),
        ("servers.list", lambda: w.svc.list_servers(OP)),
        ("servers.show", lambda: w.svc.show_server(OP, "crm")),
        ("servers.set_shared", lambda: w.svc.set_shared(OP, "crm", {"API_KEY": GH_TOKEN})),
        ("servers.rotate_signing_secret", lambda: w.svc.rotate_signing_secret(OP, "crm")),
        ("principals.add", lambda: w.svc.add_principal(OP, "bob", "default", ["user"])),
        ("principals.list", lambda: w.svc.list_principals(OP)),
        ("principals.disable", lambda: w.svc.set_principal_disabled(OP, "bob", True)),
        ("principals.enable", lambda: w.svc.set_principal_disabled(OP, "bob", False)),
        ("teams.list", lambda: w.svc.list_teams(OP)),
        ("teams.disable", lambda: w.svc.set_team_disabled(OP, "default", True)),
        ("teams.enable", lambda: w.svc.set_team_disabled(OP, "default", False)),
        ("keys.create", lambda: w.svc.create_key(OP, "bob", "laptop")),
        ("keys.list", lambda: w.svc.list_keys(OP)),
        ("overrides.set", lambda: w.svc.set_override(OP, "bob", "crm", {"API_KEY": LINEAR_TOKEN})),
        ("overrides.list", lambda: w.svc.list_overrides(OP)),
        ("overrides.delete", lambda: w.svc.delete_override(OP, "bob", "crm")),
        ("servers.remove", lambda: w.svc.remove_server(OP, "crm")),
        ("keys.create", lambda: w.svc.create_key(OP, "nobody")),  # an error is audited too
    ]
    w.secrets += [GH_TOKEN, LINEAR_TOKEN]
    for action, call in calls:
        before = len(await _audit(w))
        try:
            result = await call()
        except NotFound:
            result = None
        for item in result if isinstance(result, tuple) else ():
            if isinstance(item, Secret):
                w.secrets.append(item.reveal())
        events = await _audit(w)
        assert len(events) == before + 1, action
        assert events[-1].action == action and events[-1].actor == "cli"
    keys = [v.key_id for v in await w.svc.list_keys(OP, "bob")]
    (bob_key,) = keys
    await w.svc.regenerate_key(OP, bob_key, grace_seconds=60)
    await w.svc.revoke_key(OP, bob_key)
    events = await _audit(w)
    by_action = {e.action: e for e in events}
    assert by_action["keys.regenerate"].target == f"key:{bob_key}" and by_action["keys.regenerate"].outcome == "ok"
    assert by_action["keys.regenerate"].details["grace_seconds"] == "60"
    assert by_action["keys.revoke"].target == f"key:{bob_key}"
    assert by_action["overrides.set"].details == {"fields": "API_KEY"}
    assert by_action["overrides.set"].target == "override:bob/crm"
    assert events[-4].outcome == "error" and events[-4].details["reason"] == "not_found"
    # The scan: no secret, key or hash anywhere in the audit trail.
    dump = "\n".join(repr(e) for e in events)
    for secret in w.secrets:
        assert secret not in dump
        assert secret[4:20] not in dump
    assert "$argon2" not in dump and "mgw_" not in dump


# --- the role check ---------------------------------------------------------------------------

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


async def test_users_act_only_on_their_own_and_cannot_probe(world: World) -> None:
    w = world
    await _add_github(w)
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


class AcceptingProbe:
    """An upstream that accepts any credential: `overrides test` answers ok once allowed."""

    async def initialize(self, url: str, headers: object) -> int:
        return 200


@dataclass
class Cast:
    w: World
    svc: AdminService  # the world's store, with an upstream for `overrides test`
    actors: dict[str, Actor]
    ids: dict[str, str]


@pytest.fixture
async def cast(world: World) -> Cast:
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


def test_views_never_carry_hashes_or_ciphertext() -> None:
    key = GatewayKey("AAAAAAA", "p_x", "$argon2id$v=19$secret-hash", "l", created_at=T0)
    view = GatewayKeyView.of(key, "bob", T0)
    assert "$argon2" not in repr(view) and "$argon2" not in str(view.to_json())
