"""The one admin contract: `AdminOps` and its two implementations, and the wire table between them.

- every operation is on both sides with one signature (names, kinds, defaults);
- every argument the CLI gives a `RemoteAdmin` reaches the server unchanged, or is
  refused with a clear error: nothing is silently dropped.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import AsyncIterator, Iterable, Mapping
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import pytest

from authz_server.admin import rpcs, views, wire
from authz_server.admin.gen import admin_pb2 as pb
from authz_server.admin.ops import AdminOps
from authz_server.admin.policy import Actor
from authz_server.admin.remote import RemoteAdmin
from authz_server.admin.service import AdminService
from authz_server.admin.views import AuditView, PrincipalView
from authz_server.errors import InvalidInput
from authz_server.models import Placeholder, Secret

# Public coroutines that are not admin operations: the local operator's setup, and a client's own.
NOT_OPERATIONS = {AdminService: {"verify_master_key", "initialize"}, RemoteAdmin: {"close"}}
WHEN = datetime(2026, 3, 1, 12, 30, tzinfo=timezone.utc)


def _operations(cls: type) -> dict[str, Any]:
    return {n: getattr(cls, n) for n in dir(cls) if not n.startswith("_") and inspect.iscoroutinefunction(getattr(cls, n))}


def _shape(function: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]


def contract_gaps(cls: type) -> list[str]:
    """What `cls` does differently from AdminOps: missing or extra operations, other signatures."""
    declared = _operations(AdminOps)
    have = {n: f for n, f in _operations(cls).items() if n not in NOT_OPERATIONS.get(cls, set())}
    gaps = [f"{n}: not on {cls.__name__}" for n in sorted(set(declared) - set(have))]
    gaps += [f"{n}: not in AdminOps" for n in sorted(set(have) - set(declared))]
    gaps += [f"{n}: {_shape(have[n])} != {_shape(f)}" for n, f in declared.items() if n in have and _shape(have[n]) != _shape(f)]
    return gaps


@pytest.mark.parametrize("cls", [AdminService, RemoteAdmin])
def test_both_sides_implement_every_operation_with_its_one_signature(cls: type) -> None:
    assert len(_operations(AdminOps)) == 28
    assert contract_gaps(cls) == []


def test_the_check_sees_a_missing_an_extra_and_a_changed_operation() -> None:
    class Drifted(AdminService):
        async def whoami(self, actor: Actor, verbose: bool = False) -> Any:  # type: ignore[override]
            return None

        async def extra(self, actor: Actor) -> None:
            return None

    class Partial(RemoteAdmin):
        pass

    del_target = "list_teams"
    setattr(Partial, del_target, None)  # hides RemoteAdmin.list_teams
    gaps = contract_gaps(Drifted)
    assert "extra: not in AdminOps" in gaps and any(g.startswith("whoami:") for g in gaps)
    assert "list_teams: not on Partial" in contract_gaps(Partial)


# --- the wire table -------------------------------------------------------------------------


def _sample(name: str, hint: Any) -> Any:
    """A value of the argument's type that is not its default: it must arrive as it was given."""
    samples = {"mode": "shared", "kind": "service", "roles": ["manager"], "limit": 5, "grace_seconds": 300,
               "rate_limit_per_minute": 60, "values": {"API_KEY": "v"}}  # fmt: skip
    if name in samples:
        return samples[name]
    args = set(typing.get_args(hint)) or {hint}
    if datetime in args:
        return WHEN
    origin = typing.get_origin(hint)
    if origin is not None and issubclass(origin, Iterable) and origin is not str:
        return [f"{name}-1", f"{name}-2"]
    return f"{name}-x"


def _arguments(rpc: rpcs.Rpc) -> dict[str, Any]:
    method = getattr(AdminOps, rpc.op)
    hints = typing.get_type_hints(method)
    names = [p for p in inspect.signature(method).parameters if p not in ("self", "actor", *rpc.local)]
    return {n: rpc.fixed[n] if n in rpc.fixed else _sample(n, hints[n]) for n in names}


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    return list(value) if isinstance(value, (tuple, set)) else value


@pytest.mark.parametrize("rpc", rpcs.RPCS, ids=lambda r: r.name)
def test_every_argument_reaches_the_server_unchanged(rpc: rpcs.Rpc) -> None:
    given = _arguments(rpc)
    assert rpc.matches(given)
    received = rpc.arguments(rpc.build(given))
    assert received == {k: _plain(v) for k, v in given.items()}


