"""console/web.py through aiohttp's test client, on a wired sidecar (in-memory store, Check's own
authenticator and live tables): sign-in, the session cookie, CSRF and Origin, the security
headers, the body bound, and that the use cases' own role checks decide."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from authz_server import app
from authz_server.admin.policy import Actor
from authz_server.admin.service import AdminService
from authz_server.config import Settings
from authz_server.console.sessions import Sessions
from authz_server.console import clients
from authz_server.console.web import COOKIE, CSP, CSRF_HEADER, KEY_SLOT, MAX_BODY, Console, create_app, summarize
from authz_server.crypto.cipher import Keyring
from authz_server.crypto.keys import KeyHasher
from authz_server.models import Secret
from authz_server.pipeline.authn import KeyExtractor
from authz_server.store.memory import MemoryStore

from ..fakes import FAST, GOOD, FakeProbe, assert_no_key

OP = Actor.operator()


@dataclass
class Rig:
    client: TestClient[Any, Any]
    sidecar: app.Sidecar
    keys: dict[str, str]

    async def sign_in(self, who: str) -> str:
        """Sign in; return the session's CSRF token."""
        reply = await self.client.post("/console/api/session", json={"key": self.keys[who]})
        assert reply.status == 200, await reply.text()
        return str((await reply.json())["csrf_token"])

    async def sync(self) -> None:
        await self.sidecar.follower.poll_once()


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    keyring = Keyring.from_spec(Keyring.generate_spec())
    store = MemoryStore()
    await store.migrate()
    svc = AdminService(store, keyring, KeyHasher(FAST), probe=FakeProbe())  # an upstream that takes GOOD only
    _, _, admin_key = await svc.initialize(OP)
    await svc.add_principal(OP, "alice", "eng", ["user"])
    await svc.add_server(OP, "github", "individual", ["Authorization: Bearer {{API_KEY}}", "X-Org: {{ORG}}"],
                         optional={"ORG"}, upstream_url="http://127.0.0.1:9/mcp/github")  # fmt: skip
    keys = {"admin": admin_key.reveal(), "alice": (await svc.create_key(OP, "alice", "laptop"))[1].reveal(),
            "scoped": (await svc.create_key(OP, "alice", "app", scope=["github"]))[1].reveal()}  # fmt: skip
    settings = Settings.from_env({}, store_url="memory://", console_listen="")
    sidecar = await app.build(settings, keyring, store)
    await sidecar.follower.load()
    console = Console(svc, sidecar.authenticator, KeyExtractor("x-api-key", path_keys=False), sidecar.audit,
                      lambda: True, Sessions())  # fmt: skip
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(console)))
    await client.start_server()
    try:
        yield Rig(client, sidecar, keys)
    finally:
        await client.close()
        sidecar.authenticator.close()


async def test_sign_in_sets_a_strict_cookie_and_never_echoes_the_key(rig: Rig) -> None:
    reply = await rig.client.post("/console/api/session", json={"key": rig.keys["alice"]})
    assert reply.status == 200
    body = await reply.text()
    assert_no_key(body, rig.keys["alice"])
    me = await reply.json()
    assert (me["name"], me["roles"], me["team"]) == ("alice", ["user"], "eng") and me["csrf_token"]
    cookie = reply.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=") and rig.keys["alice"] not in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console/" in cookie
    assert "Secure" not in cookie  # plain HTTP here; behind TLS (x-forwarded-proto: https) it is Secure
    again = await rig.client.get("/console/api/me")
    assert again.status == 200 and (await again.json())["csrf_token"] == me["csrf_token"]
    first = reply.cookies[COOKIE].value
    await rig.sign_in("alice")  # signing in again replaces the session: the first token is dead
    rig.client.session.cookie_jar.clear()
    assert (await rig.client.get("/console/api/me", headers={"Cookie": f"{COOKIE}={first}"})).status == 401


