"""Seed a SQLite store for the benchmarks: N principals, each with a gateway key and an override.

What is created, and how:

- the store is initialised, and the MCP server registered, through `AdminService`, the use-case
  layer the CLI uses: server `bench`, `individual` mode, `Authorization: Bearer {{API_KEY}}`;
- principals (`user000000`...), in `teams` teams, role `user`, no rate limit; one gateway key
  each (`authz_server.crypto.keys.generate`, hashed with Argon2id) and one override on
  `bench` (sealed with the store's master key, AAD-bound to its row, as `set_override` does);
- `cold` more principals the same way, whose keys are hashed at the sidecar's default Argon2
  cost and are never used before the C-cold phase.

Principals, keys and overrides are written through the store's own transaction and row codec
in batches (`executemany`), with their change-log rows, so 100k rows take seconds instead of
the minutes one `AdminService` call per row (each a transaction and an audit event) would take.
This uses `SqlStore` internals (`_write`, `_codec`); if those change, the per-row public Store
methods are used instead (slower, same result).

Argon2 cost: `warm_params` hashes the keys of the measured principals. Only the warm path is
measured for them (a warm-up pass verifies each key once first), so the scale seed and the quick
run use a cheap profile (`CHEAP_ARGON2`, m=8 KiB, t=1) to keep seeding 100k keys quick. The cold
keys always use the sidecar's default cost, which is what C-cold measures.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from authz_server.admin.service import Actor, AdminService
from authz_server.crypto import keys as gateway_keys
from authz_server.crypto.cipher import ENV_KEY_FILE, Keyring, aad_override, write_key_file
from authz_server.crypto.keys import Argon2Params, KeyHasher
from authz_server.models import (
    AuthMode,
    Entity,
    GatewayKey,
    Override,
    OverrideStatus,
    Principal,
    PrincipalKind,
    Role,
    mask,
    override_key,
)
from authz_server.store import open_store
from authz_server.store.base import Store
from authz_server.store.codec import KEY_COLUMNS, OVERRIDE_COLUMNS, PRINCIPAL_COLUMNS
from authz_server.store.sql import SqlStore

SERVER = "bench"
PLACEHOLDER = "API_KEY"
CHEAP_ARGON2 = Argon2Params(time_cost=1, memory_cost_kib=8, parallelism=1)
DEFAULT_ARGON2 = Argon2Params()
BATCH = 5000


@dataclass
class World:
    """A seeded store and the plaintext it was seeded with (bench data, kept in the work dir)."""

    dir: str
    store_url: str
    master_key_file: str
    server: str
    signing_secret: str
    keys: list[str] = field(default_factory=list)  # warm keys, principal i
    tokens: list[str] = field(default_factory=list)  # principal i's override value on `server`
    cold_keys: list[str] = field(default_factory=list)
    cold_tokens: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # how long each seeding step took

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` without MCP_AUTHZ_* variables, plus this store and its master key file."""
        env = {k: v for k, v in base.items() if not k.startswith("MCP_AUTHZ_")}
        env.update({"MCP_AUTHZ_STORE": self.store_url, ENV_KEY_FILE: self.master_key_file})
        return env

    def save(self) -> Path:
        path = Path(self.dir) / "world.json"
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: Path) -> World:
        data: dict[str, Any] = json.loads((directory / "world.json").read_text(encoding="utf-8"))
        return cls(**data)


def _token(i: int, prefix: str = "tok") -> str:
    return f"{prefix}-{i:06d}-{secrets.token_urlsafe(12)}"


def _hash_all(params: Argon2Params, secrets_: Sequence[gateway_keys.Secret], workers: int = 2) -> list[str]:
    # argon2-cffi releases the GIL while hashing, so threads use every core.
    hasher = KeyHasher(params)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(hasher.hash, secrets_, chunksize=64))


async def _write_rows(store: Store, principals: list[Principal], keys: list[GatewayKey],
                      overrides: list[Override]) -> None:
    """Insert in batches through the SQL store's transaction and codec, or row by row."""
    if isinstance(store, SqlStore) and hasattr(store, "_write") and hasattr(store, "_codec"):
        codec = store._codec  # noqa: SLF001 - see the module docstring
        tables: list[tuple[str, Sequence[str], list[Any], Entity, list[str]]] = [
            ("principals", PRINCIPAL_COLUMNS, [codec.encode_principal(p) for p in principals],
             Entity.PRINCIPAL, [p.id for p in principals]),
            ("gateway_keys", KEY_COLUMNS, [codec.encode_key(k) for k in keys],
             Entity.KEY, [k.key_id for k in keys]),
            ("overrides", OVERRIDE_COLUMNS, [codec.encode_override(o) for o in overrides],
             Entity.OVERRIDE, [override_key(o.principal_id, o.server) for o in overrides]),
        ]
        at = codec.time(datetime.now(UTC))
        for table, columns, rows, entity, entity_keys in tables:
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            for start in range(0, len(rows), BATCH):
                async with store._write() as tx:  # noqa: SLF001
                    await tx.executemany(sql, rows[start : start + BATCH])
                    await tx.executemany(
                        "INSERT INTO change_log (entity, entity_key, at) VALUES (?, ?, ?)",
                        [(entity.value, k, at) for k in entity_keys[start : start + BATCH]],
                    )
                    tx.changed = True
        return
    for p in principals:
        await store.add_principal(p)
    for k in keys:
        await store.add_key(k)
    for o in overrides:
        await store.put_override(o)