@pytest.mark.parametrize("rpc", rpcs.RPCS, ids=lambda r: r.name)
def test_what_the_client_applies_itself_is_an_argument_without_a_field(rpc: rpcs.Rpc) -> None:
    parameters = inspect.signature(getattr(AdminOps, rpc.op)).parameters
    fields = set(rpc.request.DESCRIPTOR.fields_by_name)
    assert all(name in parameters and name not in fields for name in rpc.local)
    assert not any(name in fields for name in rpc.fixed)


def test_only_pruning_is_local_and_every_method_of_the_proto_is_served() -> None:
    served = {r.op for r in rpcs.RPCS}
    assert set(_operations(AdminOps)) - served == rpcs.LOCAL_ONLY == {"prune_usage"}
    assert {r.name for r in rpcs.RPCS} == {m.name for m in pb.DESCRIPTOR.services_by_name["Admin"].methods}


# --- RemoteAdmin, with a fake stub ----------------------------------------------------------


class _Stream:
    def __init__(self, messages: list[Any]) -> None:
        self.messages = messages
        self.cancelled = False

    def __aiter__(self) -> AsyncIterator[Any]:
        async def rows() -> AsyncIterator[Any]:
            for m in self.messages:
                if self.cancelled:
                    return
                yield m

        return rows()

    def cancel(self) -> None:
        self.cancelled = True


class FakeStub:
    """Records each call's method and request; answers with canned replies."""

    def __init__(self, replies: Mapping[str, Any]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, Any]] = []

    def __getattr__(self, method: str) -> Any:
        reply = self.replies[method]
        if isinstance(reply, _Stream):

            def stream(request: Any, metadata: Any = None) -> _Stream:
                self.calls.append((method, request))
                return reply

            return stream

        async def unary(request: Any, metadata: Any = None, timeout: float | None = None) -> Any:
            self.calls.append((method, request))
            return reply

        return unary


def _remote(replies: Mapping[str, Any]) -> tuple[RemoteAdmin, FakeStub]:
    remote = RemoteAdmin("127.0.0.1:1", Secret("mgw_" + "0" * 32))
    stub = FakeStub(replies)
    remote._stub = stub  # noqa: SLF001 - no sidecar in a unit test
    return remote, stub


ME = Actor.key_holder()


async def test_one_operation_picks_its_method_by_argument() -> None:
    reply = pb.Principal(id="p_000000000001", name="bob", kind="user", team="eng", roles=["user"], disabled=True)
    remote, stub = _remote({"DisablePrincipal": reply, "EnablePrincipal": reply})
    view = await remote.set_principal_disabled(ME, "bob", True)
    await remote.set_principal_disabled(ME, "bob", False)
    assert isinstance(view, PrincipalView) and view.disabled
    assert [(m, r.name) for m, r in stub.calls] == [("DisablePrincipal", "bob"), ("EnablePrincipal", "bob")]
    with pytest.raises(InvalidInput, match="disabled must be True or False"):
        await remote.set_principal_disabled(ME, "bob", "yes")  # type: ignore[arg-type]
    await remote.close()


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda r: r.list_principals(ME, ""), "empty team"),
        (lambda r: r.list_overrides(ME, server_name=""), "empty server_name"),
        (lambda r: r.add_principal(ME, "bob", "", ["user"]), "empty team cannot be sent: .* the default, 'default'"),
        (lambda r: r.add_principal(ME, "bob", "eng", []), "empty roles"),
        (lambda r: r.query_usage(ME, limit=0), "empty limit"),
        (lambda r: r.export_usage(ME, limit=0), "empty limit"),
        (lambda r: r.export_audit(ME, limit=0), "The limit must be a positive number of events"),
        (lambda r: r.export_usage(ME, page_size=0), "The page size must be between 1 and 100000 records"),
        (lambda r: r.regenerate_key(ME, "AbC1234", 2**40), "grace_seconds given has a type or size"),
        (lambda r: r.prune_usage(ME, WHEN), "prune_usage runs on the sidecar's host only"),
    ],
)
async def test_remote_refuses_what_would_not_arrive_as_given(call: Any, error: str) -> None:
    remote, stub = _remote({})
    with pytest.raises(InvalidInput, match=error):
        await call(remote)
    assert stub.calls == []  # refused before anything was sent
    await remote.close()