async def test_the_cookie_is_secure_when_the_request_came_over_tls(rig: Rig) -> None:
    reply = await rig.client.post("/console/api/session", json={"key": rig.keys["alice"]},
                                  headers={"x-forwarded-proto": "https"})  # fmt: skip
    assert "Secure" in reply.headers["Set-Cookie"]


@pytest.mark.parametrize(("key", "status", "reason"), [
    ("mgw_nonsense", 401, "key_malformed"), ("", 400, "invalid_input"), (None, 400, "invalid_input"),
])  # fmt: skip
async def test_a_bad_key_is_refused_in_one_clear_json_error(rig: Rig, key: Any, status: int, reason: str) -> None:
    before = rig.sidecar.audit.depth
    reply = await rig.client.post("/console/api/session", json={"key": key})
    assert reply.status == status
    error = (await reply.json())["error"]
    assert error["reason"] == reason and error["message"]
    assert COOKIE not in reply.cookies
    if status == 401:
        assert rig.sidecar.audit.depth == before + 1  # a security event, as the admin API records it


async def test_sign_in_takes_json_only_and_a_scoped_key_is_refused(rig: Rig) -> None:
    form = await rig.client.post("/console/api/session", data={"key": rig.keys["alice"]})
    assert form.status == 415
    scoped = await rig.client.post("/console/api/session", json={"key": rig.keys["scoped"]})
    assert scoped.status == 403 and "scoped" in (await scoped.json())["error"]["message"]


async def test_without_a_session_every_call_is_401(rig: Rig) -> None:
    for method, path in [("GET", "/console/api/me"), ("GET", "/console/api/keys"), ("GET", "/console/api/servers"),
                         ("POST", "/console/api/keys"), ("DELETE", "/console/api/session")]:  # fmt: skip
        reply = await rig.client.request(method, path, json={})
        assert reply.status == 401, (method, path)
    rig.client.session.cookie_jar.update_cookies({COOKIE: "forged"})
    assert (await rig.client.get("/console/api/me")).status == 401


async def test_state_changes_need_the_csrf_token_and_a_same_origin(rig: Rig) -> None:
    csrf = await rig.sign_in("alice")
    missing = await rig.client.post("/console/api/keys", json={"label": "x"})
    assert missing.status == 403 and CSRF_HEADER in (await missing.json())["error"]["message"]
    wrong = await rig.client.post("/console/api/keys", json={"label": "x"}, headers={CSRF_HEADER: "nope"})
    assert wrong.status == 403
    foreign = await rig.client.post("/console/api/keys", json={"label": "x"},
                                    headers={CSRF_HEADER: csrf, "Origin": "https://evil.example"})  # fmt: skip
    assert foreign.status == 403
    signin_elsewhere = await rig.client.post("/console/api/session", json={"key": rig.keys["alice"]},
                                             headers={"Origin": "https://evil.example"})  # fmt: skip
    assert signin_elsewhere.status == 403
    origin = f"http://{rig.client.host}:{rig.client.port}"
    ok = await rig.client.post("/console/api/keys", json={"label": "x"}, headers={CSRF_HEADER: csrf, "Origin": origin})
    assert ok.status == 201


async def test_every_answer_carries_the_security_headers(rig: Rig) -> None:
    for path in ["/console/", "/console/console.js", "/console/api/me", "/console/nope.html", "/console/../x"]:
        reply = await rig.client.get(path)
        assert reply.headers["Content-Security-Policy"] == CSP, path
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["Referrer-Policy"] == "no-referrer"
        assert reply.headers["Cache-Control"] == "no-store"
    page = await rig.client.get("/console/")
    assert page.status == 200 and page.content_type == "text/html"
    assert "<script" in (text := await page.text()) and "<script>" not in text  # no inline script
    assert (await rig.client.get("/console/console.js")).content_type == "text/javascript"
    assert (await rig.client.get("/console/nope.html")).status == 404
    bare = await rig.client.get("/console", allow_redirects=False)
    assert bare.status == 302 and bare.headers["Location"] == "/console/"