async def seed(
    directory: Path,
    *,
    principals: int,
    cold: int = 0,
    teams: int = 10,
    warm_params: Argon2Params = CHEAP_ARGON2,
) -> World:
    """Create `directory/authz.db` and its master key file, seeded as the module docstring says."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("authz.db*"):
        stale.unlink()
    spec = Keyring.generate_spec()
    key_file = directory / "master.key"
    key_file.unlink(missing_ok=True)
    write_key_file(key_file, spec)
    keyring = Keyring.from_spec(spec)
    store_url = f"sqlite:///{directory / 'authz.db'}"
    timings: dict[str, float] = {}
    store = await open_store(store_url)
    try:
        started = time.perf_counter()
        admin = AdminService(store, keyring, KeyHasher())
        op = Actor.operator()
        await admin.initialize(op)
        _, signing = await admin.add_server(op, SERVER, AuthMode.INDIVIDUAL, headers=(f"Authorization: Bearer {{{{{PLACEHOLDER}}}}}",))
        now = datetime.now(UTC)
        for t in range(teams):
            await store.ensure_team(f"team{t:02d}", now)
        timings["admin"] = time.perf_counter() - started

        total = principals + cold
        people = [
            Principal(
                id="p_" + "".join(secrets.choice(gateway_keys.ALPHABET) for _ in range(12)),
                name=f"user{i:06d}" if i < principals else f"cold{i - principals:06d}",
                kind=PrincipalKind.USER,
                team=f"team{i % teams:02d}",
                roles=(Role.USER,),
                created_at=now,
            )
            for i in range(total)
        ]
        generated = [gateway_keys.generate() for _ in range(total)]
        started = time.perf_counter()
        hashes = _hash_all(warm_params, [s for _, s in generated[:principals]])
        timings["argon2_warm"] = time.perf_counter() - started
        started = time.perf_counter()
        hashes += _hash_all(DEFAULT_ARGON2, [s for _, s in generated[principals:]])
        timings["argon2_cold"] = time.perf_counter() - started

        started = time.perf_counter()
        tokens = [_token(i) for i in range(total)]
        keys = [
            GatewayKey(key_id=kid, principal_id=p.id, hash=h, label="bench", created_at=now)
            for p, (kid, _), h in zip(people, generated, hashes, strict=True)
        ]
        overrides = [
            Override(
                principal_id=p.id,
                server=SERVER,
                values={PLACEHOLDER: keyring.seal(tok, aad_override(SERVER, p.id, PLACEHOLDER))},
                masks={PLACEHOLDER: mask(tok)},
                updated_by="cli",
                updated_at=now,
                status=OverrideStatus.CONFIGURED,
                status_at=now,
            )
            for p, tok in zip(people, tokens, strict=True)
        ]
        timings["seal"] = time.perf_counter() - started
        started = time.perf_counter()
        await _write_rows(store, people, keys, overrides)
        timings["write"] = time.perf_counter() - started
    finally:
        await store.close()
    plain = [s.reveal() for _, s in generated]
    world = World(
        dir=str(directory),
        store_url=store_url,
        master_key_file=str(key_file),
        server=SERVER,
        signing_secret=signing.reveal(),
        keys=plain[:principals],
        tokens=tokens[:principals],
        cold_keys=plain[principals:],
        cold_tokens=tokens[principals:],
        seconds=timings,
    )
    world.save()
    return world


def seed_sync(directory: Path, **kwargs: Any) -> World:
    """`seed` from synchronous code."""
    return asyncio.run(seed(directory, **kwargs))


def write_keys_file(path: Path, keys: Sequence[str]) -> Path:
    """One key a line, for wrk's Lua script."""
    path.write_text("".join(k + "\n" for k in keys), encoding="utf-8")
    return path


def garbage_keys(known: Sequence[str], count: int) -> list[str]:
    """Keys Check must refuse before any hashing, half of each kind:
    a valid key with its checksum altered (`key_checksum`), and a well-formed key with a valid
    checksum whose key id is not in the store (`key_unknown`)."""
    out: list[str] = []
    known_ids = {k[len(gateway_keys.PREFIX) : len(gateway_keys.PREFIX) + gateway_keys.KEY_ID_LEN] for k in known}
    for i in range(count):
        if i % 2 == 0:
            base = known[i % len(known)]
            last = base[-1]
            swapped = gateway_keys.ALPHABET[(gateway_keys.ALPHABET.index(last) + 1) % len(gateway_keys.ALPHABET)]
            out.append(base[:-1] + swapped)
        else:
            key_id, secret = gateway_keys.generate()
            if key_id in known_ids:
                continue
            out.append(secret.reveal())
    return out
