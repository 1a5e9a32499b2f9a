"""admin/overrides.py: overrides (validation, sealing, listing, deleting), the credential status
table, and `overrides test`, which sends what Check would send to the upstream."""

from __future__ import annotations

from datetime import timedelta

import pytest

from authz_server.admin.service import Actor
from authz_server.admin.views import STATUS_INDICATORS
from authz_server.crypto.cipher import aad_override, aad_shared
from authz_server.errors import CorruptRow, InvalidInput, NotFound, PermissionDenied
from authz_server.models import OverrideStatus, PrincipalKind, Role

from ..fakes import (
    BAD,
    CLIENT_ID,
    GH_TOKEN,
    GOOD,
    LINEAR_TOKEN,
    OP,
    T0,
    AdminWorld,
    FakeProbe,
    SelfServiceWorld,
    add_github,
    add_multi,
    example,
)

verify = example("verify_signature").verify  # the upstream's recipe

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
async def test_override_value_validation(world: AdminWorld, values: dict[str, str], message: str) -> None:
    w = world
    await add_multi(w)
    await w.svc.add_principal(OP, "bob", "default", ["user"])
    with pytest.raises(InvalidInput) as info:
        await w.svc.set_override(OP, "bob", "crm", values)
    assert message in info.value.message
    assert SECRET_VALUE not in info.value.message and GH_TOKEN not in info.value.message
    assert await w.store.list_overrides() == []
    (event,) = await w.store.query_audit(action="overrides.set")
    assert event.outcome == "error" and SECRET_VALUE not in str(event)


async def test_override_8kib_boundary_and_optional(world: AdminWorld) -> None:
    w = world
    await add_multi(w)
    await w.svc.add_principal(OP, "bob", "default", ["user"])
    view = await w.svc.set_override(OP, "bob", "crm", {"API_KEY": "k" * 8192, "CLIENT_ID": CLIENT_ID})
    assert dict(view.masks) == {"API_KEY": "…kkkk", "CLIENT_ID": "…tish"}
    view = await w.svc.set_override(OP, "bob", "crm", {"API_KEY": "short123", "CLIENT_ID": "c", "TRACE": "t" * 20})
    assert dict(view.masks) == {"API_KEY": "…23", "CLIENT_ID": "…", "TRACE": "…tttt"}


async def test_set_override_seals_to_row_and_records_who(world: AdminWorld) -> None:
    w = world
    await add_github(w)
    bob = await w.svc.add_principal(OP, "bob", "default", ["user"])
    carol = await w.svc.add_principal(OP, "carol", "default", ["manager"])
    w.clock.advance(minutes=3)
    view = await w.svc.set_override(OP, "bob", "github", {"API_KEY": GH_TOKEN})
    w.secrets.append(GH_TOKEN)
    assert (view.principal, view.kind, view.server, view.updated_by, view.status) == (
        "bob", "user", "github", "cli", "configured"
    )
    assert dict(view.masks) == {"API_KEY": "…6789"} and view.updated_at == T0 + timedelta(minutes=3)
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
        "values": {"API_KEY": "…9876"},
        "updated_by": "carol",
        "updated_at": "2026-03-01T12:03:00Z",
        "expires_at": None,
        "status": "configured",
        "status_reason": "",
    }


async def test_override_refusals_listing_and_delete(world: AdminWorld) -> None:
    w = world
    await w.svc.add_server(OP, "public", "none")
    await add_github(w)
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


# --- credential status and `overrides test` ------------------------------------------------------


def _table(rows: list) -> dict[tuple[str, str], str]:
    return {(r.server, r.principal): r.status for r in rows}


