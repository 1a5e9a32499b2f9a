"""admin/servers.py: adding MCP servers (templates, placeholders, signing secrets), shared values,
updates and upstream URLs, rotation and removal."""

from __future__ import annotations

from datetime import timedelta

import pytest

from authz_server.admin.policy import Actor
from authz_server.crypto.cipher import aad_override, aad_shared, aad_signing
from authz_server.errors import Conflict, CorruptRow, InvalidInput, NotFound, PermissionDenied
from authz_server.models import AuthMode

from ..fakes import CLIENT_ID, GH_TOKEN, OP, T0, AdminWorld, SelfServiceWorld, add_github, add_multi

BEARER = ["Authorization: Bearer {{API_KEY}}"]


@pytest.mark.parametrize(
    ("name", "mode", "headers", "optional", "message"),
    [
        ("GitHub", "shared", BEARER, set(), "server name is invalid"),
        ("-gh", "shared", BEARER, set(), "server name is invalid"),
        ("gh\n", "shared", BEARER, set(), "server name is invalid"),  # `$` alone would let a final newline in
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
    world: AdminWorld, name: str, mode: str, headers: list[str], optional: set[str], message: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        await world.svc.add_server(OP, name, mode, headers, optional)
    assert message in info.value.message
    assert "sk-live-123" not in info.value.message
    assert await world.store.list_servers() == []


async def test_add_server_templates_placeholders_and_signing_secret(world: AdminWorld) -> None:
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


async def test_set_shared_seals_each_value_to_its_row(world: AdminWorld) -> None:
    w = world
    await add_multi(w)
    w.clock.advance(minutes=5)
    view = await w.svc.set_shared(OP, "crm", {"API_KEY": GH_TOKEN, "CLIENT_ID": CLIENT_ID})
    w.secrets += [GH_TOKEN, CLIENT_ID]
    assert dict(view.shared_masks) == {"API_KEY": "…6789", "CLIENT_ID": "…tish"}
    assert view.shared_status == "configured" and view.updated_at == T0 + timedelta(minutes=5)
    stored = await w.store.get_server("crm")
    assert stored is not None
    assert w.keyring.open(stored.shared_values["API_KEY"], aad_shared("crm", "API_KEY")).reveal() == GH_TOKEN
    # Swapped between fields, servers or kinds of row, a ciphertext does not open.
    for aad in (aad_shared("crm", "CLIENT_ID"), aad_shared("other", "API_KEY"), aad_override("crm", "p_x", "API_KEY")):
        with pytest.raises(CorruptRow):
            w.keyring.open(stored.shared_values["API_KEY"], aad)
    assert GH_TOKEN not in repr(view) and GH_TOKEN not in str(view.to_json())


async def test_set_shared_refusals(world: AdminWorld) -> None:
    w = world
    await add_github(w, "individual")
    with pytest.raises(InvalidInput, match="individual mode.*overrides set"):
        await w.svc.set_shared(OP, "github", {"API_KEY": GH_TOKEN})
    await add_multi(w)
    with pytest.raises(InvalidInput, match="needs a value for CLIENT_ID"):
        await w.svc.set_shared(OP, "crm", {"API_KEY": GH_TOKEN})
    with pytest.raises(NotFound, match="No server named nope"):
        await w.svc.set_shared(OP, "nope", {"API_KEY": GH_TOKEN})


async def test_rotate_signing_secret_and_remove_server(world: AdminWorld) -> None:
    w = world
    await add_github(w)
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


# --- updates and upstream URLs --------------------------------------------------------------


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
async def test_upstream_urls_are_validated(w: SelfServiceWorld, url: str, error: str | None) -> None:
    if error is None:
        view, _ = await w.svc.update_server(OP, "github", upstream_url=url)
        assert view.upstream_url == url and view.to_json()["upstream_url"] == url
    else:
        with pytest.raises(InvalidInput, match=error) as exc:
            await w.svc.update_server(OP, "github", upstream_url=url)
        assert "ghp_secret123" not in exc.value.message


async def test_update_server_is_for_admins_and_needs_a_change(w: SelfServiceWorld) -> None:
    with pytest.raises(PermissionDenied):
        await w.svc.update_server(w.mia, "github", description="x")
    with pytest.raises(InvalidInput, match="Nothing to change"):
        await w.svc.update_server(OP, "github")
    view, issues = await w.svc.update_server(OP, "github", description="GitHub's MCP")
    assert issues == []
    assert (view.description, view.upstream_url) == ("GitHub's MCP", "http://127.0.0.1:9/mcp/github")


# --- servers update: headers, placeholders and mode, keeping every override ----------------------


async def _override(w: SelfServiceWorld, who: Actor, server: str, values: dict[str, str]) -> None:
    await w.svc.set_override(who, None, server, values)


async def test_update_server_keeps_fitting_overrides_and_reports_the_others(w: SelfServiceWorld) -> None:
    await _override(w, w.alice, "github", {"API_KEY": "alice-token-0123456789"})
    await w.svc.add_server(OP, "crm", "individual", ["X-Key: {{API_KEY}}", "X-Org: {{ORG}}"], optional={"ORG"})
    await _override(w, w.alice, "crm", {"API_KEY": "alice-crm-0123456789", "ORG": "acme"})
    await _override(w, w.bob, "crm", {"API_KEY": "bob-crm-0123456789"})

    # ORG becomes required: alice's fits, bob's does not; a header change keeps API_KEY's flag.
    view, issues = await w.svc.update_server(OP, "crm", headers=["X-Key: {{API_KEY}}", "X-Org: o={{ORG}}"],
                                             required={"ORG"})  # fmt: skip
    assert view.headers == ("X-Key: {{API_KEY}}", "X-Org: o={{ORG}}")
    assert view.placeholders == (("API_KEY", True), ("ORG", True))
    assert [(i.principal, i.server, i.missing) for i in issues] == [("bob", "crm", ("ORG",))]
    assert "overrides set --server crm" in issues[0].reason
    stored = {o.principal_id: o for o in await w.store.list_overrides("crm")}
    assert len(stored) == 2  # nothing dropped
    assert stored[w.bob.principal_id].status.value == "missing"
    assert stored[w.bob.principal_id].status_reason == issues[0].reason
    assert stored[w.alice.principal_id].status.value == "configured"
    status = {r.principal: r for r in await w.svc.credential_status(OP, "crm")}
    assert (status["bob"].status, status["bob"].reason) == ("missing", issues[0].reason)

    # Optional again: bob's fits again and is configured once more.
    _, issues = await w.svc.update_server(OP, "crm", optional={"ORG"})
    assert issues == []
    assert (await w.store.get_override(w.bob.principal_id, "crm")).status.value == "configured"  # type: ignore[union-attr]
    events = await w.store.query_audit(action="servers.update")
    assert events[-2].details["incompatible"] == "1" and events[-2].details["placeholders"] == "API_KEY,ORG"
    assert events[-1].details["placeholders"] == "API_KEY,ORG?"


async def test_update_server_mode_and_shared_values(w: SelfServiceWorld) -> None:
    await w.svc.set_shared(OP, "linear", {"API_KEY": "shared-linear-0123456789"})
    await _override(w, w.alice, "linear", {"API_KEY": "alice-linear-0123456789"})
    # A new required placeholder with no shared value: alice's override lacks it too.
    view, issues = await w.svc.update_server(OP, "linear", headers=["Authorization: Bearer {{API_KEY}}",
                                                                    "X-Team: {{TEAM}}"])  # fmt: skip
    assert view.shared_status == "missing" and [i.missing for i in issues] == [("TEAM",)]
    # To individual mode: the shared values go (recorded), the override stays.
    view, issues = await w.svc.update_server(OP, "linear", mode="individual", headers=["Authorization: Bearer {{API_KEY}}"])
    assert (view.mode, view.shared_masks, view.shared_status) == ("individual", (), None)
    assert issues == []
    last = (await w.store.query_audit(action="servers.update"))[-1]
    assert last.details["shared_dropped"] == "API_KEY"
    # To none: headers are cleared; the override is kept, unused.
    view, issues = await w.svc.update_server(OP, "linear", mode="none")
    assert (view.mode, view.headers, view.placeholders, issues) == ("none", (), (), [])
    assert await w.store.get_override(w.alice.principal_id, "linear") is not None
    # Back to individual needs headers again.
    with pytest.raises(InvalidInput, match="needs at least one header"):
        await w.svc.update_server(OP, "linear", mode="individual")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"headers": ["Bad Header: {{X}}"]}, "not an HTTP header name"),
        ({"headers": ["Authorization: Bearer {{API_KEY"]}, "not a placeholder"),
        ({"headers": ["X-Api-Key: {{API_KEY}}", "x-api-key: {{API_KEY}}"]}, "given twice"),
        ({"mode": "sometimes"}, "mode must be none, shared or individual"),
        ({"required": {"NOPE"}}, "Required NOPE is not a placeholder"),
        ({"optional": {"NOPE"}}, "Optional NOPE is not a placeholder"),
        ({"optional": {"API_KEY"}, "required": {"API_KEY"}}, "both optional and required"),
        ({"mode": "none", "headers": ["X: {{A}}"]}, "none mode injects no credentials"),
    ],
)
async def test_update_server_validates_as_add_does(w: SelfServiceWorld, kwargs: dict, message: str) -> None:
    before = await w.store.get_server("github")
    with pytest.raises(InvalidInput, match=message):
        await w.svc.update_server(OP, "github", **kwargs)
    assert await w.store.get_server("github") == before
    assert (await w.store.query_audit(action="servers.update"))[-1].outcome == "error"


async def test_update_server_unknown_server_is_not_found(w: SelfServiceWorld) -> None:
    with pytest.raises(NotFound, match="No server named ghost"):
        await w.svc.update_server(OP, "ghost", mode="none")
