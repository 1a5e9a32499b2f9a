"""envoy/resource_metadata.py: the RFC 9728 metadata and the Bearer challenge, and the servicer answering
the metadata route from the live tables. Nothing a client sends (host, tool, path) can add a parameter
to the challenge or a label to a metric."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from google.rpc import code_pb2

from authz_server.envoy import resource_metadata as rm
from authz_server.envoy import response as resp
from authz_server.envoy.health import Health
from authz_server.envoy.servicer import AuthorizationServicer
from authz_server.errors import REASONS, Denied, Reason
from authz_server.models import AuthMode
from authz_server.observability import metrics as metrics_module
from authz_server.observability.batch import BatchWriter
from authz_server.observability.last_used import LastUsed

from ..fakes import World, real_key

# RFC 9110 auth-param list: token=quoted-string, separated by ", ". A value never holds an unescaped quote.
_PARAM = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')


def params(challenge: str) -> dict[str, str]:
    """The auth-params of a Bearer challenge; fails unless the whole value is exactly a list of them."""
    scheme, _, rest = challenge.partition(" ")
    assert scheme == "Bearer"
    found = _PARAM.findall(rest)
    assert ", ".join(f'{k}="{v}"' for k, v in found) == rest, challenge
    return {k: re.sub(r"\\(.)", r"\1", v) for k, v in found}


@pytest.mark.parametrize(
    ("scheme", "host", "expected"),
    [
        ("http", "127.0.0.1:10000", "http://127.0.0.1:10000"),
        ("https", "Gateway.Example.com", "https://gateway.example.com"),
        ("", "gateway.example.com", "https://gateway.example.com"),  # unknown scheme: https
        ("ftp", "gateway.example.com", "https://gateway.example.com"),
        ("https", "[::1]:8443", "https://[::1]:8443"),
        ("https", "", ""),
        ("https", 'evil", error="x', ""),
        ("https", "evil.com/path", ""),
        ("https", "user@evil.com", ""),
        ("https", "evil.com\r\nx-injected: 1", ""),
        ("https", "evil.com:99999999", ""),
    ],
)
def test_origin_is_scheme_and_a_plain_host_or_nothing(scheme: str, host: str, expected: str) -> None:
    assert rm.origin(scheme, host) == expected


@pytest.mark.parametrize(
    ("path", "server"),
    [
        ("/.well-known/oauth-protected-resource/mcp/github", "github"),
        ("/.well-known/oauth-protected-resource/mcp/github?x=1", "github"),
        ("/.well-known/oauth-protected-resource", None),
        ("/.well-known/oauth-protected-resource/", None),
        ("/.well-known/oauth-protected-resource/mcp/", None),
        ("/.well-known/oauth-protected-resource/mcp/github/extra", None),
        ("/.well-known/oauth-protected-resource/mcp/GitHub", None),
        ("/.well-known/oauth-protected-resource/mcp/a%22b", None),
        ("/.well-known/oauth-protected-resourcex/mcp/github", None),
        ("/mcp/github", None),
    ],
)
def test_server_of_a_metadata_path(path: str, server: str | None) -> None:
    assert rm.server_of(path) == server


def test_the_document_names_the_resource_the_client_reached() -> None:
    doc = rm.document("https://gw.example.com", "github")
    assert doc == {
        "resource": "https://gw.example.com/mcp/github",
        "bearer_methods_supported": ["header"],
        "resource_name": "github",
        "scopes_supported": ["github"],
    }
    assert "authorization_servers" not in doc  # none until the gateway has one; never an invented one
    assert rm.metadata_url("https://gw.example.com", "github") == (
        "https://gw.example.com/.well-known/oauth-protected-resource/mcp/github"
    )


BASE = "https://gw.example.com"
META = f"{BASE}/.well-known/oauth-protected-resource/mcp/github"


@pytest.mark.parametrize(
    ("reason", "tool", "expected"),
    [
        (Reason.KEY_MISSING, "", {"realm": "mcp-authz", "scope": "github", "resource_metadata": META}),
        (Reason.KEY_UNKNOWN, "", {"realm": "mcp-authz", "error": "invalid_token",
                                  "error_description": REASONS[Reason.KEY_UNKNOWN].message,
                                  "scope": "github", "resource_metadata": META}),
        (Reason.KEY_REVOKED, "x", {"realm": "mcp-authz", "error": "invalid_token",
                                   "error_description": REASONS[Reason.KEY_REVOKED].message,
                                   "scope": "github", "resource_metadata": META}),
        (Reason.SCOPE_TOOL, "create_issue", {"realm": "mcp-authz", "error": "insufficient_scope",
                                             "error_description": REASONS[Reason.SCOPE_TOOL].message,
                                             "scope": "github:create_issue", "resource_metadata": META}),
        (Reason.SCOPE_TOOL, "", {"realm": "mcp-authz", "error": "insufficient_scope",
                                 "error_description": REASONS[Reason.SCOPE_TOOL].message,
                                 "scope": "github", "resource_metadata": META}),
        (Reason.SCOPE_SERVER, "x", {"realm": "mcp-authz", "error": "insufficient_scope",
                                    "error_description": REASONS[Reason.SCOPE_SERVER].message,
                                    "scope": "github", "resource_metadata": META}),
    ],
)  # fmt: skip
def test_challenge_per_reason(reason: Reason, tool: str, expected: dict[str, str]) -> None:
    info = REASONS[reason]
    value = rm.challenge(info, info.message, BASE, "github", tool)
    assert value is not None
    assert params(value) == expected


@pytest.mark.parametrize("reason", [r for r in Reason if REASONS[r].status != 401 and r not in (
    Reason.SCOPE_SERVER, Reason.SCOPE_TOOL)])  # fmt: skip
def test_other_denials_carry_no_challenge(reason: Reason) -> None:
    assert rm.challenge(REASONS[reason], "m", BASE, "github", "t") is None


def test_without_a_known_host_or_server_the_challenge_has_no_metadata_url() -> None:
    info = REASONS[Reason.KEY_MISSING]
    assert params(rm.challenge(info, "", "", "github", "") or "") == {"realm": "mcp-authz", "scope": "github"}
    assert params(rm.challenge(info, "", BASE, "", "") or "") == {"realm": "mcp-authz"}
    assert params(rm.challenge(info, "", BASE, 'x", error="y', "") or "") == {"realm": "mcp-authz"}


@pytest.mark.parametrize(
    "tool",
    ['a", resource_metadata="https://evil', "a b", "a\\b", "x" * 300, "é", "a\r\nx-injected: 1"],
)
def test_a_tool_name_cannot_inject_into_the_challenge(tool: str) -> None:
    info = REASONS[Reason.SCOPE_TOOL]
    message = f"This gateway key may not call the tool '{tool}' on 'github'."  # as the pipeline words it
    value = rm.challenge(info, message, BASE, "github", tool) or ""
    got = params(value)
    assert got["scope"] == "github"  # the tool is left out, never half-quoted
    assert got["resource_metadata"] == META
    assert set(got) == {"realm", "error", "error_description", "scope", "resource_metadata"}
    assert all(" " <= c <= "~" for c in value)  # a header value: no control characters, no non-ASCII


def test_the_free_text_comes_last_so_first_match_parsers_read_the_real_parameters() -> None:
    """The MCP SDK takes the first `scope=` and `resource_metadata=` it finds: a message quoting them
    (escaped) must not come first."""
    message = 'x", scope="evil", resource_metadata="https://evil'
    value = rm.challenge(REASONS[Reason.SCOPE_SERVER], message, BASE, "github", "") or ""
    from mcp.client.auth.utils import extract_field_from_www_auth

    response = SimpleNamespace(headers={"WWW-Authenticate": value})  # all the SDK's parser reads
    assert extract_field_from_www_auth(response, "scope") == "github"  # type: ignore[arg-type]
    assert extract_field_from_www_auth(response, "resource_metadata") == META  # type: ignore[arg-type]
    assert extract_field_from_www_auth(response, "error") == "insufficient_scope"  # type: ignore[arg-type]
    assert params(value)["error_description"] == message


def test_a_key_sent_as_a_tool_name_is_never_a_scope() -> None:
    _, key = real_key()
    value = rm.challenge(REASONS[Reason.SCOPE_TOOL], "m", BASE, "github", key) or ""
    assert key not in value and params(value)["scope"] == "github"


@pytest.mark.parametrize(
    ("raw", "expected"), [("plain", '"plain"'), ('a"b', '"a\\"b"'), ("a\\b", '"a\\\\b"'), ("a\nb…", '"a?b?"')]
)
def test_quoted_string(raw: str, expected: str) -> None:
    assert rm.quoted(raw) == expected


def test_a_denial_carries_the_challenge_of_the_host_the_client_reached() -> None:
    denied = Denied(Reason.KEY_REVOKED)
    r = CheckResponse.FromString(resp.deny(denied, "rid", "github", origin="http://127.0.0.1:10000"))
    headers = {h.header.key: h.header.value for h in r.denied_response.headers}
    assert params(headers["www-authenticate"])["resource_metadata"] == (
        "http://127.0.0.1:10000/.well-known/oauth-protected-resource/mcp/github"
    )
    assert list(headers).count("www-authenticate") == 1


# --- the servicer on the metadata route ------------------------------------------------------------


def _metadata_request(path: str, host: str = "gw.example.com", method: str = "GET") -> CheckRequest:
    r = CheckRequest()
    http = r.attributes.request.http
    http.method, http.path, http.host, http.scheme = method, path, host, "https"
    r.attributes.context_extensions[rm.ROUTE_EXTENSION] = rm.METADATA_ROUTE
    return r


async def _sink(_items: object) -> None:
    return None


def _ask(servicer: AuthorizationServicer, request: CheckRequest) -> CheckResponse:
    answers: list[bytes | None] = []
    servicer.check(request, answers.append)
    (answer,) = answers
    assert answer is not None
    return CheckResponse.FromString(answer)


@pytest.fixture
def world() -> tuple[AuthorizationServicer, metrics_module.Metrics]:
    w = World()
    w.server("github", AuthMode.INDIVIDUAL)
    health_state = Health(60)
    health_state.serving = True
    metrics = metrics_module.create()
    servicer = AuthorizationServicer(w.pipeline(), health_state, metrics, BatchWriter("audit", _sink, 10),
                                     LastUsed(None, 60))  # type: ignore[arg-type]
    return servicer, metrics


@pytest.mark.parametrize(
    ("path", "method", "host", "status", "error"),
    [
        ("/.well-known/oauth-protected-resource/mcp/github", "HEAD", "gw.example.com", 200, None),
        ("/.well-known/oauth-protected-resource/mcp/nope", "GET", "gw.example.com", 404, "not_found"),
        ("/.well-known/oauth-protected-resource", "GET", "gw.example.com", 404, "not_found"),
        ("/.well-known/oauth-protected-resource/mcp/github", "POST", "gw.example.com", 405, "method_not_allowed"),
        ("/.well-known/oauth-protected-resource/mcp/github", "OPTIONS", "gw.example.com", 204, None),
        ("/.well-known/oauth-protected-resource/mcp/github", "GET", 'x"y', 400, "bad_host"),
    ],
)
def test_the_metadata_route_is_answered_by_check(
    world: tuple[AuthorizationServicer, metrics_module.Metrics],
    path: str, method: str, host: str, status: int, error: str | None,
) -> None:  # fmt: skip
    servicer, _ = world
    r = _ask(servicer, _metadata_request(path, host, method))
    assert r.status.code != code_pb2.OK  # never forwarded
    assert r.denied_response.status.code == status
    headers = {h.header.key: h.header.value for h in r.denied_response.headers}
    assert headers["access-control-allow-origin"] == "*"  # public: browser-based clients may read it
    if status == 204:
        assert r.denied_response.body == "" and "content-type" not in headers
        assert headers["access-control-allow-methods"] == "GET, HEAD, OPTIONS"
        assert headers["access-control-allow-headers"] == "*"
        return
    body = json.loads(r.denied_response.body)
    if error:
        assert body["error"] == error and body["message"]
    assert headers["content-type"] == "application/json"
    assert r.dynamic_metadata.fields["decision"].string_value == rm.METADATA_ROUTE  # no usage record


def test_the_metadata_of_a_registered_server(world: tuple[AuthorizationServicer, metrics_module.Metrics]) -> None:
    servicer, metrics = world
    r = _ask(servicer, _metadata_request("/.well-known/oauth-protected-resource/mcp/github"))
    assert r.denied_response.status.code == 200
    assert json.loads(r.denied_response.body) == rm.document("https://gw.example.com", "github")
    # A made-up server in the path never becomes a metric label.
    for n in range(3):
        _ask(servicer, _metadata_request(f"/.well-known/oauth-protected-resource/mcp/made-up-{n}"))
    (family,) = [m for m in metrics.collect_checks() if m.name == "mcp_authz_check_decisions"]
    labels = {(s.labels["decision"], s.labels["reason"], s.labels["server"]) for s in family.samples}
    assert labels == {("resource_metadata", "", "github"), ("resource_metadata", "404", "")}


def test_a_refused_key_on_an_mcp_route_points_at_the_metadata(
    world: tuple[AuthorizationServicer, metrics_module.Metrics],
) -> None:
    servicer, _ = world
    r = CheckRequest()
    http = r.attributes.request.http
    http.method, http.path, http.host, http.scheme = "POST", "/mcp/github", "gw.example.com", "https"
    http.headers["authorization"] = "Bearer not-a-gateway-key"
    r.attributes.context_extensions["mcp_server"] = "github"
    answer = _ask(servicer, r)
    assert answer.denied_response.status.code == 401
    (challenge,) = [h.header.value for h in answer.denied_response.headers if h.header.key == "www-authenticate"]
    assert params(challenge) == {
        "realm": "mcp-authz", "error": "invalid_token", "error_description": REASONS[Reason.KEY_MALFORMED].message,
        "scope": "github", "resource_metadata": "https://gw.example.com/.well-known/oauth-protected-resource/mcp/github",
    }  # fmt: skip