async def test_bodies_are_bounded(rig: Rig) -> None:
    csrf = await rig.sign_in("alice")
    big = {"label": "x" * (MAX_BODY + 10)}
    reply = await rig.client.post("/console/api/keys", json=big, headers={CSRF_HEADER: csrf})
    assert reply.status == 413 and (await reply.json())["error"]["reason"] == "too_large"
    junk = await rig.client.post("/console/api/keys", data=b"{not json", headers={CSRF_HEADER: csrf})
    assert junk.status == 400 and (await junk.json())["error"]["reason"] == "invalid_input"


async def test_keys_are_created_shown_once_listed_and_revoked(rig: Rig) -> None:
    csrf = await rig.sign_in("alice")
    made = await rig.client.post("/console/api/keys", json={"label": "ci", "expires_at": "2099-01-01T00:00:00Z"},
                                 headers={CSRF_HEADER: csrf})  # fmt: skip
    assert made.status == 201
    created = await made.json()
    assert created["secret"].startswith("mgw_") and created["key"]["label"] == "ci"
    listed = await (await rig.client.get("/console/api/keys")).json()
    assert {k["label"] for k in listed["keys"]} == {"laptop", "app", "ci"}  # alice's own, not the admin's
    assert_no_key(str(listed), created["secret"])
    key_id = created["key"]["key_id"]
    revoked = await rig.client.post(f"/console/api/keys/{key_id}/revoke", headers={CSRF_HEADER: csrf})
    assert revoked.status == 200 and (await revoked.json())["key"]["status"] == "revoked"
    bad_time = await rig.client.post("/console/api/keys", json={"expires_at": "tomorrow"}, headers={CSRF_HEADER: csrf})
    assert bad_time.status == 400


async def test_personal_credentials_show_status_and_masks_only(rig: Rig) -> None:
    csrf = await rig.sign_in("alice")
    (github,) = (await (await rig.client.get("/console/api/servers")).json())["servers"]
    assert (github["name"], github["status"], github["indicator"]) == ("github", "missing", "🟡")
    assert github["placeholders"] == [{"name": "API_KEY", "required": True}, {"name": "ORG", "required": False}]
    secret = "ghp_personalTOKEN0123456789"
    put = await rig.client.put("/console/api/servers/github/credential", json={"values": {"API_KEY": secret}},
                               headers={CSRF_HEADER: csrf})  # fmt: skip
    assert put.status == 200
    assert_no_key(await put.text(), secret)
    (github,) = (await (await rig.client.get("/console/api/servers")).json())["servers"]
    assert github["status"] == "configured" and github["indicator"] == "🟢"
    assert github["values"]["API_KEY"].endswith(secret[-4:]) and secret not in str(github)
    unknown = await rig.client.put("/console/api/servers/github/credential", json={"values": {"NOPE": "x"}},
                                   headers={CSRF_HEADER: csrf})  # fmt: skip
    assert unknown.status == 400
    gone = await rig.client.put("/console/api/servers/nosuch/credential", json={"values": {"API_KEY": "x"}},
                                headers={CSRF_HEADER: csrf})  # fmt: skip
    assert gone.status == 404
    deleted = await rig.client.delete("/console/api/servers/github/credential", headers={CSRF_HEADER: csrf})
    assert deleted.status == 200
    (github,) = (await (await rig.client.get("/console/api/servers")).json())["servers"]
    assert github["status"] == "missing"


async def test_the_use_cases_role_checks_decide(rig: Rig) -> None:
    await rig.sign_in("alice")
    refused = await rig.client.get("/console/api/principals")
    assert refused.status == 403 and (await refused.json())["error"]["reason"] == "permission_denied"
    rig.client.session.cookie_jar.clear()
    await rig.sign_in("admin")
    allowed = await rig.client.get("/console/api/principals")
    assert allowed.status == 200 and {p["name"] for p in (await allowed.json())["principals"]} == {"admin", "alice"}