async def test_status_table_configured_missing_invalid_expired(w: SelfServiceWorld) -> None:
    await w.svc.set_override(w.alice, None, "github", {"API_KEY": GOOD})  # her own, principal implied
    await w.svc.set_override(w.mia, "bob", "github", {"API_KEY": BAD}, expires_at=T0 + timedelta(minutes=5))
    rows = await w.svc.credential_status(w.mia, "github")
    # Everyone the manager may act on: the admin outranks her, so is left out.
    assert [r.principal for r in rows] == ["alice", "bob", "mia"]
    assert [r.principal for r in await w.svc.credential_status(OP, "github")] == ["admin", "alice", "bob", "mia"]
    assert _table(rows) == {
        ("github", "alice"): "configured",
        ("github", "bob"): "configured",
        ("github", "mia"): "missing",
    }
    alice = next(r for r in rows if r.principal == "alice")
    assert (alice.source, alice.masks, alice.updated_by, alice.indicator) == ("override", (("API_KEY", "…6789"),), "alice", "🟢")
    assert next(r for r in rows if r.principal == "mia").indicator == STATUS_INDICATORS["missing"] == "🟡"

    # The upstream rejects bob's value: invalid. Time passes: expired wins.
    result = await w.svc.test_override(w.mia, "github", "bob")
    assert (result.result, result.http_status, result.status) == ("rejected", 401, "invalid")
    assert _table(await w.svc.credential_status(w.mia, "github", "bob")) == {("github", "bob"): "invalid"}
    w.clock.now = T0 + timedelta(minutes=6)
    (bob,) = await w.svc.credential_status(w.mia, "github", "bob")
    assert (bob.status, bob.indicator) == ("expired", "⏰") and "set it again" in bob.reason
    (listed,) = await w.svc.list_overrides(w.mia, "github", "bob")
    assert listed.status == "expired" and listed.expires_at == T0 + timedelta(minutes=5)

    # Shared servers: covered by the default once it is set; none-mode servers are not listed.
    assert _table(await w.svc.credential_status(w.mia, None, "alice")) == {
        ("github", "alice"): "configured",
        ("linear", "alice"): "missing",
    }
    await w.svc.set_shared(OP, "linear", {"API_KEY": "lin_shared_value_123456"})
    (linear,) = await w.svc.credential_status(w.mia, "linear", "alice")
    assert (linear.status, linear.source) == ("configured", "shared")
    with pytest.raises(InvalidInput, match="none mode"):
        await w.svc.credential_status(w.mia, "open")


async def test_a_user_sees_only_their_own_status_and_cannot_probe(w: SelfServiceWorld) -> None:
    assert [r.principal for r in await w.svc.credential_status(w.alice, "github")] == ["alice"]
    for name in ("bob", "ghost"):  # someone else's, or nobody's: the same refusal
        with pytest.raises(PermissionDenied):
            await w.svc.credential_status(w.alice, "github", name)
        with pytest.raises(PermissionDenied):
            await w.svc.test_override(w.alice, "github", name)


async def test_override_test_sends_what_check_would_send_and_records_the_result(w: SelfServiceWorld) -> None:
    await w.svc.set_override(w.alice, None, "github", {"API_KEY": GOOD})
    result = await w.svc.test_override(w.alice, "github")
    assert (result.principal, result.result, result.http_status, result.status) == ("alice", "ok", 200, "configured")
    (url, headers), = w.probe.calls
    assert url == "http://127.0.0.1:9/mcp/github"
    assert headers["authorization"] == f"Bearer {GOOD}"
    assert (headers["x-user-id"], headers["x-user-type"], headers["x-user-team"], headers["x-user-roles"]) == (
        "alice", "user", "eng", "user")
    assert headers["x-request-id"] == "req-alice"
    # Signed like a request through the gateway, so an upstream that checks signatures accepts it.
    assert verify(w.signing, "POST", "/mcp/github", headers) is True

    # Rejected: invalid, with the reason; setting it again makes it configured.
    await w.svc.set_override(w.alice, None, "github", {"API_KEY": BAD})
    assert (await w.svc.test_override(w.alice, "github")).status == "invalid"
    stored = (await w.svc.list_overrides(w.alice, "github"))[0]
    assert stored.status == "invalid" and "overrides test: upstream answered 401" in stored.status_reason
    # Neither an error status nor no answer changes anything.
    for probe in (FakeProbe(answer=502), FakeProbe(fail=True)):
        w.svc._probe = probe  # noqa: SLF001 - swap the fake's behaviour
        result = await w.svc.test_override(w.alice, "github")
        assert (result.result, result.status) == ("inconclusive", "invalid")
    assert result.http_status == 0 and "Connection refused" in result.detail

    events = [e for e in await w.store.query_audit(action="overrides.test")]
    assert [e.details["result"] for e in events] == ["ok", "rejected", "inconclusive", "inconclusive"]
    assert all(e.request_id == "req-alice" and e.details["source"] == "10.0.0.7" for e in events)
    assert not any(GOOD in str(e) or BAD in str(e) for e in await w.store.query_audit(limit=10_000))


async def test_override_test_needs_an_upstream_url_and_an_override(w: SelfServiceWorld) -> None:
    with pytest.raises(NotFound, match="no override"):
        await w.svc.test_override(w.alice, "github")
    await w.svc.set_override(OP, "alice", "linear", {"API_KEY": GOOD})
    with pytest.raises(InvalidInput, match="servers update linear --upstream-url"):
        await w.svc.test_override(w.alice, "linear")
    with pytest.raises(InvalidInput, match="none mode"):
        await w.svc.test_override(OP, "open", "alice")
    assert w.probe.calls == []
