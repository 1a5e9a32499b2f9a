"""envoy/response.py: Decision/Denied -> CheckResponse. An allow reuses the grant's bytes; a denial
is a JSON-RPC error from a template per reason, and shows no key a caller sent."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3.base_pb2 import HeaderValueOption
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse
from google.rpc import code_pb2

from authz_server.envoy import response as resp
from authz_server.errors import REASONS, Denied, Reason
from authz_server.models import AuthMode, Role
from authz_server.pipeline.types import Decision, Grant

from ..fakes import World, assert_no_key, real_key, redacted, request


def _grant() -> Grant:
    return Grant(
        headers=(("authorization", "Bearer up"), ("x-user-id", "alice")),
        remove=("x-api-key",),
        metadata={"principal": "alice", "decision": "allow"},
        identity_values=("alice", "user", "eng", "user"),
        signing_secret=b"s",
        principal_id="p_alice",
        key_id="K1",
        server="github",
        version=1,
        expires_at=None,
    )


def test_allow_overwrites_every_header_and_removes() -> None:
    grant = _grant()
    decision = Decision(grant, ((":path", "/mcp/github"), ("x-request-id", "rid-1")), {"tool": "search"})
    r = CheckResponse.FromString(resp.allow(decision))
    assert r.status.code == code_pb2.OK
    assert [(h.header.key, h.header.value) for h in r.ok_response.headers] == list(decision.headers_to_set)
    assert all(h.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD for h in r.ok_response.headers)
    assert list(r.ok_response.headers_to_remove) == ["x-api-key"]
    assert {k: v.string_value for k, v in r.dynamic_metadata.fields.items()} == {
        "principal": "alice", "decision": "allow", "tool": "search"}


def test_a_grant_is_serialized_once_and_each_request_keeps_its_own_headers() -> None:
    grant = _grant()
    first = CheckResponse.FromString(resp.allow(Decision(grant, (("x-request-id", "rid-1"),), {})))
    wire = grant.wire
    second = CheckResponse.FromString(resp.allow(Decision(grant, (("x-request-id", "rid-2"),), {"tool": "add"})))
    assert grant.wire is wire  # reused, not rebuilt
    assert dict((h.header.key, h.header.value) for h in first.ok_response.headers)["x-request-id"] == "rid-1"
    assert dict((h.header.key, h.header.value) for h in second.ok_response.headers)["x-request-id"] == "rid-2"
    assert "tool" not in first.dynamic_metadata.fields
    assert second.dynamic_metadata.fields["tool"].string_value == "add"
    assert second.dynamic_metadata.fields["principal"].string_value == "alice"


@pytest.mark.parametrize(
    ("headers", "metadata"),
    [
        ((), {}),
        (((":path", "/mcp/github?x=1"), ("x-request-id", "rid")), {"tool": "search", "mcp_method": "tools/call"}),
        ((("x-long", "v" * 200), ("x-longer", "w" * 20_000)), {"tool": "t" * 300}),  # multi-byte lengths
        ((("x-user-id", "zoë ☃"),), {"tool": "añadir"}),  # UTF-8
    ],
)
def test_request_part_parses_merged_with_the_grant(
    headers: tuple[tuple[str, str], ...], metadata: dict[str, str]
) -> None:
    grant = _grant()
    got = CheckResponse.FromString(resp.allow(Decision(grant, headers, metadata)))
    expected = CheckResponse.FromString(grant.wire)
    for name, value in headers:
        option = expected.ok_response.headers.add(append_action=HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)
        option.header.key, option.header.value = name, value
    if metadata:
        expected.dynamic_metadata.update(metadata)
    assert got == expected


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_has_a_json_denial(reason: Reason) -> None:
    denied = Denied(reason, retry_after=7 if reason is Reason.RATE_LIMITED else None)
    r = CheckResponse.FromString(resp.deny(denied, "rid-9", "github"))
    status = r.denied_response.status.code
    assert status == REASONS[reason].status
    assert r.status.code != code_pb2.OK
    headers = {h.header.key: h.header.value for h in r.denied_response.headers}
    assert all(h.append_action == HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD for h in r.denied_response.headers)
    body = json.loads(r.denied_response.body)
    assert body["jsonrpc"] == "2.0" and body["id"] is None
    assert body["error"]["code"] == resp.RPC_ERROR_CODE[status]
    assert body["error"]["message"] == REASONS[reason].message
    assert body["error"]["data"] == {"reason": reason.value, "status": status, "hint": REASONS[reason].hint, "request_id": "rid-9"}
    assert headers["content-type"] == "application/json"
    if status == 401:
        assert headers["www-authenticate"].startswith('Bearer realm="mcp-authz"')
        assert ("error=" in headers["www-authenticate"]) == (reason is not Reason.KEY_MISSING)
    elif reason in (Reason.SCOPE_SERVER, Reason.SCOPE_TOOL):
        assert 'error="insufficient_scope"' in headers["www-authenticate"]
    else:
        assert "www-authenticate" not in headers
    if reason is Reason.RATE_LIMITED:
        assert headers["retry-after"] == "7"
    assert r.dynamic_metadata.fields["reason"].string_value == reason.value
    assert r.dynamic_metadata.fields["server"].string_value == "github"


def test_denials_of_one_kind_share_a_template_but_keep_their_own_request_id() -> None:
    denied = Denied(Reason.KEY_UNKNOWN, key_id="K1")
    tricky = 'rid "quoted" \\ \u2603'
    first = CheckResponse.FromString(resp.deny(denied, "rid-1", "github"))
    second = CheckResponse.FromString(resp.deny(denied, tricky, "slack", tool="add"))
    assert json.loads(first.denied_response.body)["error"]["data"]["request_id"] == "rid-1"
    assert json.loads(second.denied_response.body)["error"]["data"]["request_id"] == tricky  # escaped, not spliced raw
    def template(r: CheckResponse) -> list[object]:  # all but the challenge, which names the server
        return [h for h in r.denied_response.headers if h.header.key != "www-authenticate"]

    assert template(first) == template(second)
    assert second.dynamic_metadata.fields["server"].string_value == "slack"
    assert second.dynamic_metadata.fields["tool"].string_value == "add"
    assert second.dynamic_metadata.fields["key_id"].string_value == "K1"


# --- a key-shaped tool name in a denial ------------------------------------------------------


def test_a_key_shaped_tool_name_is_redacted_in_the_denial_body() -> None:
    w = World()
    w.server("github", AuthMode.INDIVIDUAL)
    caller = w.key(w.principal("alice", roles=(Role.USER,)), scope=("github:search",))
    tool_id, tool = real_key()  # someone else's key, sent as the tool name
    inp = request(bearer=caller, mcp_method="tools/call", tool=tool)
    with pytest.raises(Denied) as refused:
        w.pipeline().decide(inp)
    assert refused.value.code is Reason.SCOPE_TOOL
    r = CheckResponse.FromString(resp.deny(refused.value, inp.request_id, "github", inp.tool, inp.mcp_method))
    body = r.denied_response.body
    assert_no_key(body, tool)
    assert f"'{redacted(tool_id)}'" in json.loads(body)["error"]["message"]
    for header in r.denied_response.headers:
        assert_no_key(header.header.value, tool)