async def test_sign_out_and_revocation_end_the_session(rig: Rig) -> None:
    csrf = await rig.sign_in("alice")
    out = await rig.client.delete("/console/api/session", headers={CSRF_HEADER: csrf})
    assert out.status == 200
    assert (await rig.client.get("/console/api/me")).status == 401
    await rig.sign_in("alice")
    assert (await rig.client.get("/console/api/me")).status == 200
    (view,) = [k for k in await rig.sidecar.admin.list_keys(OP, "alice") if k.label == "laptop"]
    await rig.sidecar.admin.revoke_key(OP, view.key_id)
    await rig.sync()  # the live tables, as Check sees them
    ended = await rig.client.get("/console/api/me")
    assert ended.status == 401 and (await ended.json())["error"]["reason"] == "key_revoked"


async def test_disabling_the_principal_ends_the_session(rig: Rig) -> None:
    await rig.sign_in("alice")
    await rig.sidecar.admin.set_principal_disabled(OP, "alice", True)
    await rig.sync()
    ended = await rig.client.get("/console/api/keys")
    assert ended.status == 401 and (await ended.json())["error"]["reason"] == "principal_disabled"


async def test_test_connection_probes_the_upstream_with_the_callers_credential(rig: Rig) -> None:
    csrf = await rig.sign_in("alice")
    none_yet = await rig.client.post("/console/api/servers/github/credential/test", headers={CSRF_HEADER: csrf})
    assert none_yet.status == 404
    for value, result, status, indicator in [("ghp_wrongWRONG0000", "rejected", "invalid", "🔴"),
                                             (GOOD, "ok", "configured", "🟢")]:  # fmt: skip
        await rig.client.put("/console/api/servers/github/credential", json={"values": {"API_KEY": value}},
                             headers={CSRF_HEADER: csrf})  # fmt: skip
        tested = await rig.client.post("/console/api/servers/github/credential/test", headers={CSRF_HEADER: csrf})
        assert tested.status == 200
        answer = (await tested.json())["result"]
        assert (answer["result"], answer["status"]) == (result, status)
        assert value not in await tested.text()
        (github,) = (await (await rig.client.get("/console/api/servers")).json())["servers"]
        assert (github["status"], github["indicator"]) == (status, indicator)
    assert (await rig.client.post("/console/api/servers/github/credential/test")).status == 403  # no CSRF token


async def test_regenerating_a_key_shows_the_new_one_once_and_takes_a_grace_period(rig: Rig) -> None:
    csrf = await rig.sign_in("alice")
    made = await (await rig.client.post("/console/api/keys", json={"label": "ci"}, headers={CSRF_HEADER: csrf})).json()
    old_id = made["key"]["key_id"]
    again = await rig.client.post(f"/console/api/keys/{old_id}/regenerate", json={"grace_seconds": 3600},
                                  headers={CSRF_HEADER: csrf})  # fmt: skip
    assert again.status == 201
    new = await again.json()
    assert new["secret"].startswith("mgw_") and new["secret"] != made["secret"] and new["key"]["label"] == "ci"
    keys = {k["key_id"]: k for k in (await (await rig.client.get("/console/api/keys")).json())["keys"]}
    assert keys[old_id]["status"] == "active" and keys[old_id]["revoked_at"]  # until the grace period ends
    bad = await rig.client.post(f"/console/api/keys/{old_id}/regenerate", json={"grace_seconds": "soon"},
                                headers={CSRF_HEADER: csrf})  # fmt: skip
    assert bad.status == 400


