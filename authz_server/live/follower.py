"""The follower: loads the store into the live tables, then applies the change log.

`load` reads a snapshot at start; `run` then applies the change log: for each
changed entity it re-reads that one row, decrypts what Check will inject, and
replaces the entry whole, then bumps `version`. It runs on the event loop;
Check reads the tables from the core loop's thread and the hashing threads.
Every key change also goes through `VerifiedKeys.replaced`, which decides whether
the key stays verified.

The master keyring follows its file (`Keyring.source`) the same way: re-read when
the file changes (checked every tick), on SIGHUP (`request_keyring_reload`), and,
before a row sealed under a version it does not know is given up as unreadable.
A file that does not match the store's check values is refused and the keyring kept.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from datetime import datetime

from authz_server.crypto.cipher import Keyring, aad_override, aad_shared, aad_signing, file_stamp, read_key_file
from authz_server.errors import AuthzError, MasterKeyError
from authz_server.live.tables import AuthState, KeyEntry, OverrideEntry, ServerEntry
from authz_server.live.verified import VerifiedKeys
from authz_server.models import (
    Change,
    Entity,
    GatewayKey,
    McpServer,
    Override,
    OverrideStatus,
    Principal,
    Role,
    Secret,
    Snapshot,
)
from authz_server.store.base import Store

log = logging.getLogger(__name__)


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


class StateFollower:
    """Loads the store into an AuthState and follows its change log; keeps `verified` in step with the key table."""

    def __init__(
        self, store: Store, keyring: Keyring, state: AuthState, verified: VerifiedKeys, poll_interval: float
    ) -> None:
        self._store = store
        self._keyring = keyring
        self.state = state
        self._verified = verified
        self._poll = poll_interval
        self.last_error: str = ""
        self.last_success: float = 0.0  # time.monotonic() of the last successful load or poll
        self.seen_seq = 0  # newest change-log seq read from the store
        self._roles: dict[tuple[Role, ...], tuple[Role, ...]] = {}  # one tuple per distinct set of roles
        self._key_stamp = file_stamp(keyring.source) if keyring.source else None
        self._reload_requested = False
        self._unknown_reload_at = -1.0  # time.monotonic() of the last reload for an unknown version

    # --- the master keyring ------------------------------------------------------------------

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    def request_keyring_reload(self) -> None:
        """Re-read the key file at the next tick (SIGHUP)."""
        self._reload_requested = True

    async def reload_keyring(self, why: str) -> bool:
        """Re-read the key file; adopt it if it opens the store's check values. Logs versions, never keys."""
        source = self._keyring.source
        if source is None:
            log.warning("master keyring not reloaded: it comes from the environment, not a file", extra={"why": why})
            return False
        stamp = file_stamp(source)  # before reading: a change after it is seen at the next tick
        try:
            fresh = Keyring.from_spec(read_key_file(source), source)
            fresh.verify_check(await self._store.get_key_checks())  # a store failure raises: retried next tick
        except MasterKeyError as exc:
            self._key_stamp = stamp  # a bad file is not read again until it changes
            log.error("master key file not reloaded; keeping the keyring", extra={"why": why, "error": exc.message})
            return False
        self._key_stamp = stamp
        self._keyring.adopt(fresh)
        log.info("master keyring reloaded", extra={"why": why, "versions": list(self._keyring.versions),
                                                    "active_version": self._keyring.active})  # fmt: skip
        return True

    async def _watch_keyring(self) -> None:
        source = self._keyring.source
        if self._reload_requested:
            await self.reload_keyring("SIGHUP")
            self._reload_requested = False
        elif source is not None and file_stamp(source) != self._key_stamp:
            await self.reload_keyring("key file changed")

    async def _know_versions(self, versions: set[int]) -> None:
        """Before giving up on a value under an unknown version, look at the key file once more
        (at most twice a second: a version nobody has would otherwise cost a read per row)."""
        unknown = versions - set(self._keyring.versions)
        if not unknown:
            return
        now, source = time.monotonic(), self._keyring.source
        if now - self._unknown_reload_at >= 0.5 or (source is not None and file_stamp(source) != self._key_stamp):
            self._unknown_reload_at = now
            await self.reload_keyring(f"a row is sealed under master key version {max(unknown)}, not in the keyring")

    async def load(self) -> None:
        """Read the whole state from a snapshot. Each table is built aside and then swapped in
        whole, so Check, should this run while it serves (a reload), never sees a half-built one."""
        snap: Snapshot = await self._store.snapshot()
        seq, teams, principals, servers = snap.seq, snap.teams, snap.principals, snap.servers
        keys, overrides = list(snap.keys), list(snap.overrides)
        del snap
        await self._know_versions(
            {s.key_version for o in overrides for s in o.values.values()}
            | {v for server in servers for v in _server_versions(server)}
        )
        st = self.state
        st.teams = {t.name: t for t in teams}
        st.principals = {p.id: self._lean(p) for p in principals}
        del principals
        st.servers = {s.name: self._server_entry(s) for s in servers}
        # Each row is dropped as soon as it is converted, so its memory is reused for the next
        # entries instead of the process holding every row and every entry at its peak.
        key_table: dict[str, KeyEntry] = {}
        while keys:
            key = _key_entry(keys.pop())
            key_table[key.key_id] = key
        st.keys = key_table
        self._verified.clear()  # after the new table is in place: see VerifiedKeys.record
        override_table: dict[tuple[str, str], OverrideEntry] = {}
        while overrides:
            override = overrides.pop()
            override_table[(override.principal_id, sys.intern(override.server))] = self._override_entry(override)
        st.overrides = override_table
        st.seq = self.seen_seq = seq
        st.version += 1
        st.loaded = True
        self.last_success = time.monotonic()
        log.info("state loaded", extra={"seq": seq, **st.counts()})

    async def run(self) -> None:
        """Apply changes until cancelled. A store outage is logged and retried;
        Check keeps answering from memory meanwhile."""
        while True:
            try:
                await self._watch_keyring()
                await self.poll_once()
                self.last_success = time.monotonic()
                if self.last_error:
                    log.info("store reachable again")
                    self.last_error = ""
                await self._store.wait_for_changes(self._poll)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any store failure is retried
                message = exc.message if isinstance(exc, AuthzError) else type(exc).__name__
                if message != self.last_error:
                    log.warning("change log poll failed; serving from memory", extra={"error": message})
                self.last_error = message
                await asyncio.sleep(min(1.0, self._poll * 5))

    async def poll_once(self) -> int:
        """Apply every pending change; return how many were read."""
        total = 0
        while True:
            changes = await self._store.changes_since(self.state.seq)
            if not changes:
                return total
            if changes[0].seq > self.state.seq + 1 and await self._behind_trim():
                await self.load()
                total += 1
                continue
            self.seen_seq = max(self.seen_seq, changes[-1].seq)
            # The log names entities; re-read each changed one once, at its newest state.
            latest: dict[tuple[Entity, str], Change] = {(c.entity, c.entity_key): c for c in changes}
            for change in latest.values():
                await self._apply(change)
            self.state.seq = changes[-1].seq
            total += len(changes)

    async def _behind_trim(self) -> bool:
        """Whether changes this follower never applied were trimmed from the log (a gap alone may be
        a rolled-back seq on PostgreSQL); if so, say so once: the caller reloads the whole state."""
        oldest = await self._store.oldest_change_seq()
        if self.state.seq >= oldest - 1:
            return False
        log.warning(
            "the change log was trimmed past this sidecar's point; reloading the whole state",
            extra={"seq": self.state.seq, "oldest_kept": oldest},
        )
        return True

    async def _apply(self, change: Change) -> None:
        st, store, key = self.state, self._store, change.entity_key
        if change.entity is Entity.TEAM:
            team = await store.get_team(key)
            _put(st.teams, key, team)
        elif change.entity is Entity.PRINCIPAL:
            principal = await store.get_principal(key)
            _put(st.principals, key, self._lean(principal) if principal else None)
        elif change.entity is Entity.SERVER:
            server = await store.get_server(key)
            if server is not None:
                await self._know_versions(_server_versions(server))
            _put(st.servers, key, self._server_entry(server) if server else None)
        elif change.entity is Entity.KEY:
            record = await store.get_key(key)
            old = st.keys.get(key)
            new = _key_entry(record) if record is not None else None
            _put(st.keys, key, new)
            self._verified.replaced(old, new)  # after the put: a verification finishing meanwhile sees `new`
        elif change.entity is Entity.OVERRIDE:
            principal_id, _, server_name = key.partition("/")
            override = await store.get_override(principal_id, server_name)
            if override is not None:
                await self._know_versions({s.key_version for s in override.values.values()})
            _put(st.overrides, (principal_id, server_name), self._override_entry(override) if override else None)
        st.version += 1

    def _lean(self, p: Principal) -> Principal:
        """The principal as Check keeps it: shared team names and role tuples, no creation time.
        At 100k principals the copies would cost tens of MB."""
        roles = self._roles.setdefault(p.roles, p.roles)
        return dataclasses.replace(p, team=sys.intern(p.team), roles=roles, created_at=None)

    def _server_entry(self, server: McpServer) -> ServerEntry:
        shared: dict[str, Secret] = {}
        corrupt = False
        try:
            for name, sealed in server.shared_values.items():
                shared[name] = self._keyring.open(sealed, aad_shared(server.name, name))
            signing = (
                self._keyring.open(server.signing_secret, aad_signing(server.name)).reveal().encode()
                if server.signing_secret
                else b""
            )
        except AuthzError as exc:
            log.error("server credentials unreadable", extra={"server": server.name, "error": exc.message})
            corrupt, signing = True, b""
        optional = frozenset(p.name for p in server.placeholders if not p.required)
        return ServerEntry(server.name, server.mode, server.headers, optional, shared, signing, corrupt)

    def _override_entry(self, override: Override) -> OverrideEntry:
        values: dict[str, Secret] = {}
        try:
            for name, sealed in override.values.items():
                values[name] = self._keyring.open(sealed, aad_override(override.server, override.principal_id, name))
        except AuthzError as exc:
            log.error(
                "override unreadable",
                extra={"server": override.server, "principal": override.principal_id, "error": exc.message},
            )
            return OverrideEntry({}, None, corrupt=True)
        expires = _ts(override.expires_at)
        if override.status is OverrideStatus.EXPIRED and expires is None:
            expires = 0.0
        return OverrideEntry(values, expires)


def _server_versions(server: McpServer) -> set[int]:
    found = {s.key_version for s in server.shared_values.values()}
    if server.signing_secret is not None:
        found.add(server.signing_secret.key_version)
    return found


def _key_entry(k: GatewayKey) -> KeyEntry:
    return KeyEntry(k.key_id, k.principal_id, k.hash, _ts(k.expires_at), _ts(k.revoked_at), k.scope)


def _put(table: dict, key: object, value: object | None) -> None:  # type: ignore[type-arg]
    if value is None:
        table.pop(key, None)
    else:
        table[key] = value
