"""The records: the audit trail and per-request usage, queried or exported along one path.

Both kinds go the same way: audit the call, check the limit and page size,
validate and authorize the filters (`_Kind.filter`), then read the store page by
page (`_Kind.read`), keeping only what the actor may see and naming each row's
principal once per call. A query gathers at most `limit` rows; an export returns
the pages lazily, so memory holds one page whatever the export's size. The
contract of each operation is stated once, in `AdminOps` (ops.py).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from authz_server.admin import validate
from authz_server.admin.audit import Audit
from authz_server.admin.base import AdminBase
from authz_server.admin.ops import DEFAULT_LIMIT, MAX_LIMIT, PAGE_SIZE
from authz_server.admin.policy import CLI_ACTOR_ID, Actor
from authz_server.admin.validate import MAX_TARGET_LEN
from authz_server.admin.views import AuditView, UsageView, iso
from authz_server.crypto import keys as gateway_keys
from authz_server.errors import InvalidInput
from authz_server.models import AuditEvent, UsageRecord
from authz_server.store.base import Store

_ACTION_FILTER_RE = re.compile(r"^(\*|[a-z_]+(\.[a-z_]+)?\.?\*?)$")
_PRINCIPAL_ID_RE = re.compile(r"^p_[0-9A-Za-z]{12}$")

R = TypeVar("R")  # a stored row
V = TypeVar("V")  # its view
C = TypeVar("C")  # where a reading resumes


@dataclass(frozen=True, slots=True)
class _Found:
    """Validated, authorized filters in store terms (`where`: the store query's own keywords).

    `visible` (None: no such filter) is the principal ids whose rows the actor may see when
    listing everyone; "" is in it for the usage of unauthenticated requests."""

    where: dict[str, Any]
    since: datetime | None
    until: datetime | None
    visible: frozenset[str] | None = None


class _Kind(Generic[R, V, C]):
    """What differs between the audit trail and usage: who may read it, its filters, how the
    store pages it, and its view."""

    name: str  # "audit" or "usage": the actions are NAME.query and NAME.export, the target NAME
    unit: str  # what a limit counts, in messages

    def gate(self, actor: Actor, doing: str) -> None:
        """The role check due before anything else is looked at (none: the filter decides)."""

    async def filter(self, svc: AdminBase, actor: Actor, doing: str, op: Audit, since: datetime | None,
                     until: datetime | None, **given: str | None) -> _Found:  # fmt: skip
        raise NotImplementedError

    def start(self, found: _Found) -> C:
        raise NotImplementedError

    async def read(self, store: Store, found: _Found, at: C, want: int) -> tuple[list[R], bool, C]:
        """At most `want` rows from `at` on, whether the store may hold more, and where to go on."""
        raise NotImplementedError

    def view(self, row: R, principal: str) -> V:
        raise NotImplementedError

    def principal_of(self, row: R) -> str:
        raise NotImplementedError

    def shows(self, found: _Found, row: R) -> bool:
        return found.visible is None or self.principal_of(row) in found.visible


def _note_range(op: Audit, since: datetime | None, until: datetime | None) -> tuple[datetime | None, datetime | None]:
    start, end = validate.check_time_range(since, until)
    if start is not None:
        op.details["since"] = iso(start) or ""
    if end is not None:
        op.details["until"] = iso(end) or ""
    return start, end


class _AuditKind(_Kind[AuditEvent, AuditView, "int | None"]):
    """The audit trail: admins only, paged by id (append order)."""

    name, unit = "audit", "events"

    def gate(self, actor: Actor, doing: str) -> None:
        AdminBase._authorize(actor, doing, None)

    async def filter(self, svc: AdminBase, actor: Actor, doing: str, op: Audit, since: datetime | None,
                     until: datetime | None, **given: str | None) -> _Found:  # fmt: skip
        actor_name, action_filter, target = given["actor_name"], given["action"], given["target"]
        actor_id: str | None = None
        if actor_name is not None:
            if actor_name in (CLI_ACTOR_ID, "-") or _PRINCIPAL_ID_RE.match(actor_name):
                actor_id = actor_name
            else:
                actor_id = (await svc._principal(actor_name)).id
            op.details["actor"] = actor_name
        if action_filter is not None:
            if not _ACTION_FILTER_RE.match(action_filter):
                raise InvalidInput(
                    "The action filter is an action such as keys.revoke, or a prefix ending in '*' (keys.*)."
                )
            op.details["action"] = action_filter
        if target is not None:
            validate.check_text(target, "target filter", MAX_TARGET_LEN)
            if gateway_keys.looks_like_key(target):
                raise InvalidInput("That is a whole gateway key: filter on a key id (key:ID) instead.")
            op.details["target"] = target
        start, end = _note_range(op, since, until)
        return _Found({"actor": actor_id, "action": action_filter, "target": target}, start, end)

    def start(self, found: _Found) -> int | None:
        return None

    async def read(
        self, store: Store, found: _Found, at: int | None, want: int
    ) -> tuple[list[AuditEvent], bool, int | None]:
        events = await store.query_audit(**found.where, since=found.since, until=found.until, after_id=at, limit=want)
        after = events[-1].id if events else None
        return events, len(events) >= want and after is not None, after

    def view(self, row: AuditEvent, principal: str) -> AuditView:
        return AuditView.of(row, principal)

    def principal_of(self, row: AuditEvent) -> str:
        return row.actor


# Where a usage reading resumes: the `since` to ask from, the (at, id) last returned, and how
# many returned rows share that `at` (the store pages by time, so they come first again).
_UsageAt = tuple["datetime | None", "tuple[datetime, int] | None", int]


class _UsageKind(_Kind[UsageRecord, UsageView, _UsageAt]):
    """Usage: each principal's own, a manager's reach, everyone's for admins; paged by (at, id)."""

    name, unit = "usage", "records"

    async def filter(self, svc: AdminBase, actor: Actor, doing: str, op: Audit, since: datetime | None,
                     until: datetime | None, **given: str | None) -> _Found:  # fmt: skip
        principal_name, server_name, tool = given["principal_name"], given["server_name"], given["tool"]
        if server_name is not None:
            validate.check_name(server_name, "server")
            op.details["server"] = server_name
        if tool is not None:
            validate.check_tool(tool)
            op.details["tool"] = tool
        start, end = _note_range(op, since, until)
        principal_id: str | None
        visible: frozenset[str] | None = None
        if principal_name is not None:
            principal_id = (await svc._owned_principal(actor, doing, principal_name)).id
            op.details["principal"] = principal_name
        elif svc._sees_everyone(actor, doing):
            principal_id = None
            visible = svc._visible(actor, doing, await svc._store.list_principals())
            if visible is not None:
                visible |= {""}  # unauthenticated requests: nobody's
        else:
            me = await svc._store.get_principal(actor.principal_id)
            svc._authorize(actor, doing, me)
            principal_id = actor.principal_id
            op.details["principal"] = me.name if me else actor.principal_id
        return _Found({"principal_id": principal_id, "server": server_name, "tool": tool}, start, end, visible)

    def start(self, found: _Found) -> _UsageAt:
        return found.since, None, 0

    async def read(
        self, store: Store, found: _Found, at: _UsageAt, want: int
    ) -> tuple[list[UsageRecord], bool, _UsageAt]:
        since, last, repeated = at
        asked = want + repeated  # the rows already returned at the last `at` come first: skip them
        records = await store.query_usage(**found.where, since=since, until=found.until, limit=asked)
        fresh = [r for r in records if last is None or (r.at, r.id or 0) > last][:want]
        if not fresh:
            return [], False, at
        newest = (fresh[-1].at, fresh[-1].id or 0)
        same = sum(1 for r in fresh if r.at == newest[0])
        repeated = same + (repeated if last is not None and last[0] == newest[0] else 0)
        return fresh, len(records) >= asked, (newest[0], newest, repeated)

    def view(self, row: UsageRecord, principal: str) -> UsageView:
        return UsageView.of(row, principal)

    def principal_of(self, row: UsageRecord) -> str:
        return row.principal_id


_AUDIT = _AuditKind()
_USAGE = _UsageKind()


class RecordAdmin(AdminBase):
    async def query_audit(self, actor: Actor, actor_name: str | None = None, action: str | None = None,
                          target: str | None = None, since: datetime | None = None, until: datetime | None = None,
                          limit: int = DEFAULT_LIMIT) -> list[AuditView]:  # fmt: skip
        return await self._query(_AUDIT, actor, limit, since, until, actor_name=actor_name, action=action,
                                 target=target)  # fmt: skip

    async def export_audit(self, actor: Actor, actor_name: str | None = None, action: str | None = None,
                           target: str | None = None, since: datetime | None = None, until: datetime | None = None,
                           limit: int | None = None, page_size: int = PAGE_SIZE,
                           ) -> AsyncIterator[list[AuditView]]:  # fmt: skip
        return await self._export(_AUDIT, actor, limit, page_size, since, until, actor_name=actor_name, action=action,
                                  target=target)  # fmt: skip

    async def query_usage(self, actor: Actor, principal_name: str | None = None,
                          server_name: str | None = None, tool: str | None = None,
                          since: datetime | None = None, until: datetime | None = None,
                          limit: int = DEFAULT_LIMIT) -> list[UsageView]:  # fmt: skip
        return await self._query(_USAGE, actor, limit, since, until, principal_name=principal_name,
                                 server_name=server_name, tool=tool)  # fmt: skip

    async def export_usage(self, actor: Actor, principal_name: str | None = None,
                           server_name: str | None = None, tool: str | None = None,
                           since: datetime | None = None, until: datetime | None = None, limit: int | None = None,
                           page_size: int = PAGE_SIZE) -> AsyncIterator[list[UsageView]]:  # fmt: skip
        return await self._export(_USAGE, actor, limit, page_size, since, until, principal_name=principal_name,
                                  server_name=server_name, tool=tool)  # fmt: skip

    async def prune_usage(self, actor: Actor, before: datetime) -> int:
        async with self._audit(actor, "usage.prune", "usage") as op:
            self._authorize(actor, "usage.prune", None)
            cutoff = validate.as_utc(before)
            if cutoff > self._now():
                raise InvalidInput("The cutoff is in the future: prune deletes only records older than a past time.")
            pruned = await self._store.prune_usage(cutoff)
            op.details.update({"before": iso(cutoff) or "", "pruned": str(pruned)})
            return pruned

    # --- the one path of both kinds -------------------------------------------------------------

    async def _query(self, kind: _Kind[R, V, C], actor: Actor, limit: int, since: datetime | None,
                     until: datetime | None, **given: str | None) -> list[V]:  # fmt: skip
        doing = f"{kind.name}.query"
        async with self._audit(actor, doing, kind.name) as op:
            kind.gate(actor, doing)
            validate.check_count(limit, "The limit", kind.unit, MAX_LIMIT)
            found = await kind.filter(self, actor, doing, op, since, until, **given)
            # One store query when the actor sees every row; else read on until `limit` shown ones.
            views = [v async for page in self._pages(kind, found, limit, limit) for v in page]
            op.details.update({"limit": str(limit), "count": str(len(views))})
            return views

    async def _export(self, kind: _Kind[R, V, C], actor: Actor, limit: int | None, page_size: int,
                      since: datetime | None, until: datetime | None,
                      **given: str | None) -> AsyncIterator[list[V]]:  # fmt: skip
        doing = f"{kind.name}.export"
        async with self._audit(actor, doing, kind.name) as op:
            kind.gate(actor, doing)
            if limit is not None:
                validate.check_count(limit, "The limit", kind.unit)
                op.details["limit"] = str(limit)
            validate.check_count(page_size, "The page size", kind.unit, MAX_LIMIT)
            found = await kind.filter(self, actor, doing, op, since, until, **given)
        return self._pages(kind, found, limit, page_size)

    async def _pages(self, kind: _Kind[R, V, C], found: _Found, limit: int | None,
                     page_size: int) -> AsyncIterator[list[V]]:  # fmt: skip
        names: dict[str, str] = {}
        at = kind.start(found)
        remaining = limit
        while remaining is None or remaining > 0:
            want = page_size if remaining is None else min(page_size, remaining)
            rows, more, at = await kind.read(self._store, found, at, want)
            if not rows:
                return
            shown = [r for r in rows if kind.shows(found, r)]
            if shown:
                yield [kind.view(r, await self._name(kind.principal_of(r), names)) for r in shown]
            if remaining is not None:
                remaining -= len(shown)
            if not more:
                return

    async def _name(self, principal_id: str, names: dict[str, str]) -> str:
        """A row's principal by name, looked up once per id and kept in `names`: "-" for nobody
        (an unauthenticated request), "cli" for the local operator, the bare id when gone."""
        if principal_id in (CLI_ACTOR_ID, "-", ""):
            return principal_id or "-"
        if principal_id not in names:
            names[principal_id] = await self._principal_name(principal_id)
        return names[principal_id]
