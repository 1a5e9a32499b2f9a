"""The web console end to end (issue 15, first slice): a real Envoy, the sidecar and the example MCP
server, with Debian's chromium driven by Playwright. Skipped, with the reason, only when that
browser is not there (`make test` installs it).

Each test runs in a fresh browser context (its own cookie jar) and fails if the page logged a
console error, threw, or opened a dialog. On a failure it saves a screenshot under the test's
tmp_path and names it in the message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from authz_server.admin.probe import INITIALIZE

from .harness import call_tool, run_example_server
from .sidecar import Gateway, run_gateway

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]  # fmt: skip
SERVERS = ("github", "linear", "open")
MARKUP = "x<img src=x onerror=alert(1)>"
BOB_GITHUB = "ghp_bob_from_the_console_0042"  # what bob saves in the page; the probed upstream takes only this
# README's pictures of the console, taken by these tests: MCP_AUTHZ_CONSOLE_SHOTS=docs/console pytest tests/e2e/test_console.py
SHOTS = os.environ.get("MCP_AUTHZ_CONSOLE_SHOTS", "")
AXE = Path(__file__).parent / "vendor" / "axe-core" / "axe.min.js"  # vendored from npm, MPL-2.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("console")
    with ExitStack() as stop:
        gateway = stop.enter_context(run_gateway(tmp, SERVERS))
        # "Test connection" sends an MCP initialize straight to github's upstream URL: an upstream that
        # takes only bob's token, as a real one takes only valid personal tokens.
        probed = stop.enter_context(run_example_server(tmp, expect_tokens={"authorization": f"Bearer {BOB_GITHUB}"}))
        updated = gateway.world.cli("servers", "update", "github", "--upstream-url", probed.url("github"))
        assert updated.returncode == 0, updated.stderr
        yield gateway


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"no browser: {CHROMIUM} is missing (make test installs Debian's chromium)")
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("no browser driver: playwright is not installed (the dev extra has it)")
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        except Error as exc:
            pytest.skip(f"no browser: {CHROMIUM} did not start ({str(exc).splitlines()[0]})")
        yield chromium
        chromium.close()


def run_async(make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine (an MCP SDK client call) on a loop of its own, beside Playwright's."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


def eventually(check: Callable[[], bool], within: float, what: str) -> float:
    """Wait until `check()` holds; return how long it took."""
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > within:
            raise AssertionError(f"{what}: not within {within} s")
        time.sleep(0.05)
    return time.monotonic() - began


@dataclass
class Ui:
    """One browser context on the console through Envoy, with what the page reported."""

    gw: Gateway
    page: Any
    shot: Path
    problems: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{self.gw.envoy.base_url}/console/"

    def api(self, path: str) -> str:
        return f"{self.gw.envoy.base_url}/console/api{path}"

    def sign_in(self, who: str, key: str = "") -> None:
        from playwright.sync_api import expect

        self.page.goto(self.url)
        self.page.get_by_label("Gateway key").fill(key or self.gw.key(who))
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page.get_by_role("heading", name="My servers")).to_be_visible()
        expect(self.page.locator("#who")).to_contain_text(who)

    def picture(self, name: str) -> None:
        """A picture of the page for README, when MCP_AUTHZ_CONSOLE_SHOTS names a directory."""
        if SHOTS:
            Path(SHOTS).mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))

    def csrf(self) -> str:
        return str(self.page.request.get(self.api("/me")).json()["csrf_token"])

    def status(self) -> int:
        return int(self.page.request.get(self.api("/me")).status)

    @contextmanager
    def screenshot_on_failure(self) -> Iterator[None]:
        try:
            yield
        except BaseException as exc:
            try:
                self.page.screenshot(path=str(self.shot), full_page=True)
                where = f"screenshot: {self.shot}"
            except Exception as shot_error:  # the page itself may be what failed
                where = f"no screenshot ({shot_error})"
            raise AssertionError(f"{exc}\n{where}") from exc


@pytest.fixture
def ui(stack: Gateway, browser: Any, tmp_path: Path) -> Iterator[Ui]:
    context = browser.new_context(viewport={"width": 960, "height": 640})
    page = context.new_page()
    page.set_default_timeout(10_000)
    found = Ui(stack, page, tmp_path / "failure.png")
    page.on("console", lambda m: found.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: found.problems.append(f"page error: {e}"))

    def dialog(d: Any) -> None:
        found.problems.append(f"dialog: {d.message}")
        d.dismiss()

    page.on("dialog", dialog)
    try:
        yield found
    finally:
        context.close()
    # (7) No page may log an error, throw, or open a dialog. An expected 401 or 403 is an answer the
    # page handles, but Chromium logs every failed fetch as a console error: those are left out.
    unexpected = [p for p in found.problems if "Failed to load resource" not in p]
    assert not unexpected, unexpected


# (1) ------------------------------------------------------------------------------------------
def test_a_user_sets_a_personal_credential_and_the_upstream_gets_it(ui: Ui) -> None:
    from playwright.sync_api import expect

    secret = BOB_GITHUB
    with ui.screenshot_on_failure():
        ui.sign_in("bob")
        cards = ui.page.locator("article[data-server]")
        expect(cards).to_have_count(2)  # github (individual) and linear (shared); "open" takes none
        github = ui.page.locator('article[data-server="github"]')
        expect(github.locator(".status")).to_have_text(re.compile(r"^🟡 missing"))
        linear = ui.page.locator('article[data-server="linear"]')
        expect(linear.locator(".status")).to_have_text(re.compile(r"^🟢 configured"))
        # A wrong token first: "Test connection" says the upstream rejected it, and the status is 🔴 with why.
        github.get_by_label("API_KEY (required)").fill("ghp_wrong_token_9999")
        github.get_by_role("button", name="Save").click()
        expect(ui.page.locator("#notice")).to_have_text("Saved your credential for github.")
        ui.page.locator('article[data-server="github"]').get_by_role("button", name="Test connection").click()
        expect(ui.page.locator("#notice")).to_contain_text("rejected your credential")
        github = ui.page.locator('article[data-server="github"]')
        expect(github.locator(".status")).to_have_text(re.compile(r"^🔴 invalid — .*401"))
        github.get_by_label("API_KEY (required)").fill(secret)
        github.get_by_role("button", name="Save").click()
        github = ui.page.locator('article[data-server="github"]')
        expect(github.locator(".status")).to_have_text(re.compile(r"^🟢 configured"))
        expect(github.locator(".masks")).to_contain_text(secret[-4:])
        assert secret not in ui.page.content()  # a mask, never the value
        expect(github.get_by_label("API_KEY (required)")).to_have_value("")
        github.get_by_role("button", name="Test connection").click()
        expect(ui.page.locator("#notice")).to_contain_text("accepted your credential")
        ui.picture("my-servers")

        def upstream_sees_it() -> bool:
            try:
                headers = run_async(lambda: call_tool(ui.gw.envoy.url("github"), "echo_headers", {},
                                                      headers=ui.gw.bearer("bob")))  # fmt: skip
            except Exception:
                return False  # the sidecar has not applied the change yet
            return bool(headers["authorization"] == f"Bearer {secret}" and headers["x-user-id"] == "bob")

        eventually(upstream_sees_it, 5, "the upstream sees bob's new credential")


# (2) ------------------------------------------------------------------------------------------
def test_a_key_created_in_the_page_is_shown_once_works_and_stops_when_revoked(ui: Ui) -> None:
    from playwright.sync_api import expect

    with ui.screenshot_on_failure():
        ui.sign_in("carol")
        ui.page.get_by_role("button", name="My keys").click()
        ui.page.get_by_label("Label").fill("made-in-page")
        ui.page.get_by_role("button", name="Create key").click()
        shown = ui.page.locator("#new-key-value")
        expect(shown).to_contain_text("mgw_")
        key = shown.text_content() or ""
        expect(ui.page.get_by_role("button", name="Copy")).to_be_visible()
        row = ui.page.locator("#key-table tbody tr", has_text="made-in-page")
        expect(row).to_contain_text("active")
        assert key not in (row.text_content() or "")
        ui.picture("my-keys")

        def call() -> Any:
            return run_async(lambda: call_tool(ui.gw.envoy.url("open"), "echo_headers", {},
                                               headers={"authorization": f"Bearer {key}"}))  # fmt: skip

        def works() -> bool:
            try:
                return bool(call()["x-user-id"] == "carol")
            except Exception:
                return False

        eventually(works, 5, "the new key works through Envoy")
        ui.page.reload()  # shown once: gone after a reload
        ui.page.get_by_role("button", name="My keys").click()
        expect(ui.page.locator("#new-key")).to_be_hidden()
        assert key not in ui.page.content()
        ui.page.get_by_role("button", name="Revoke key made-in-page").click()
        expect(row).to_contain_text("revoked")

        def refused() -> bool:
            try:
                call()
            except Exception:
                return True
            return False

        eventually(refused, 2, "the revoked key is refused through Envoy")


def test_regenerating_a_key_warns_then_the_old_key_fails_and_the_new_one_works(ui: Ui) -> None:
    from playwright.sync_api import expect

    def works(key: str) -> bool:
        try:
            seen = run_async(lambda: call_tool(ui.gw.envoy.url("open"), "echo_headers", {},
                                               headers={"authorization": f"Bearer {key}"}))  # fmt: skip
        except Exception:
            return False
        return bool(seen["x-user-id"] == "carol")

    with ui.screenshot_on_failure():
        ui.sign_in("carol")
        ui.page.get_by_role("button", name="My keys").click()
        ui.page.get_by_label("Label").fill("to-regenerate")
        ui.page.get_by_role("button", name="Create key").click()
        expect(ui.page.locator("#new-key-value")).to_contain_text("mgw_")
        old = ui.page.locator("#new-key-value").text_content() or ""
        eventually(lambda: works(old), 5, "the key works before it is regenerated")
        ui.page.get_by_role("button", name="Regenerate key to-regenerate").click()
        warning = ui.page.locator("tr.confirm [role=alert]")
        expect(warning).to_contain_text("revokes this one")
        expect(ui.page.get_by_label("Grace period for the old key")).to_be_focused()
        ui.page.get_by_role("button", name="Regenerate now").click()
        expect(ui.page.locator("#new-key-value")).not_to_have_text(old)
        new = ui.page.locator("#new-key-value").text_content() or ""
        assert new.startswith("mgw_")
        eventually(lambda: not works(old), 2, "the old key is refused once regenerated (no grace period)")
        eventually(lambda: works(new), 5, "the new key works")


def initialize_status(url: str, authorization: str) -> int:
    """The status of an MCP initialize through Envoy with this Authorization header."""
    reply = httpx.post(url, json=INITIALIZE, timeout=10, headers={
        "authorization": authorization, "accept": "application/json, text/event-stream"})  # fmt: skip
    return reply.status_code


def test_connect_a_client_fills_in_the_new_key_and_the_snippet_works_until_regenerated(ui: Ui) -> None:
    from playwright.sync_api import expect

    def snippet_authorization() -> str:
        ui.page.get_by_role("button", name="Show configuration").click()
        text = ui.page.locator("#connect-text")
        expect(text).to_contain_text("mcpServers")
        entry = json.loads(text.text_content() or "")["mcpServers"]["linear"]
        assert entry["args"][:3] == ["-y", "mcp-remote", ui.gw.envoy.url("linear")]
        return str(entry["env"]["MCP_GATEWAY_AUTH"])

    def works(authorization: str) -> bool:
        try:
            seen = run_async(lambda: call_tool(ui.gw.envoy.url("linear"), "echo_headers", {},
                                               headers={"authorization": authorization}))  # fmt: skip
        except Exception:
            return False
        return bool(seen["x-user-id"] == "carol")

    with ui.screenshot_on_failure():
        ui.sign_in("carol")
        ui.page.get_by_role("button", name="Connect a client").click()
        expect(ui.page.get_by_label("Fill in my new key")).to_be_disabled()  # no key made in this page yet
        ui.page.locator("#connect").get_by_label("Server", exact=True).fill("linear")
        ui.page.locator("#connect").get_by_label("Client", exact=True).select_option(label="Claude Desktop (through mcp-remote)")
        assert snippet_authorization() == "Bearer <YOUR_GATEWAY_KEY>"
        expect(ui.page.locator("#connect-instruction")).to_contain_text("Replace <YOUR_GATEWAY_KEY>")
        ui.picture("connect")  # with the placeholder: no key in a checked-in picture

        ui.page.get_by_role("button", name="My keys").click()
        ui.page.get_by_label("Label").fill("for-claude")
        ui.page.get_by_role("button", name="Create key").click()
        expect(ui.page.locator("#new-key-value")).to_contain_text("mgw_")
        key = ui.page.locator("#new-key-value").text_content() or ""
        ui.page.get_by_role("button", name="Connect a client").click()
        expect(ui.page.get_by_label("Fill in my new key")).to_be_checked()
        ui.page.locator("#connect").get_by_label("Server", exact=True).fill("linear")
        ui.page.locator("#connect").get_by_label("Client", exact=True).select_option("claude-desktop")
        authorization = snippet_authorization()
        assert authorization == f"Bearer {key}"
        expect(ui.page.locator("#connect-instruction")).not_to_contain_text("Replace")
        eventually(lambda: works(authorization), 5, "the key from the Claude Desktop snippet works through Envoy")
        assert initialize_status(ui.gw.envoy.url("linear"), authorization) == 200

        ui.page.get_by_role("button", name="My keys").click()
        ui.page.get_by_role("button", name="Regenerate key for-claude").click()
        ui.page.get_by_role("button", name="Regenerate now").click()
        expect(ui.page.locator("#new-key-value")).not_to_have_text(key)
        eventually(lambda: initialize_status(ui.gw.envoy.url("linear"), authorization) == 401, 2,
                   "the snippet's old key is refused once regenerated (no grace period)")  # fmt: skip
        new = ui.page.locator("#new-key-value").text_content() or ""
        ui.page.get_by_role("button", name="Connect a client").click()
        ui.page.locator("#connect").get_by_label("Server", exact=True).fill("linear")
        assert snippet_authorization() == f"Bearer {new}"  # the page now offers the regenerated key

        ui.page.reload()  # leaving the page forgets the key
        ui.page.get_by_role("button", name="Connect a client").click()
        expect(ui.page.get_by_label("Fill in my new key")).to_be_disabled()
        assert new not in ui.page.content()
        stored = ui.page.evaluate("() => JSON.stringify([localStorage, sessionStorage, document.cookie])")
        assert "mgw_" not in stored


def manager_key(gw: Gateway) -> str:
    """`mona`, a manager (made once per module), and a key of hers that the sidecar already knows."""
    if "mona" not in gw.world.keys:
        added = gw.world.cli("principals", "add", "mona", "--team", "eng", "--roles", "manager")
        assert added.returncode == 0, added.stderr
        made = gw.world.cli("keys", "create", "mona", "--label", "console", "--json")
        assert made.returncode == 0, made.stderr
        gw.world.keys["mona"] = json.loads(made.stdout)["api_key"]
    key = gw.world.keys["mona"]
    session = f"{gw.envoy.base_url}/console/api/session"
    eventually(lambda: httpx.post(session, json={"key": key}, timeout=5).status_code == 200, 5,
               "the sidecar knows the manager's key")  # fmt: skip
    return key


def test_a_manager_adds_edits_and_deletes_an_override_in_the_auth_overrides_tab(ui: Ui) -> None:
    from playwright.sync_api import expect

    first, second = "ghp_dave_set_by_mona_0001", "ghp_dave_edited_by_mona_0002"
    page = ui.page

    def dave_sends() -> str:
        seen = run_async(lambda: call_tool(ui.gw.envoy.url("github"), "echo_headers", {}, headers=ui.gw.bearer("dave")))
        return str(seen.get("authorization", ""))

    def upstream_gets(value: str) -> bool:
        try:
            return dave_sends() == value
        except Exception:
            return False

    with ui.screenshot_on_failure():
        ui.sign_in("mona", manager_key(ui.gw))
        page.get_by_role("button", name="Auth Overrides").click()
        tab = page.locator("#overrides")
        expect(tab.get_by_label("Server", exact=True)).to_have_value("github")
        dave = page.locator('#ov-status tr[data-principal="dave"]')
        expect(dave).to_have_attribute("data-status", "missing")
        summary = page.locator('#ov-summary tr[data-principal="dave"]')
        expect(summary).to_have_attribute("data-summary", "some")  # linear's shared value only
        expect(page.locator('#ov-status tr[data-principal="alice"]')).to_have_attribute("data-status", "configured")
        # Add, from the form the server's placeholders make.
        tab.get_by_label("User or account").fill("dave")
        tab.get_by_label("API_KEY (required)").fill(first)
        page.get_by_role("button", name="Save override").click()
        expect(ui.page.locator("#notice")).to_have_text("Saved dave's override on github.")
        row = page.locator('#ov-table tr[data-principal="dave"]')
        expect(row).to_contain_text("mona")
        expect(row).to_contain_text(first[-4:])
        expect(dave).to_have_attribute("data-status", "configured")
        expect(dave).to_contain_text("🟢")
        expect(summary).to_have_attribute("data-summary", "all")  # github's override and linear's shared value
        assert first not in page.content()
        eventually(lambda: upstream_gets(f"Bearer {first}"), 5, "the upstream gets the override mona set")
        page.evaluate("window.scrollTo(0, 0)")
        ui.picture("auth-overrides")
        # Edit: new value and an expiry.
        page.get_by_role("button", name="Edit the override of dave").click()
        expect(tab.get_by_label("User or account")).to_have_value("dave")
        tab.get_by_label("API_KEY (required)").fill(second)
        tab.get_by_label("Expires (optional)").fill("2099-12-31")
        page.get_by_role("button", name="Save override").click()
        expect(row).to_contain_text(second[-4:])
        expect(row).to_contain_text("2099")
        expect(dave).to_have_attribute("data-status", "configured")
        eventually(lambda: upstream_gets(f"Bearer {second}"), 5, "the upstream gets the edited override")
        # Delete: dave falls back to github's default, which is none.
        page.get_by_role("button", name="Delete the override of dave").click()
        expect(page.locator("#notice")).to_contain_text("dave falls back to the server's default")
        expect(row).to_have_count(0)
        expect(dave).to_have_attribute("data-status", "missing")
        expect(summary).to_have_attribute("data-summary", "some")
        eventually(lambda: not upstream_gets(f"Bearer {second}"), 5, "the upstream no longer gets dave's override")


# (3) ------------------------------------------------------------------------------------------
def test_markup_in_user_supplied_strings_renders_as_text(ui: Ui) -> None:
    from playwright.sync_api import expect

    with ui.screenshot_on_failure():
        ui.sign_in("dave")
        ui.page.get_by_role("button", name="My keys").click()
        ui.page.get_by_label("Label").fill(MARKUP)
        ui.page.get_by_role("button", name="Create key").click()
        cell = ui.page.locator("#key-table tbody td", has_text="onerror")
        expect(cell).to_have_text(MARKUP)  # the characters, as typed
        assert ui.page.locator("#key-table img").count() == 0
        assert ui.page.locator("img").count() == 0
        ui.page.wait_for_timeout(300)  # an onerror would have fired by now
    assert not [p for p in ui.problems if p.startswith("dialog")], ui.problems


def test_markup_in_a_server_description_renders_as_text_in_the_auth_overrides_tab(ui: Ui) -> None:
    """Names (principals, teams, servers) cannot hold markup (the name rule refuses it): the free-text
    fields that can are a key's label (above) and a server's description, shown here."""
    from playwright.sync_api import expect

    refused = ui.gw.world.cli("principals", "add", "<img src=x onerror=alert(1)>")
    assert refused.returncode != 0 and "name is invalid" in refused.stderr and "Traceback" not in refused.stderr
    described = ui.gw.world.cli("servers", "update", "linear", "--description", MARKUP)
    assert described.returncode == 0, described.stderr
    with ui.screenshot_on_failure():
        ui.sign_in("mona", manager_key(ui.gw))
        ui.page.get_by_role("button", name="Auth Overrides").click()
        ui.page.locator("#overrides").get_by_label("Server", exact=True).select_option("linear")
        expect(ui.page.locator("#ov-description")).to_have_text(MARKUP)
        assert ui.page.locator("img").count() == 0
        ui.page.wait_for_timeout(300)  # an onerror would have fired by now
    assert not [p for p in ui.problems if p.startswith("dialog")], ui.problems


# (4) ------------------------------------------------------------------------------------------
def test_sign_out_ends_the_session_at_once_and_a_cli_revocation_within_a_second(ui: Ui) -> None:
    from playwright.sync_api import expect

    with ui.screenshot_on_failure():
        ui.sign_in("alice")
        assert ui.status() == 200
        ui.page.get_by_role("button", name="Sign out").click()
        expect(ui.page.get_by_label("Gateway key")).to_be_visible()
        assert ui.status() == 401  # at once
        ui.picture("sign-in")

        made = ui.gw.world.cli("keys", "create", "alice", "--label", "console-session", "--json")
        assert made.returncode == 0, made.stderr
        created = json.loads(made.stdout)
        ui.sign_in("alice", created["api_key"])  # a key of its own: the module's others stay valid
        assert ui.status() == 200
        revoked = ui.gw.world.cli("keys", "revoke", created["key"]["key_id"])
        assert revoked.returncode == 0, revoked.stderr
        took = eventually(lambda: ui.status() == 401, 1.0, "the session ends after the key is revoked")
        assert took <= 1.0
        ui.page.reload()
        expect(ui.page.get_by_label("Gateway key")).to_be_visible()


# (5) ------------------------------------------------------------------------------------------
def test_state_changes_need_the_csrf_token_and_this_origin(ui: Ui) -> None:
    with ui.screenshot_on_failure():
        ui.sign_in("bob")
        request = ui.page.request
        no_token = request.post(ui.api("/keys"), data={"label": "csrf"})
        assert no_token.status == 403, no_token.text()
        csrf = ui.csrf()
        foreign = request.post(ui.api("/keys"), data={"label": "csrf"},
                               headers={"X-CSRF-Token": csrf, "Origin": "https://evil.example"})  # fmt: skip
        assert foreign.status == 403, foreign.text()
        no_token_delete = request.delete(ui.api("/servers/github/credential"))
        assert no_token_delete.status == 403
        same = request.post(ui.api("/keys"), data={"label": "csrf-ok"},
                            headers={"X-CSRF-Token": csrf, "Origin": ui.gw.envoy.base_url})  # fmt: skip
        assert same.status == 201, same.text()
        page_headers = request.get(ui.url).headers
        assert "script-src 'self'" in page_headers["content-security-policy"]
        assert page_headers["x-content-type-options"] == "nosniff"


# (6) ------------------------------------------------------------------------------------------
def test_a_user_sees_no_admin_controls_and_admin_calls_are_refused(ui: Ui) -> None:
    with ui.screenshot_on_failure():
        ui.sign_in("bob")
        refused = ui.page.request.get(ui.api("/principals"))
        assert refused.status == 403 and refused.json()["error"]["reason"] == "permission_denied"
        nav = [b.text_content() for b in ui.page.locator("#nav button:visible").all()]
        assert nav == ["My servers", "My keys", "Connect a client", "Sign out"]
        for word in ("Principals", "Teams", "Audit", "Auth Overrides"):
            assert ui.page.locator(f"text={word} >> visible=true").count() == 0, word
        csrf = ui.csrf()
        manage = ui.api("/manage/servers")
        for refused in (ui.page.request.get(manage), ui.page.request.get(f"{manage}/github/overrides"),
                        ui.page.request.put(f"{manage}/github/overrides/dave", data={"values": {"API_KEY": "x"}},
                                            headers={"X-CSRF-Token": csrf}),
                        ui.page.request.delete(f"{manage}/github/overrides/alice", headers={"X-CSRF-Token": csrf})):  # fmt: skip
            assert refused.status == 403 and refused.json()["error"]["reason"] == "permission_denied", refused.text()


# (8) ------------------------------------------------------------------------------------------
def test_every_page_passes_an_automated_accessibility_check(stack: Gateway, browser: Any, tmp_path: Path) -> None:
    """axe-core's WCAG 2 A and AA rules (labels, contrast, names of buttons, ...) on each page, and keyboard
    focus that shows. axe is injected into the page, so this one context lets injected scripts past the CSP."""
    from playwright.sync_api import expect

    context = browser.new_context(bypass_csp=True, viewport={"width": 960, "height": 640})
    page = context.new_page()
    page.set_default_timeout(10_000)
    ui = Ui(stack, page, tmp_path / "failure.png")

    def audit(where: str) -> list[str]:
        page.add_script_tag(path=str(AXE))
        found = page.evaluate("""async () => {
            const result = await axe.run(document, {runOnly: {type: "tag", values: ["wcag2a", "wcag2aa"]}});
            return {passed: result.passes.map(p => p.id), violations: result.violations.map(
                v => `${v.id}: ${v.help} (${v.nodes.map(n => n.target.join(" ")).join(", ")})`)};
        }""")
        assert {"label", "color-contrast", "button-name"} & set(found["passed"]), f"{where}: axe checked nothing"
        return [f"{where}: {v}" for v in found["violations"]]

    try:
        with ui.screenshot_on_failure():
            page.goto(ui.url)
            expect(page.get_by_label("Gateway key")).to_be_visible()
            violations = audit("sign-in")
            # Keyboard: the page opens with the key field focused; Tab reaches the button, Shift+Tab comes back,
            # and whatever has the keyboard's focus shows an outline.
            focused = "document.activeElement.id || document.activeElement.textContent"
            outline = "getComputedStyle(document.activeElement).outlineStyle"
            assert page.evaluate(focused) == "key"
            page.keyboard.press("Tab")
            assert page.evaluate(focused) == "Sign in" and page.evaluate(outline) != "none"
            page.keyboard.press("Shift+Tab")
            assert page.evaluate(focused) == "key" and page.evaluate(outline) != "none"
            ui.sign_in("bob")
            expect(page.locator("article[data-server]").first).to_be_visible()
            violations += audit("my servers")
            page.get_by_role("button", name="My keys").click()
            expect(page.locator("#key-table tbody tr").first).to_be_visible()
            violations += audit("my keys")
            page.get_by_role("button", name="Connect a client").click()
            page.locator("#connect").get_by_label("Server", exact=True).fill("github")
            page.get_by_role("button", name="Show configuration").click()
            expect(page.locator("#connect-text")).to_contain_text("mcpServers")
            violations += audit("connect a client")
            page.get_by_role("button", name="Sign out").click()
            expect(page.get_by_label("Gateway key")).to_be_visible()
            ui.sign_in("mona", manager_key(stack))
            page.get_by_role("button", name="Auth Overrides").click()
            expect(page.locator("#ov-status tbody tr").first).to_be_visible()
            violations += audit("auth overrides")
            assert not violations, "\n".join(violations)
    finally:
        context.close()
