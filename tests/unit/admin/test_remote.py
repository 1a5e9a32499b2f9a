"""admin/remote.py, `RemoteAdmin` with a fake stub: the method an operation picks, what it refuses
before sending, who it acts as, and exports that page and stop at their limit."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import pytest

from authz_server.admin.gen import admin_pb2 as pb
from authz_server.admin.policy import Actor
from authz_server.admin.remote import RemoteAdmin
from authz_server.admin.views import AuditView, PrincipalView
from authz_server.errors import InvalidInput
from authz_server.models import Secret

from ..fakes import FakeStream, FakeStub

WHEN = datetime(2026, 3, 1, 12, 30, tzinfo=timezone.utc)


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
    stream = FakeStream(events)
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
