"""Master-key rotation on the store, for the local operator who holds the store and the key file.

The procedure (README, "Rotating the master key"), with the CLI's `mcp-authz master-key`:
1. `add`: the key file gains a new version, which seals from then on (the CLI writes the
   file); `record_versions` stores a check value per version, so a wrong file is refused.
   With sidecars on several hosts, `add --standby` first (it opens but does not seal), and
   `activate` once every host has the file.
2. Running sidecars re-read the file (live/follower.py) and open values under either version.
3. `rotate`: every sealed value still under an older version is sealed again under the
   active one, a batch per transaction, through the change log, so sidecars reload those rows.
   A row changed meanwhile is left to the writer (it sealed under its own keyring) and looked
   at again; rerunning continues where it stopped, and does nothing once everything is current.
4. `status`: rows per version; `retire` refuses a version any row still uses, then forgets
   its check value (the CLI then drops it from the file).

No plaintext ever leaves `Keyring.reseal`, and nothing here returns, logs or audits key material.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from authz_server.admin.base import AdminBase
from authz_server.admin.policy import Actor
from authz_server.crypto.cipher import Keyring, aad_override, aad_shared, aad_signing, active_cannot_go
from authz_server.errors import AuthzError, Conflict, InvalidInput, NotFound
from authz_server.models import Entity, SealedRow, split_override_key

SEALED_ENTITIES = (Entity.SERVER, Entity.OVERRIDE)
DEFAULT_BATCH = 100
_PASSES = 3  # rows changed by someone else while being resealed are looked at again, this many times in all


@dataclass(frozen=True, slots=True)
class VersionUsage:
    """One master key version: whether it seals, whether the keyring and the store know it, and the rows under it."""

    version: int
    active: bool
    in_keyring: bool
    in_store: bool
    servers: int = 0
    overrides: int = 0

    @property
    def rows(self) -> int:
        return self.servers + self.overrides

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "active": self.active, "in_key_file": self.in_keyring,
                "in_store": self.in_store, "servers": self.servers, "overrides": self.overrides}  # fmt: skip


@dataclass(frozen=True, slots=True)
class KeyStatus:
    """Rows per master key version. A row with values under two versions counts under both."""

    active: int
    versions: tuple[VersionUsage, ...]

    @property
    def old_rows(self) -> int:
        """Rows holding a value under a version other than the active one (at most: one row may count twice)."""
        return sum(v.rows for v in self.versions if not v.active)

    def rows_under(self, version: int) -> int:
        return next((v.rows for v in self.versions if v.version == version), 0)

    def to_json(self) -> dict[str, Any]:
        return {"active_version": self.active, "versions": [v.to_json() for v in self.versions],
                "rows_under_old_versions": self.old_rows}  # fmt: skip


@dataclass(slots=True)
class RotateReport:
    """What a `rotate` run did. `unreadable` names rows (never their values) that did not open."""

    active: int
    resealed: dict[Entity, int] = field(default_factory=lambda: dict.fromkeys(SEALED_ENTITIES, 0))
    current: int = 0  # rows already under the active version
    batches: int = 0
    unreadable: list[str] = field(default_factory=list)
    changed_meanwhile: int = 0  # rows still changed by someone else after every pass

    @property
    def total(self) -> int:
        return sum(self.resealed.values())

    def to_json(self) -> dict[str, Any]:
        return {"active_version": self.active, "resealed_servers": self.resealed[Entity.SERVER],
                "resealed_overrides": self.resealed[Entity.OVERRIDE], "already_current": self.current,
                "batches": self.batches, "unreadable": list(self.unreadable),
                "changed_meanwhile": self.changed_meanwhile}  # fmt: skip


def row_name(row: SealedRow) -> str:
    """The row as the audit trail names it: server:NAME or override:PRINCIPAL_ID/SERVER."""
    return f"{row.entity.value}:{row.key}"


class MasterKeyAdmin(AdminBase):
    """The store's side of master-key rotation. Every call is the operator's and is audited once."""

    @property
    def keyring(self) -> Keyring:
        return self._keyring

    async def stored_versions(self) -> set[int]:
        """The versions the store keeps a check value for (a new version is numbered above them)."""
        return set(await self._store.get_key_checks())

    async def record_versions(self, actor: Actor, version: int, action: str = "master_key.add") -> None:
        """Store a check value for every version of the keyring, after `version` was added to the key
        file (or made active: `master_key.activate`), and audit it."""
        async with self._audit(actor, action, "master_key") as op:
            self._authorize(actor, action, None)
            op.details.update({"version": str(version), "active_version": str(self._keyring.active)})
            await self._store.put_key_checks(self._keyring.check_values())

    async def status(self, actor: Actor) -> KeyStatus:
        """Rows per version, over every version the keyring, the store's check values or a row names."""
        self._authorize(actor, "master_key.status", None)
        counts: dict[int, dict[Entity, int]] = {}
        for entity in SEALED_ENTITIES:
            async for page in self._pages(entity):
                for row in page:
                    for version in row.versions():
                        per = counts.setdefault(version, dict.fromkeys(SEALED_ENTITIES, 0))
                        per[entity] += 1
        checks = set(await self._store.get_key_checks())
        ring = set(self._keyring.versions)
        none = dict.fromkeys(SEALED_ENTITIES, 0)
        rows = tuple(
            VersionUsage(v, v == self._keyring.active, v in ring, v in checks,
                         counts.get(v, none)[Entity.SERVER], counts.get(v, none)[Entity.OVERRIDE])  # fmt: skip
            for v in sorted(ring | checks | set(counts), reverse=True)
        )
        return KeyStatus(self._keyring.active, rows)

    async def rotate(self, actor: Actor, batch: int = DEFAULT_BATCH) -> RotateReport:
        """Seal every value under an older version again under the active one, `batch` rows a transaction."""
        if not 1 <= batch <= 10_000:
            raise InvalidInput("The batch size must be between 1 and 10000 rows.")
        report = RotateReport(self._keyring.active)
        async with self._audit(actor, "master_key.rotate", "master_key") as op:
            self._authorize(actor, "master_key.rotate", None)
            op.details["active_version"] = str(report.active)
            newer = [v for v in await self.stored_versions() if v > report.active and v not in self._keyring.versions]
            if newer:
                # An old copy of the key file would seal everything back under an older key.
                raise Conflict(
                    f"The store knows master key version {max(newer)}, newer than this key file's active version "
                    f"{report.active}: use the current key file."
                )
            for attempt in range(_PASSES):
                report.changed_meanwhile = 0
                for entity in SEALED_ENTITIES:
                    await self._rotate_table(entity, batch, report, first=attempt == 0)
                if not report.changed_meanwhile:
                    break
            op.details.update({"resealed": str(report.total), "unreadable": str(len(report.unreadable)),
                               "changed_meanwhile": str(report.changed_meanwhile)})  # fmt: skip
        return report

    async def retire(self, actor: Actor, version: int) -> None:
        """Forget `version`'s check value, refused while any row is sealed under it or while it seals.

        The caller drops it from the key file afterwards; run again, this completes a retirement
        that stopped between the two."""
        async with self._audit(actor, "master_key.retire", "master_key") as op:
            self._authorize(actor, "master_key.retire", None)
            op.details["version"] = str(version)
            if version == self._keyring.active:
                raise Conflict(active_cannot_go(version))
            status = await self.status(actor)
            if version not in {v.version for v in status.versions}:
                raise NotFound(f"There is no master key version {version} in the key file or the store.")
            if rows := status.rows_under(version):
                raise Conflict(
                    f"{rows} row{'s are' if rows != 1 else ' is'} still sealed under master key version {version}: "
                    "run 'mcp-authz master-key rotate' first (and check 'mcp-authz master-key status')."
                )
            await self._store.remove_key_check(version)

    # --- the rows ---------------------------------------------------------------------------

    async def _pages(self, entity: Entity, batch: int = 500) -> AsyncIterator[list[SealedRow]]:
        after = ""
        while page := await self._store.sealed_rows(entity, after, batch):
            yield page
            after = page[-1].key

    async def _rotate_table(self, entity: Entity, batch: int, report: RotateReport, *, first: bool) -> None:
        active = self._keyring.active
        async for page in self._pages(entity, batch):
            pairs: list[tuple[SealedRow, SealedRow]] = []
            for row in page:
                if row.versions() <= {active}:
                    report.current += first
                    continue
                try:
                    pairs.append((row, self._resealed(row)))
                except AuthzError as exc:  # tampered, or under a version the key file lacks: named, not fatal
                    if first:
                        report.unreadable.append(f"{row_name(row)}: {exc.message}")
            if pairs:
                done = await self._store.reseal(pairs)
                report.resealed[entity] += done
                report.changed_meanwhile += len(pairs) - done
                report.batches += 1

    def _resealed(self, row: SealedRow) -> SealedRow:
        ring = self._keyring
        if row.entity is Entity.SERVER:
            values = {f: ring.reseal(s, aad_shared(row.key, f)) for f, s in row.values.items()}
            signing = ring.reseal(row.signing, aad_signing(row.key)) if row.signing is not None else None
            return SealedRow(row.entity, row.key, values, signing)
        principal_id, server = split_override_key(row.key)
        values = {f: ring.reseal(s, aad_override(server, principal_id, f)) for f, s in row.values.items()}
        return SealedRow(row.entity, row.key, values)
