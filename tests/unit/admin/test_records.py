"""admin/records.py: the audit trail and usage records: who sees which, filters, paging exports,
pruning, and the audit event each query leaves."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest

from authz_server.admin.ops import MAX_LIMIT as MAX_USAGE_LIMIT
from authz_server.admin.service import Actor, AdminService
from authz_server.admin.views import UsageView
from authz_server.errors import InvalidInput, NotFound, PermissionDenied
from authz_server.models import Role, UsageRecord
from authz_server.store.memory import MemoryStore

from ..fakes import BAD, GOOD, OP, T0, AdminWorld, SelfServiceWorld


# --- the audit trail ------------------------------------------------------------------------------


async def test_audit_query_filters_resolve_names_and_are_for_admins(w: SelfServiceWorld) -> None:
    await w.svc.set_override(w.alice, None, "github", {"API_KEY": GOOD})
    w.clock.now = T0 + timedelta(hours=1)
    await w.svc.set_override(w.mia, "bob", "github", {"API_KEY": BAD})
    events = await w.svc.query_audit(OP, action="overrides.set")
    assert [(e.actor, e.target, e.request_id) for e in events] == [
        ("alice", "override:alice/github", "req-alice"),
        ("mia", "override:bob/github", "req-mia"),
    ]
    assert [e.actor for e in await w.svc.query_audit(OP, actor_name="mia")] == ["mia"]
    assert [e.target for e in await w.svc.query_audit(OP, target="override:bob/github")] == ["override:bob/github"]
    # A user's own change is audited under their name, so the target filter finds it.
    assert [e.actor for e in await w.svc.query_audit(OP, target="override:alice/github")] == ["alice"]
    assert len(await w.svc.query_audit(OP, action="overrides.*", since=T0 + timedelta(minutes=30))) == 1
    assert {e.actor for e in await w.svc.query_audit(OP, actor_name="cli", action="servers.*")} == {"cli"}
    first = (await w.svc.query_audit(OP, limit=1))[0]
    assert first.action == "init" and first.to_json()["details"]["team"] == "default"
    for bad, message in (({"action": "rm -rf"}, "action filter"), ({"limit": 0}, "limit"),
                         ({"since": T0, "until": T0}, "before its end")):
        with pytest.raises(InvalidInput, match=message):
            await w.svc.query_audit(OP, **bad)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await w.svc.query_audit(OP, actor_name="ghost")
    for actor in (w.mia, w.alice):
        with pytest.raises(PermissionDenied):
            await w.svc.query_audit(actor)
        with pytest.raises(PermissionDenied):
            await w.svc.export_audit(actor)


async def test_audit_export_pages_through_everything_in_id_order(w: SelfServiceWorld) -> None:
    for i in range(7):
        await w.svc.list_servers(OP)
    pages = [page async for page in await w.svc.export_audit(OP, action="servers.list", page_size=3)]
    assert [len(p) for p in pages] == [3, 3, 1]
    ids = [e.id for page in pages for e in page]
    assert ids == sorted(ids) and len(set(ids)) == 7
    everything = [e async for page in await w.svc.export_audit(OP, page_size=2) for e in page]
    assert [e.id for e in everything] == [e.id for e in await w.svc.query_audit(OP, limit=100_000)][: len(everything)]
    assert (await w.svc.query_audit(OP, action="audit.export"))[-1].outcome == "ok"


# --- usage ------------------------------------------------------------------------------------------

LEAKY = "ghp_SecretTOKENpastedByMistake12345"  # not a valid name: must never be echoed


def _at(minutes_ago: float) -> datetime:
    return T0 - timedelta(minutes=minutes_ago)


def _record(
    minutes_ago: float, principal_id: str, server: str = "github", tool: str = "search", **kw: object
) -> UsageRecord:
    fields: dict[str, object] = {
        "request_id": f"req-{principal_id or 'anon'}-{server}-{minutes_ago}",
        "key_id": f"K{principal_id[-6:]}" if principal_id else "",
        "mcp_method": "tools/call" if tool else "initialize",
        "decision": "allow",
        "reason": "",
        "upstream_status": 200,
        "request_bytes": 300,
        "response_bytes": 1500,
        "duration_ms": 4.25,
    }
    fields.update(kw)
    return UsageRecord(
        at=_at(minutes_ago), principal_id=principal_id, server=server, tool=tool, **fields  # type: ignore[arg-type]
    )


@dataclasses.dataclass
class People:
    admin: Actor
    manager: Actor
    uma: Actor  # a user
    ulf: Actor  # another user
    nobody: Actor  # a principal with no role at all
    ids: dict[str, str]


@pytest.fixture
async def people(world: AdminWorld) -> People:
    w = world
    ids = {}
    for name, roles in (("adm", ["admin"]), ("mia", ["manager"]), ("uma", ["user"]), ("ulf", ["user"])):
        ids[name] = (await w.svc.add_principal(OP, name, "default", roles)).id
    ids["gone"] = "p_GoneGoneGone"  # a principal id no longer in the store
    await w.store.append_usage(
        [
            _record(50, ids["uma"]),  # 0
            _record(40, ids["ulf"]),  # 1
            _record(30, "", tool="", decision="deny", reason="key_missing", upstream_status=401),  # 2
            _record(20, ids["uma"], server="slack", tool="post"),  # 3
            _record(10, ids["gone"], tool="create_issue"),  # 4
            _record(5, ids["uma"], tool="create_issue", upstream_status=502, duration_ms=1234.5),  # 5
        ]
    )
    return People(
        admin=Actor(ids["adm"], frozenset({Role.ADMIN})),
        manager=Actor(ids["mia"], frozenset({Role.MANAGER})),
        uma=Actor(ids["uma"], frozenset({Role.USER})),
        ulf=Actor(ids["ulf"], frozenset({Role.USER})),
        nobody=Actor("p_NoRolesAtAll", frozenset()),
        ids=ids,
    )


def _ids(views: list[UsageView]) -> list[str]:
    return [v.request_id for v in views]


async def _all_request_ids(w: AdminWorld) -> list[str]:
    return [r.request_id for r in await w.store.query_usage(limit=100)]


# --- who sees what -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "principal", "expected"),
    [
        ("admin", None, [0, 1, 2, 3, 4, 5]),
        ("manager", None, [0, 1, 2, 3, 5]),  # not 4: whose it was (and their rank) is unknown
        ("operator", None, [0, 1, 2, 3, 4, 5]),
        ("admin", "ulf", [1]),
        ("manager", "uma", [0, 3, 5]),
        ("uma", None, [0, 3, 5]),  # silently narrowed to their own
        ("uma", "uma", [0, 3, 5]),
        ("ulf", None, [1]),
    ],
)
async def test_who_sees_which_records(
    world: AdminWorld, people: People, who: str, principal: str | None, expected: list[int]
) -> None:
    actor = OP if who == "operator" else getattr(people, who)
    everything = await _all_request_ids(world)
    views = await world.svc.query_usage(actor, principal_name=principal)
    assert _ids(views) == [everything[i] for i in expected]
    (event,) = await world.store.query_audit(action="usage.query")
    assert (event.actor, event.outcome, event.target) == (actor.principal_id, "ok", "usage")
    assert event.details["count"] == str(len(expected))


async def test_a_user_cannot_see_others_or_learn_who_exists(world: AdminWorld, people: People) -> None:
    messages = []
    for name in ("ulf", "nobody-by-that-name", "adm"):
        with pytest.raises(PermissionDenied) as caught:
            await world.svc.query_usage(people.uma, principal_name=name)
        messages.append(caught.value.message)
        with pytest.raises(PermissionDenied):  # refused when asked, before any page is read
            await world.svc.export_usage(people.uma, principal_name=name)
    assert len(set(messages)) == 1 and not any(n in messages[0] for n in ("ulf", "nobody", "adm"))
    with pytest.raises(PermissionDenied):
        await world.svc.query_usage(people.nobody)  # no role: not even their own
    denied = await world.store.query_audit(action="usage.*")
    assert [e.outcome for e in denied] == ["denied"] * 7
    assert all("principal" not in e.details for e in denied)


async def test_only_admins_learn_that_a_name_does_not_exist(world: AdminWorld, people: People) -> None:
    with pytest.raises(NotFound, match="No principal named ghost"):
        await world.svc.query_usage(people.admin, principal_name="ghost")
    # A manager is refused on a name that does not exist exactly as on an admin's: the refusal
    # must not tell which names are admins.
    messages = []
    for name in ("ghost", "adm"):
        with pytest.raises(PermissionDenied) as caught:
            await world.svc.query_usage(people.manager, principal_name=name)
        messages.append(caught.value.message)
    assert messages[0] == messages[1]


async def test_a_manager_never_sees_an_admins_records(world: AdminWorld, people: People) -> None:
    """Usage records follow the role rule: an admin outranks a manager, so theirs are hidden
    from a manager's listings; a manager's own and other managers' and users' are shown."""
    mine = [_record(45 - i, people.ids["adm"], request_id=f"adm-{i}") for i in range(5)]
    await world.store.append_usage([*mine, _record(1, people.ids["mia"], request_id="mia-own")])
    everything = await _all_request_ids(world)
    seen = _ids(await world.svc.query_usage(people.manager))
    assert not any(r.startswith("adm-") for r in seen) and "mia-own" in seen
    assert seen == [r for r in everything if not r.startswith("adm-") and "Gone" not in r]
    assert sum(r.startswith("adm-") for r in _ids(await world.svc.query_usage(people.admin))) == 5
    # A limit counts what is shown: the hidden records do not use it up.
    assert _ids(await world.svc.query_usage(people.manager, limit=3)) == seen[:3]
    assert _ids(await world.svc.query_usage(people.manager, limit=1, server_name="github")) == seen[:1]
    # Exports, whatever the page size and limit, show the same.
    for size in (1, 2, 3, 100):
        pages = await _collect(await world.svc.export_usage(people.manager, page_size=size))
        assert _ids([v for p in pages for v in p]) == seen, size
        assert all(1 <= len(p) <= size for p in pages)
        capped = await _collect(await world.svc.export_usage(people.manager, limit=4, page_size=size))
        assert _ids([v for p in capped for v in p]) == seen[:4], size
    assert _ids(await world.svc.query_usage(people.manager, principal_name="mia")) == ["mia-own"]
    with pytest.raises(PermissionDenied):
        await world.svc.export_usage(people.manager, principal_name="adm")


# --- what a view holds --------------------------------------------------------------------------------


async def test_views_name_principals_and_hold_every_field(world: AdminWorld, people: People) -> None:
    views = await world.svc.query_usage(OP)
    assert [v.principal for v in views] == ["uma", "ulf", "-", "uma", "p_GoneGoneGone", "uma"]
    stored = await world.store.query_usage()
    assert [v.id for v in views] == [r.id for r in stored]
    assert views[5].to_json() == {
        "id": stored[5].id,
        "at": "2026-03-01T11:55:00Z",
        "request_id": "req-" + people.ids["uma"] + "-github-5",
        "principal": "uma",
        "principal_id": people.ids["uma"],
        "key_id": "K" + people.ids["uma"][-6:],
        "server": "github",
        "tool": "create_issue",
        "mcp_method": "tools/call",
        "decision": "allow",
        "reason": "",
        "upstream_status": 502,
        "request_bytes": 300,
        "response_bytes": 1500,
        "duration_ms": 1234.5,
    }
    anonymous = views[2].to_json()
    assert (anonymous["principal"], anonymous["principal_id"], anonymous["key_id"]) == ("-", "", "")
    assert (anonymous["decision"], anonymous["reason"], anonymous["upstream_status"]) == ("deny", "key_missing", 401)


# --- filters --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"server_name": "github"}, [0, 1, 2, 4, 5]),
        ({"server_name": "slack"}, [3]),
        ({"server_name": "removed-server"}, []),  # servers are matched by name, even gone ones
        ({"tool": "create_issue"}, [4, 5]),
        ({"since": _at(30)}, [2, 3, 4, 5]),  # inclusive
        ({"until": _at(30)}, [0, 1]),  # exclusive
        ({"since": _at(45), "until": _at(10)}, [1, 2, 3]),
        ({"principal_name": "uma", "server_name": "github", "tool": "create_issue"}, [5]),
        ({"principal_name": "uma", "since": _at(25), "limit": 1}, [3]),
        ({"limit": 2}, [0, 1]),  # the oldest first
        # A naive datetime is taken as UTC.
        ({"since": _at(30).replace(tzinfo=None)}, [2, 3, 4, 5]),
        ({"until": _at(30).astimezone(timezone(timedelta(hours=-5)))}, [0, 1]),
    ],
)
async def test_filters_combine(world: AdminWorld, people: People, filters: dict, expected: list[int]) -> None:
    everything = await _all_request_ids(world)
    assert _ids(await world.svc.query_usage(people.admin, **filters)) == [everything[i] for i in expected]


async def test_filters_are_validated_without_echoing_them(world: AdminWorld, people: People) -> None:
    cases = [
        ({"server_name": LEAKY}, "server name is invalid"),
        ({"tool": f"tool {LEAKY}"}, "tool name is invalid"),
        ({"principal_name": LEAKY}, "principal name is invalid"),
        ({"since": _at(5), "until": _at(10)}, "must be before its end"),
        ({"since": _at(5), "until": _at(5)}, "must be before its end"),
        ({"limit": 0}, "between 1 and"),
        ({"limit": MAX_USAGE_LIMIT + 1}, "between 1 and"),
    ]
    for filters, message in cases:
        with pytest.raises(InvalidInput, match=message) as caught:
            await world.svc.query_usage(OP, **filters)
        assert LEAKY not in caught.value.message
    events = await world.store.query_audit(action="usage.query")
    assert [e.outcome for e in events] == ["error"] * len(cases)
    assert LEAKY not in "\n".join(repr(e) for e in events)


async def test_the_audit_event_records_the_filters(world: AdminWorld, people: People) -> None:
    await world.svc.query_usage(
        people.manager, principal_name="uma", server_name="github", tool="search", since=_at(60), until=T0, limit=7
    )
    await world.svc.query_usage(people.ulf)
    manager_event, user_event = await world.store.query_audit(action="usage.query")
    assert manager_event.details == {
        "principal": "uma",
        "server": "github",
        "tool": "search",
        "since": "2026-03-01T11:00:00Z",
        "until": "2026-03-01T12:00:00Z",
        "limit": "7",
        "count": "1",
    }
    assert user_event.details == {"principal": "ulf", "limit": "1000", "count": "1"}


# --- export ------------------------------------------------------------------------------------------------


async def _collect(pages: object) -> list[list[UsageView]]:
    return [page async for page in pages]  # type: ignore[attr-defined]


async def test_export_pages_through_everything_once_in_order(world: AdminWorld, people: People) -> None:
    pages = await _collect(await world.svc.export_usage(OP, page_size=4))
    assert [len(p) for p in pages] == [4, 2]
    exported = [v for page in pages for v in page]
    assert exported == await world.svc.query_usage(OP)
    # One audit event for the whole export, however many pages.
    assert [(e.action, e.outcome) for e in await world.store.query_audit(action="usage.export")] == [
        ("usage.export", "ok")
    ]


async def test_export_pages_through_records_sharing_one_instant(world: AdminWorld, people: People) -> None:
    crowd = [_record(15, people.ids["ulf"], request_id=f"crowd-{i}") for i in range(7)]
    await world.store.append_usage(crowd[:3])
    await world.store.append_usage([_record(15.5, people.ids["ulf"], request_id="just-before")])
    await world.store.append_usage(crowd[3:])
    expected = _ids(await world.svc.query_usage(OP))
    assert expected.index("just-before") + 1 == expected.index("crowd-0")
    for size in (1, 2, 3, 5, 100):
        pages = await _collect(await world.svc.export_usage(OP, page_size=size))
        assert _ids([v for page in pages for v in page]) == expected, size
        assert all(1 <= len(p) <= size for p in pages)


async def test_export_limit_filters_and_a_users_own_records(world: AdminWorld, people: People) -> None:
    capped = await _collect(await world.svc.export_usage(OP, limit=5, page_size=2))
    assert [len(p) for p in capped] == [2, 2, 1]
    everything = await _all_request_ids(world)
    assert _ids([v for p in capped for v in p]) == everything[:5]
    mine = await _collect(await world.svc.export_usage(people.uma, page_size=2))
    assert {v.principal for p in mine for v in p} == {"uma"} and sum(map(len, mine)) == 3
    github_since = await _collect(await world.svc.export_usage(people.manager, server_name="github", since=_at(30)))
    assert _ids([v for p in github_since for v in p]) == [everything[i] for i in (2, 5)]  # 4: a gone principal's
    with pytest.raises(InvalidInput):
        await world.svc.export_usage(OP, limit=0)
    with pytest.raises(InvalidInput):
        await world.svc.export_usage(OP, page_size=0)


async def test_export_reads_lazily_and_includes_later_records(world: AdminWorld, people: People) -> None:
    pages = await world.svc.export_usage(OP, page_size=4)
    first = await anext(pages)  # type: ignore[call-overload]
    await world.store.append_usage([_record(1, people.ids["uma"], request_id="written-during-export")])
    rest = [v for page in [p async for p in pages] for v in page]  # type: ignore[attr-defined]
    assert len(first) == 4 and _ids(rest)[-1] == "written-during-export" and len(rest) == 3


async def test_export_queries_the_store_one_page_at_a_time(world: AdminWorld, people: People) -> None:
    calls: list[int] = []
    real = world.store.query_usage

    async def spy(**kw: object) -> list[UsageRecord]:
        calls.append(kw["limit"])  # type: ignore[arg-type]
        return await real(**kw)  # type: ignore[arg-type]

    world.store.query_usage = spy  # type: ignore[method-assign]
    await world.store.append_usage([_record(2 - i / 100, "", request_id=f"bulk-{i}") for i in range(20)])
    pages = await _collect(await world.svc.export_usage(OP, page_size=10))
    assert [len(p) for p in pages] == [10, 10, 6]
    # A page, then a page plus the one record seen again at the last page's instant; never everything.
    assert calls == [10, 11, 11]


# --- prune ---------------------------------------------------------------------------------------------------


async def test_prune_is_for_admins_and_audited(world: AdminWorld, people: People) -> None:
    for actor in (people.manager, people.uma):
        with pytest.raises(PermissionDenied):
            await world.svc.prune_usage(actor, _at(0))
    assert len(await world.store.query_usage()) == 6
    with pytest.raises(InvalidInput, match="future"):
        await world.svc.prune_usage(OP, T0 + timedelta(minutes=1))
    assert await world.svc.prune_usage(people.admin, _at(20)) == 3  # strictly older than 20 minutes ago
    assert await world.svc.prune_usage(OP, _at(20).replace(tzinfo=None)) == 0
    assert _ids(await world.svc.query_usage(OP)) == [r.request_id for r in await world.store.query_usage()]
    assert len(await world.store.query_usage()) == 3
    events = await world.store.query_audit(action="usage.prune")
    assert [e.outcome for e in events] == ["denied", "denied", "error", "ok", "ok"]
    assert events[3].details == {"before": "2026-03-01T11:40:00Z", "pruned": "3"}
    assert events[3].actor == people.ids["adm"]


async def test_usage_operations_never_log_changes() -> None:
    store = MemoryStore()
    await store.migrate()
    svc = AdminService(store, None, None)  # type: ignore[arg-type] - usage needs neither keyring nor hasher
    await store.append_usage([_record(5, "")])
    assert len(await svc.query_usage(OP)) == 1
    assert await svc.prune_usage(OP, datetime.now(timezone.utc)) == 1
    assert await store.changes_since(0) == []