async def test_remote_acts_only_as_the_key_holder() -> None:
    remote, stub = _remote({"WhoAmI": pb.WhoAmIResponse(id="p_1", name="a")})
    with pytest.raises(ValueError, match="Actor.key_holder"):
        await remote.whoami(Actor.operator())
    assert stub.calls == []
    assert (await remote.whoami(ME)).name == "a"
    await remote.close()


async def test_remote_audit_export_pages_and_stops_at_its_limit() -> None:
    events = [pb.AuditEvent(id=i, actor="cli", action="whoami", target="self", outcome="ok") for i in range(1, 8)]
    stream = _Stream(events)
    remote, stub = _remote({"ExportAudit": stream})
    pages = await remote.export_audit(ME, action="whoami", limit=5, page_size=2)
    got = [page async for page in pages]
    assert [[v.id for v in page] for page in got] == [[1, 2], [3, 4], [5]]
    assert all(isinstance(v, AuditView) for page in got for v in page) and stream.cancelled
    ((method, request),) = stub.calls
    assert method == "ExportAudit" and request.action == "whoami"
    everything = await remote.export_audit(ME, page_size=3)
    stream.cancelled = False
    assert [len(page) async for page in everything] == [3, 3, 1]
    await remote.close()


# --- views over the wire ---------------------------------------------------------------------

_T = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
_VIEWS = [
    (wire.SERVER, views.ServerView("gh", "shared", ("A: {{X}}",), (("X", True), ("Y", False)), (("X", "ab…cd"),),
                                   "configured", True, "d", "http://x", _T, _T)),
    (wire.SERVER, views.ServerView("gh", "none", (), (), (), None, False, "", "", None, None)),
    (wire.FORM, views.ServerFormView("gh", "individual", (Placeholder("X", True), Placeholder("Y", False)))),
    (wire.PRINCIPAL, views.PrincipalView("p_1", "a", "user", "eng", ("admin", "user"), True, 60, _T)),
    (wire.PRINCIPAL, views.PrincipalView("p_1", "a", "user", "eng", ("user",), False, None, None)),
    (wire.TEAM, views.TeamView("eng", True, None)),
    (wire.KEY, views.GatewayKeyView("AbC1234", "a", "l", _T, _T, None, _T, ("gh", "gh:t"), "active")),
    (wire.OVERRIDE, views.OverrideView("a", "user", "gh", (("A", "m"),), "cli", _T, _T, "configured", "r")),
    (wire.OVERRIDE, views.OverrideView("a", "", "gh", (), "cli", _T, None, "invalid", "")),
    (wire.STATUS, views.CredentialStatusView("gh", "shared", "a", "user", "eng", "missing", "", (), "", None, "")),
    (wire.OVERRIDE_TEST, views.OverrideTestView("a", "gh", "ok", 200, "d", "configured")),
    (wire.AUDIT, views.AuditView(5, _T, "a", "p_1", "x.y", "t", "ok", "r", (("k", "v"), ("z", "w")))),
    (wire.AUDIT, views.AuditView(None, _T, "-", "-", "authn.failure", "-", "key_unknown", "", ())),
    (wire.USAGE, views.UsageView(3, _T, "r", "a", "p", "k", "s", "t", "m", "allow", "", 200, 1, 2, 3.5)),
    (wire.WHOAMI, views.WhoAmIView("p", "a", "user", "eng", ("user",))),
]  # fmt: skip


@pytest.mark.parametrize(("codec", "view"), _VIEWS)
def test_a_view_comes_back_from_its_message_as_it_was(codec: wire.ViewCodec[Any, Any], view: Any) -> None:
    assert codec.view(codec.message(view)) == view


def test_an_empty_message_reads_as_nothing_given() -> None:
    audit = wire.AUDIT.view(pb.AuditEvent())
    assert (audit.id, audit.at, audit.details) == (None, datetime.fromtimestamp(0, timezone.utc), ())
    server = wire.SERVER.view(pb.Server())
    assert (server.shared_status, server.created_at, server.placeholders) == (None, None, ())
    assert wire.PRINCIPAL.view(pb.Principal()).rate_limit_per_minute is None
