"""AdminService, issue 4: credential status, `overrides test`, upstream URLs, the audit trail's
queries and exports, self-service defaults (principal None: the caller) and request ids."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from authz_server.admin.probe import ProbeFailed
from authz_server.admin.service import Actor, AdminService
from authz_server.admin.views import STATUS_INDICATORS
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import Argon2Params, KeyHasher
from authz_server.errors import InvalidInput, NotFound, PermissionDenied
from authz_server.models import Role
from authz_server.store.memory import MemoryStore

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from verify_signature import verify  # noqa: E402  (the upstream's recipe)

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
OP = Actor.operator()
FAST = Argon2Params(time_cost=1, memory_cost_kib=8, parallelism=1)
GOOD = "ghp_goodGOODgood0123456789"
BAD = "ghp_wrongWRONGwrong987654"


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class FakeProbe:
    """Answers like an upstream that accepts only `Bearer GOOD`, and remembers what it was sent."""

    accept: str = f"Bearer {GOOD}"
    answer: int | None = None  # a fixed status instead, or
    fail: bool = False  # no answer at all
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    async def initialize(self, url: str, headers: Sequence[tuple[str, str]]) -> int:
        self.calls.append((url, dict(headers)))
        if self.fail:
            raise ProbeFailed("no answer from the upstream (Connection refused)")
        if self.answer is not None:
            return self.answer
        return 200 if dict(headers).get("authorization") == self.accept else 401


@dataclass
class W:
    svc: AdminService
    store: MemoryStore
    clock: Clock
    probe: FakeProbe
    signing: str
    alice: Actor
    mia: Actor  # manager
    bob: Actor


@pytest.fixture
async def w() -> W:
    store = MemoryStore()
    await store.migrate()
    clock, probe = Clock(), FakeProbe()
    svc = AdminService(store, Keyring.from_spec(Keyring.generate_spec()), KeyHasher(FAST), clock, probe)
    await svc.initialize(OP)
    _, signing = await svc.add_server(
        OP, "github", "individual", ["Authorization: Bearer {{API_KEY}}"], upstream_url="http://127.0.0.1:9/mcp/github"
    )
    await svc.add_server(OP, "linear", "shared", ["Authorization: Bearer {{API_KEY}}"])
    await svc.add_server(OP, "open", "none")
    actors = {}
    for name, role in (("alice", Role.USER), ("mia", Role.MANAGER), ("bob", Role.USER)):
        view = await svc.add_principal(OP, name, "eng", [role])
        actors[name] = Actor(view.id, frozenset({role}), request_id=f"req-{name}", source="10.0.0.7")
    return W(svc, store, clock, probe, signing.reveal(), actors["alice"], actors["mia"], actors["bob"])


def _table(rows: list) -> dict[tuple[str, str], str]:
    return {(r.server, r.principal): r.status for r in rows}


async def test_status_table_configured_missing_invalid_expired(w: W) -> None:
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
    assert (alice.source, alice.masks, alice.updated_by, alice.indicator) == ("override", (("API_KEY", "ghp_…6789"),), "alice", "🟢")
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


async def test_a_user_sees_only_their_own_status_and_cannot_probe(w: W) -> None:
    assert [r.principal for r in await w.svc.credential_status(w.alice, "github")] == ["alice"]
    for name in ("bob", "ghost"):  # someone else's, or nobody's: the same refusal
        with pytest.raises(PermissionDenied):
            await w.svc.credential_status(w.alice, "github", name)
        with pytest.raises(PermissionDenied):
            await w.svc.test_override(w.alice, "github", name)


async def test_override_test_sends_what_check_would_send_and_records_the_result(w: W) -> None:
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


async def test_the_configured_signature_headers_are_reserved_and_signed_with() -> None:
    """The sidecar may rename its signature pair (Settings.signature_header, timestamp_header):
    templates may not set the configured names, and `overrides test` signs with them."""
    store = MemoryStore()
    await store.migrate()
    probe = FakeProbe()
    svc = AdminService(store, Keyring.from_spec(Keyring.generate_spec()), KeyHasher(FAST), Clock(), probe,
                       signature_header="X-Gw-Sig", timestamp_header="x-gw-ts")  # fmt: skip
    await svc.initialize(OP)
    for name in ("x-gw-sig", "X-GW-TS", "x-user-id"):
        with pytest.raises(InvalidInput, match="is reserved"):
            await svc.add_server(OP, "gh", "individual", [f"{name}: {{{{API_KEY}}}}"])
    # The default names are no longer the gateway's, so a template may use them.
    await svc.add_server(OP, "free", "individual", ["X-Mcp-Authz-Signature: {{API_KEY}}"])
    _, signing = await svc.add_server(OP, "github", "individual", ["Authorization: Bearer {{API_KEY}}"],
                                      upstream_url="http://127.0.0.1:9/mcp/github")  # fmt: skip
    await svc.add_principal(OP, "alice", "eng", ["user"])
    await svc.set_override(OP, "alice", "github", {"API_KEY": GOOD})
    assert (await svc.test_override(OP, "github", "alice")).result == "ok"
    (_, headers), = probe.calls
    assert "x-gw-sig" in headers and "x-gw-ts" in headers and "x-mcp-authz-signature" not in headers
    renamed = {"x-mcp-authz-signature": headers["x-gw-sig"], "x-mcp-authz-timestamp": headers["x-gw-ts"]}
    assert verify(signing.reveal(), "POST", "/mcp/github", {**headers, **renamed}) is True


async def test_override_test_needs_an_upstream_url_and_an_override(w: W) -> None:
    with pytest.raises(NotFound, match="no override"):
        await w.svc.test_override(w.alice, "github")
    await w.svc.set_override(OP, "alice", "linear", {"API_KEY": GOOD})
    with pytest.raises(InvalidInput, match="servers update linear --upstream-url"):
        await w.svc.test_override(w.alice, "linear")
    with pytest.raises(InvalidInput, match="none mode"):
        await w.svc.test_override(OP, "open", "alice")
    assert w.probe.calls == []


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("https://mcp.example.com/v1/mcp?team=x", None),
        ("http://127.0.0.1:9100/mcp/github", None),
        ("", None),  # clears it
        ("ftp://example.com/mcp", "http:// or https://"),
        ("https:///nohost", "http:// or https://"),
        ("https://user:ghp_secret123@example.com/mcp", "must not contain user info"),
        ("https://example.com/mcp#frag", "#fragment"),
        ("https://example.com/a b", "spaces"),
        ("https://example.com:99999/", "not a valid URL"),
        ("https://example.com/" + "a" * 3000, "longer than"),
    ],
)
async def test_upstream_urls_are_validated(w: W, url: str, error: str | None) -> None:
    if error is None:
        view = await w.svc.update_server(OP, "github", upstream_url=url)
        assert view.upstream_url == url and view.to_json()["upstream_url"] == url
    else:
        with pytest.raises(InvalidInput, match=error) as exc:
            await w.svc.update_server(OP, "github", upstream_url=url)
        assert "ghp_secret123" not in exc.value.message


async def test_update_server_is_for_admins_and_needs_a_change(w: W) -> None:
    with pytest.raises(PermissionDenied):
        await w.svc.update_server(w.mia, "github", description="x")
    with pytest.raises(InvalidInput, match="Nothing to change"):
        await w.svc.update_server(OP, "github")
    view = await w.svc.update_server(OP, "github", description="GitHub's MCP")
    assert (view.description, view.upstream_url) == ("GitHub's MCP", "http://127.0.0.1:9/mcp/github")


async def test_whoami_and_server_form_for_every_role(w: W) -> None:
    me = await w.svc.whoami(w.alice)
    assert (me.name, me.roles) == ("alice", ("user",))
    assert (await w.svc.whoami(OP)).id == "cli"
    form = await w.svc.server_form(w.alice, "github")
    assert (form.mode, [(p.name, p.required) for p in form.placeholders]) == ("individual", [("API_KEY", True)])
    with pytest.raises(PermissionDenied):
        await w.svc.server_form(Actor("p_nobody", frozenset()), "github")
    with pytest.raises(NotFound):
        await w.svc.server_form(w.alice, "ghost")


async def test_principal_none_means_the_caller_and_the_operator_must_name_one(w: W) -> None:
    view, key = await w.svc.create_key(w.alice, None, "laptop")
    assert view.principal == "alice" and key.reveal().startswith("mgw_")
    await w.svc.set_override(w.alice, None, "github", {"API_KEY": GOOD})
    await w.svc.delete_override(w.alice, None, "github")
    assert await w.svc.list_overrides(w.alice) == []
    with pytest.raises(InvalidInput, match="Name the principal"):
        await w.svc.set_override(OP, None, "github", {"API_KEY": GOOD})
    with pytest.raises(NotFound, match="alice has no override"):
        await w.svc.delete_override(w.alice, None, "github")


async def test_audit_query_filters_resolve_names_and_are_for_admins(w: W) -> None:
    await w.svc.set_override(w.alice, None, "github", {"API_KEY": GOOD})
    w.clock.now = T0 + timedelta(hours=1)
    await w.svc.set_override(w.mia, "bob", "github", {"API_KEY": BAD})
    events = await w.svc.query_audit(OP, action="overrides.set")
    assert [(e.actor, e.target, e.request_id) for e in events] == [
        ("alice", "override:(own)/github", "req-alice"),
        ("mia", "override:bob/github", "req-mia"),
    ]
    assert [e.actor for e in await w.svc.query_audit(OP, actor_name="mia")] == ["mia"]
    assert [e.target for e in await w.svc.query_audit(OP, target="override:bob/github")] == ["override:bob/github"]
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


async def test_audit_export_pages_through_everything_in_id_order(w: W) -> None:
    for i in range(7):
        await w.svc.list_servers(OP)
    pages = [page async for page in await w.svc.export_audit(OP, action="servers.list", page_size=3)]
    assert [len(p) for p in pages] == [3, 3, 1]
    ids = [e.id for page in pages for e in page]
    assert ids == sorted(ids) and len(set(ids)) == 7
    everything = [e async for page in await w.svc.export_audit(OP, page_size=2) for e in page]
    assert [e.id for e in everything] == [e.id for e in await w.svc.query_audit(OP, limit=100_000)][: len(everything)]
    assert (await w.svc.query_audit(OP, action="audit.export"))[-1].outcome == "ok"