async def test_an_unexpected_failure_is_a_plain_500_without_details(rig: Rig, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    await rig.sign_in("alice")

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("internal detail")

    monkeypatch.setattr(AdminService, "list_keys", broken)
    reply = await rig.client.get("/console/api/keys")
    assert reply.status == 500
    assert await reply.json() == {"error": {"reason": "internal",
                                            "message": "The console failed; operators see the sidecar's log."}}
    assert "internal detail" in caplog.text  # for operators, in the log


async def test_connect_a_client_generates_each_clients_text_without_ever_a_key(rig: Rig) -> None:
    await rig.sign_in("alice")
    choices = await (await rig.client.get("/console/api/connect/choices")).json()
    assert [c["id"] for c in choices["clients"]] == list(clients.CLIENTS) and choices["servers"] == ["github"]
    assert choices["clients"][0]["title"] == "Claude Desktop (through mcp-remote)"
    gateway = "http://127.0.0.1:10000"
    for client in clients.CLIENTS:
        reply = await rig.client.get("/console/api/connect", params={"server": "github", "client": client,
                                                                     "gateway_url": gateway})  # fmt: skip
        assert reply.status == 200, await reply.text()
        plain = await reply.json()
        assert plain == {**clients.generate(gateway, "github", client).to_json(), "client": client,
                         "title": plain["title"], "key_slot": None}  # fmt: skip
        keyed = await (await rig.client.get("/console/api/connect", params={
            "server": "github", "client": client, "gateway_url": gateway, "keyed": "1"})).json()  # fmt: skip
        assert keyed["key_slot"] == KEY_SLOT and KEY_SLOT in keyed["text"]
        # The page's substitution gives exactly what the generator gives with the real key.
        real = rig.keys["alice"]
        assert keyed["text"].replace(KEY_SLOT, real) == clients.generate(gateway, "github", client, Secret(real)).text
    desktop = await (await rig.client.get("/console/api/connect", params={
        "server": "github", "client": "claude-desktop", "gateway_url": gateway, "keyed": "1"})).json()  # fmt: skip
    env = json.loads(desktop["text"].replace(KEY_SLOT, rig.keys["alice"]))["mcpServers"]["github"]["env"]
    assert env == {clients.AUTH_ENV: f"Bearer {rig.keys['alice']}"}


@pytest.mark.parametrize(("params", "status"), [
    ({"server": "nosuch", "client": "cursor", "gateway_url": "http://127.0.0.1:1"}, 404),
    ({"server": "Bad Name!", "client": "cursor", "gateway_url": "http://127.0.0.1:1"}, 400),
    ({"server": "github", "client": "emacs", "gateway_url": "http://127.0.0.1:1"}, 400),
    ({"server": "github", "client": "cursor", "gateway_url": "javascript:alert(1)"}, 400),
    ({"server": "github", "client": "cursor", "gateway_url": "http://h/x?a=\"b"}, 400),
    ({"server": "github", "client": "cursor"}, 400),
])  # fmt: skip
async def test_connect_refuses_bad_input_in_one_json_error(rig: Rig, params: dict[str, str], status: int) -> None:
    await rig.sign_in("alice")
    reply = await rig.client.get("/console/api/connect", params=params)
    assert reply.status == status
    assert (await reply.json())["error"]["message"]


async def test_connect_needs_a_session(rig: Rig) -> None:
    for path in ("/console/api/connect?server=github&client=curl", "/console/api/connect/choices"):
        assert (await rig.client.get(path)).status == 401


async def _manager(rig: Rig) -> str:
    """A manager, `mona`, signed in; returns the CSRF token."""
    await rig.sidecar.admin.add_principal(OP, "mona", "eng", ["manager"])
    rig.keys["mona"] = (await rig.sidecar.admin.create_key(OP, "mona", "laptop"))[1].reveal()
    await rig.sync()
    return await rig.sign_in("mona")


async def test_a_manager_adds_edits_and_deletes_an_override_for_another_user(rig: Rig) -> None:
    csrf = await _manager(rig)
    servers = (await (await rig.client.get("/console/api/manage/servers")).json())["servers"]
    assert [(s["name"], s["placeholders"]) for s in servers] == [
        ("github", [{"name": "API_KEY", "required": True}, {"name": "ORG", "required": False}])]
    url = "/console/api/manage/servers/github/overrides"

    async def table() -> dict[str, Any]:
        reply = await rig.client.get(url)
        assert reply.status == 200, await reply.text()
        return dict(await reply.json())

    before = await table()
    assert before["overrides"] == [] and before["server"]["name"] == "github"
    assert {(s["principal"], s["status"], s["indicator"]) for s in before["status"]} >= {("alice", "missing", "🟡")}
    assert "admin" not in {s["principal"] for s in before["status"]}  # an admin outranks a manager
    secret = "ghp_setByTheManager0123456789"
    put = await rig.client.put(f"{url}/alice", json={"values": {"API_KEY": secret}, "expires_at": "2099-01-01T00:00:00Z"},
                               headers={CSRF_HEADER: csrf})  # fmt: skip
    assert put.status == 200, await put.text()
    assert_no_key(await put.text(), secret)
    after = await table()
    (row,) = after["overrides"]
    assert (row["principal"], row["updated_by"], row["status"]) == ("alice", "mona", "configured")
    assert row["values"]["API_KEY"].endswith(secret[-4:]) and secret not in json.dumps(after)
    assert row["expires_at"].startswith("2099-01-01")
    assert ("alice", "configured", "override") in {(s["principal"], s["status"], s["source"]) for s in after["status"]}
    summary = (await (await rig.client.get("/console/api/manage/summary")).json())["principals"]
    assert {"principal": "alice", "servers": {"github": "configured"}, "summary": "all", "indicator": "✅"} in summary
    edited = await rig.client.put(f"{url}/alice", json={"values": {"API_KEY": secret, "ORG": "acme"}},
                                  headers={CSRF_HEADER: csrf})  # fmt: skip
    assert edited.status == 200
    assert set((await table())["overrides"][0]["values"]) == {"API_KEY", "ORG"}
    assert (await rig.client.delete(f"{url}/alice", headers={CSRF_HEADER: csrf})).status == 200
    gone = await table()
    assert gone["overrides"] == [] and ("alice", "missing") in {(s["principal"], s["status"]) for s in gone["status"]}
    no_csrf = await rig.client.put(f"{url}/alice", json={"values": {"API_KEY": secret}})
    assert no_csrf.status == 403
    admins = await rig.client.put(f"{url}/admin", json={"values": {"API_KEY": secret}}, headers={CSRF_HEADER: csrf})
    assert admins.status == 403  # never an override of someone who outranks the manager


async def test_a_user_gets_403_from_the_auth_overrides_endpoints(rig: Rig) -> None:
    csrf = await rig.sign_in("alice")
    url = "/console/api/manage/servers"
    for reply in (await rig.client.get(url), await rig.client.get("/console/api/manage/summary"),
                  await rig.client.get(f"{url}/github/overrides"),
                  await rig.client.put(f"{url}/github/overrides/admin", json={"values": {"API_KEY": "x"}},
                                       headers={CSRF_HEADER: csrf}),
                  await rig.client.delete(f"{url}/github/overrides/admin", headers={CSRF_HEADER: csrf})):  # fmt: skip
        assert reply.status == 403, await reply.text()
        assert (await reply.json())["error"]["reason"] == "permission_denied"


@pytest.mark.parametrize(("statuses", "summary"), [
    ({"a": "configured", "b": "configured"}, "all"), ({}, "all"), ({"a": "configured", "b": "missing"}, "some"),
    ({"a": "missing", "b": "missing"}, "none"), ({"a": "configured", "b": "expired"}, "update"),
    ({"a": "missing", "b": "invalid"}, "update"),
])  # fmt: skip
def test_a_principals_summary_across_servers(statuses: dict[str, str], summary: str) -> None:
    assert summarize(statuses)["summary"] == summary
