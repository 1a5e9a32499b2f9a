"""The gateway as an OAuth resource server (MCP specification, Authorization; RFC 9728, RFC 6750), end
to end through a real Envoy and the real sidecar: every 401 and scope 403 on an MCP route points at the
server's protected resource metadata, which Check serves; the MCP Python SDK reads both."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from authz_server.crypto import keys

from .harness import call_tool, post_initialize, run_envoy, run_example_server
from .sidecar import Gateway, add_key, admin_service, run_sidecar, seed_world

pytestmark = pytest.mark.e2e
SERVERS = ("linear", "open", "later")  # "later" is routed, and registered only by a test
WELL_KNOWN = "/.well-known/oauth-protected-resource"
_PARAM = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def challenge(headers: httpx.Headers) -> dict[str, str]:
    """The auth-params of the response's one Bearer challenge."""
    value = headers["www-authenticate"]
    scheme, _, rest = value.partition(" ")
    assert scheme == "Bearer", value
    return {k: re.sub(r"\\(.)", r"\1", v) for k, v in _PARAM.findall(rest)}


def tools_call(tool: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": tool, "arguments": {"a": 1, "b": 2}}}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp("resource-metadata")
    world = seed_world(tmp / "world")

    async def scoped() -> None:
        async with admin_service(world) as svc:
            await add_key(svc, world, "bob", "bob-echo", scope=("linear:echo_headers",))

    asyncio.run(scoped())
    with ExitStack() as stop:
        sidecar = stop.enter_context(run_sidecar(world))
        upstream = stop.enter_context(run_example_server(tmp))
        envoy = stop.enter_context(run_envoy(tmp, authz_port=sidecar.port, upstream_port=upstream.port, servers=SERVERS))
        yield Gateway(world, sidecar, upstream, envoy)


def metadata_url(gw: Gateway, server: str) -> str:
    return f"{gw.envoy.base_url}{WELL_KNOWN}/mcp/{server}"


async def test_no_key_is_a_401_pointing_at_metadata_that_describes_the_mcp_url(gw: Gateway) -> None:
    r = await post_initialize(gw.envoy.url("linear"))
    assert r.status == 401 and r.body["error"]["data"]["reason"] == "key_missing"
    params = challenge(r.headers)
    # No error (no key was sent); the scope that covers the server, and where its metadata is.
    assert params == {"realm": "mcp-authz", "scope": "linear", "resource_metadata": metadata_url(gw, "linear")}

    denied_before = gw.envoy.stat("http.mcp_ingress.ext_authz.denied") or 0
    followed = httpx.get(params["resource_metadata"], timeout=5)
    assert followed.status_code == 200
    assert followed.headers["content-type"] == "application/json"
    assert followed.headers["access-control-allow-origin"] == "*"
    assert followed.json() == {
        "resource": gw.envoy.url("linear"),
        "bearer_methods_supported": ["header"],
        "resource_name": "linear",
        "scopes_supported": ["linear"],
    }
    assert httpx.head(params["resource_metadata"], timeout=5).status_code == 200
    # Check answers it as a denial would (Envoy forwards nothing), so Envoy counts it as one.
    assert gw.envoy.stat("http.mcp_ingress.ext_authz.denied") == denied_before + 2


@pytest.mark.parametrize(
    ("case", "headers", "reason"),
    [
        ("not a gateway key", {"authorization": "Bearer some-oauth-token"}, "key_malformed"),
        ("unknown key", {"x-api-key": keys.generate()[1].reveal()}, "key_unknown"),
    ],
)
async def test_a_refused_key_is_invalid_token_and_the_body_still_says_why(
    gw: Gateway, case: str, headers: dict[str, str], reason: str
) -> None:
    gw.upstream.reset_stats()
    r = await post_initialize(gw.envoy.url("linear"), headers)
    assert r.status == 401, case
    assert r.body["error"]["data"]["reason"] == reason  # the gateway's own message, for any client
    params = challenge(r.headers)
    assert params["error"] == "invalid_token"
    assert params["error_description"] == r.body["error"]["message"]
    assert params["resource_metadata"] == metadata_url(gw, "linear")
    assert params["scope"] == "linear"
    assert gw.upstream.stats()["requests"] == 0


async def test_a_revoked_key_is_invalid_token(gw: Gateway) -> None:
    done = gw.world.cli("keys", "revoke", gw.world.key_ids["carol"])
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 2
    while (r := await post_initialize(gw.envoy.url("linear"), gw.bearer("carol"))).status != 401:
        assert time.monotonic() < deadline, r.status
        await asyncio.sleep(0.05)
    assert r.body["error"]["data"]["reason"] == "key_revoked"
    assert challenge(r.headers)["error"] == "invalid_token"


async def test_a_tool_outside_the_keys_scope_is_403_insufficient_scope(gw: Gateway) -> None:
    scoped = {"authorization": f"Bearer {gw.world.keys['bob-echo']}"}
    r = await post_initialize(gw.envoy.url("linear"), scoped, body=tools_call("add"))
    assert r.status == 403 and r.body["error"]["data"]["reason"] == "scope_tool"
    params = challenge(r.headers)
    assert params["error"] == "insufficient_scope"
    assert params["scope"] == "linear:add"
    assert params["resource_metadata"] == metadata_url(gw, "linear")
    # The same key within its scope works, and gets no challenge.
    assert (await call_tool(gw.envoy.url("linear"), "echo_headers", {}, headers=scoped))["x-user-id"] == "bob"
    # A key for the whole server is unchanged, and an allowed call carries no challenge.
    ok = await post_initialize(gw.envoy.url("linear"), gw.bearer("bob"))
    assert ok.status == 200 and "www-authenticate" not in ok.headers


async def test_metadata_of_what_is_not_a_registered_server_is_404(gw: Gateway) -> None:
    gw.upstream.reset_stats()
    for path in (f"{WELL_KNOWN}/mcp/nope", WELL_KNOWN, f"{WELL_KNOWN}/mcp/linear/x"):
        r = httpx.get(gw.envoy.base_url + path, timeout=5)
        assert r.status_code == 404, path
        assert r.headers["content-type"] == "application/json" and r.json()["error"] == "not_found"
    r = httpx.post(metadata_url(gw, "linear"), json={}, timeout=5)
    assert r.status_code == 405
    # A browser's preflight before it reads the metadata from another origin.
    r = httpx.options(metadata_url(gw, "linear"), timeout=5, headers={
        "origin": "http://localhost:6274", "access-control-request-method": "GET",
        "access-control-request-headers": "mcp-protocol-version"})  # fmt: skip
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
    assert "GET" in r.headers["access-control-allow-methods"]
    assert gw.upstream.stats()["requests"] == 0


async def test_a_server_registered_while_running_is_described_at_once(gw: Gateway) -> None:
    assert httpx.get(metadata_url(gw, "later"), timeout=5).status_code == 404
    done = gw.world.cli("servers", "add", "later", "--mode", "none")
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 2
    while (r := httpx.get(metadata_url(gw, "later"), timeout=5)).status_code != 200:
        assert time.monotonic() < deadline, r.status_code
        await asyncio.sleep(0.05)
    assert r.json()["resource"] == gw.envoy.url("later")


async def test_the_host_the_client_used_is_the_one_named(gw: Gateway) -> None:
    """Behind a name (here a Host header), the challenge and the resource name that name, escaped or left out."""
    r = await post_initialize(gw.envoy.url("linear"), {"host": "mcp.example.com"})
    url = challenge(r.headers)["resource_metadata"]
    assert url == f"http://mcp.example.com{WELL_KNOWN}/mcp/linear"
    doc = httpx.get(metadata_url(gw, "linear"), headers={"host": "mcp.example.com"}, timeout=5).json()
    assert doc["resource"] == "http://mcp.example.com/mcp/linear"


# --- a real client: the MCP Python SDK ------------------------------------------------------------


async def test_the_sdk_client_with_a_wrong_key_surfaces_the_401(gw: Gateway) -> None:
    """A client that does not do OAuth shows the gateway's own message, as before the challenge."""
    with pytest.raises(MCPError) as refused:
        await call_tool(gw.envoy.url("linear"), "add", {"a": 1, "b": 2}, headers={"x-api-key": keys.generate()[1].reveal()})
    assert str(refused.value) == "The gateway key is not recognised."
    assert refused.value.error.data["status"] == 401 and refused.value.error.data["reason"] == "key_unknown"


async def test_the_sdk_oauth_provider_reads_the_challenge_and_our_metadata(gw: Gateway) -> None:
    """mcp.client.auth.OAuthClientProvider, with no key: on the 401 it asks for exactly the
    resource_metadata URL of the challenge first, and gets the document. Its model of the document
    wants at least one authorization server, which the gateway does not have yet: the flow then
    stops, as for any server without one. Everything else in the document is valid to it, and the
    resource matches the URL it connects to."""
    import httpx2
    from mcp.client.auth import OAuthClientProvider, OAuthFlowError, OAuthRegistrationError, TokenStorage
    from mcp.shared.auth_utils import check_resource_allowed, resource_url_from_server_url
    from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthToken, ProtectedResourceMetadata
    from pydantic import ValidationError

    class Memory(TokenStorage):
        async def get_tokens(self) -> OAuthToken | None:
            return None

        async def set_tokens(self, tokens: OAuthToken) -> None:
            return None

        async def get_client_info(self) -> OAuthClientInformationFull | None:
            return None

        async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
            return None

    async def no_browser(url: str) -> None:
        raise AssertionError(f"no authorization server, so no sign-in page: {url}")

    async def no_callback() -> tuple[str, str | None]:
        raise AssertionError("no callback without an authorization server")

    server_url = gw.envoy.url("linear")
    provider = OAuthClientProvider(
        server_url=server_url,
        client_metadata=OAuthClientMetadata(redirect_uris=["http://127.0.0.1:1/callback"]),  # type: ignore[list-item]
        storage=Memory(),
        redirect_handler=no_browser,
        callback_handler=no_callback,
    )
    seen: list[tuple[str, str, int]] = []

    async def record(response: Any) -> None:
        seen.append((response.request.method, str(response.request.url), response.status_code))

    with pytest.raises(OAuthFlowError) as stopped:
        async with httpx2.AsyncClient(auth=provider, event_hooks={"response": [record]}, timeout=10) as client:
            await client.post(server_url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                              headers={"accept": "application/json, text/event-stream"})  # fmt: skip
    assert seen[0] == ("POST", server_url, 401)
    assert seen[1] == ("GET", metadata_url(gw, "linear"), 200)  # the challenge's URL, asked first
    # With no authorization server named, the SDK falls back to the gateway's origin as one, and
    # stops at registration (Envoy's 404): the gap the built-in authorization server will close.
    assert isinstance(stopped.value, OAuthRegistrationError)

    document = httpx.get(metadata_url(gw, "linear"), timeout=5).content
    with pytest.raises(ValidationError) as invalid:
        ProtectedResourceMetadata.model_validate_json(document)
    assert {e["loc"] for e in invalid.value.errors()} == {("authorization_servers",)}  # that member alone
    with_server = ProtectedResourceMetadata.model_validate(
        {**httpx.get(metadata_url(gw, "linear"), timeout=5).json(), "authorization_servers": ["https://as.example"]}
    )
    assert str(with_server.resource) == server_url
    # The SDK's own RFC 8707 check of the resource against the URL it connects to.
    assert check_resource_allowed(resource_url_from_server_url(server_url), str(with_server.resource))
    assert with_server.bearer_methods_supported == ["header"]
