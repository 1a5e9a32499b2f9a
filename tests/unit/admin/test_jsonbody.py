"""admin/jsonbody.py: what Envoy's transcoder would drop silently (a JSON field the method does not
have) is refused with 400 before it, read from the descriptor's HTTP rules."""

from __future__ import annotations

import json

import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from google.rpc import code_pb2

from authz_server.admin import jsonbody
from authz_server.admin.rpcs import RPCS
from authz_server.crypto import keys as gateway_keys

EXPIRY = "2030-01-01T00:00:00Z"


@pytest.mark.parametrize(
    ("verb", "path", "body", "refused"),
    [
        # The misspelt expiry of CreateKey, and the right one in both JSON spellings.
        ("POST", "/admin/v1/keys", {"expires": EXPIRY}, "Unknown field in the request body: expires. "
                                                        "CreateKey takes principal, label, expires_at, scope."),
        ("POST", "/admin/v1/keys", {"expires_at": EXPIRY, "label": "ci"}, None),
        ("POST", "/admin/v1/keys", {"expiresAt": EXPIRY}, None),
        ("POST", "/admin/v1/keys?x=1", {"labels": "ci", "scopes": []}, "Unknown fields in the request body: labels, scopes."),
        # Path templates: one variable, two, a custom verb, an additional binding.
        ("PATCH", "/admin/v1/servers/github", {"upstreamUrl": "https://x", "description": "d"}, None),
        ("PATCH", "/admin/v1/servers/github", {"upstream": "https://x"}, "Unknown field in the request body: upstream."),
        ("PUT", "/admin/v1/overrides/github/alice", {"values": {"ANY_NAME": "v"}, "expires": EXPIRY}, "expires"),
        ("PUT", "/admin/v1/overrides/github", {"values": {"ANY_NAME": "v"}}, None),  # a map's keys are its own
        ("POST", "/admin/v1/keys/AbC1234:regenerate", {"grace": 60}, "RegenerateKey takes key_id, grace_seconds."),
        ("POST", "/admin/v1/overrides/github:test", {"principal": "alice"}, None),
        # Not for this check: no body, not JSON (the transcoder's 400), no admin method, a GET.
        ("POST", "/admin/v1/keys", "", None),
        ("POST", "/admin/v1/keys", "{not json", None),
        ("POST", "/admin/v1/nothing", {"x": 1}, None),
        ("GET", "/admin/v1/keys", {"x": 1}, None),
        ("POST", "/mcp/demo", {"jsonrpc": "2.0"}, None),
    ],
)  # fmt: skip
def test_unknown_body_fields_are_refused(verb: str, path: str, body: object, refused: str | None) -> None:
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    why = jsonbody.refusal(verb, path, raw)
    if refused is None:
        assert why is None
    else:
        assert why is not None and refused in why


def test_a_name_that_could_be_a_secret_is_not_echoed() -> None:
    key = gateway_keys.generate()[1].reveal()
    for name in (key, "ghp token with spaces", "x" * 65):
        why = jsonbody.refusal("POST", "/admin/v1/keys", json.dumps({name: 1}).encode())
        assert why is not None and name not in why and "(a name that is no field name)" in why


def test_every_method_with_a_body_is_covered() -> None:
    """Read from the HTTP rules: a method added later is checked without being declared here."""
    covered = {r.method for r in jsonbody.ROUTES}
    assert covered >= {"AddServer", "UpdateServer", "CreateKey", "SetOverride", "AddPrincipal", "RegenerateKey"}
    assert covered <= {r.name for r in RPCS}


def test_check_answers_ok_or_400_with_the_transcoders_error_shape() -> None:
    request = CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.raw_body = "POST", "/admin/v1/keys", b'{"expires": "2030-01-01T00:00:00Z"}'
    answer = jsonbody.check(request)
    assert answer.status.code == code_pb2.INVALID_ARGUMENT and answer.denied_response.status.code == 400
    body = json.loads(answer.denied_response.body)
    assert body["code"] == 3 and body["message"].startswith("Unknown field in the request body: expires.")
    assert [(h.header.key, h.header.value) for h in answer.denied_response.headers] == [("content-type", "application/json")]
    http.raw_body = b'{"expires_at": "2030-01-01T00:00:00Z"}'
    assert jsonbody.check(request).status.code == code_pb2.OK
    http.raw_body, http.body = b"", '{"expires": 1}'  # a body Envoy sent as text
    assert jsonbody.check(request).status.code == code_pb2.INVALID_ARGUMENT


def test_anything_but_the_admin_api_is_refused_so_a_misrouted_check_fails_closed() -> None:
    request = CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "POST", "/mcp/demo"
    http.raw_body = b'{"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "add"}}'
    answer = jsonbody.check(request)
    assert answer.status.code == code_pb2.PERMISSION_DENIED and answer.denied_response.status.code == 403
    assert "Check listener" in json.loads(answer.denied_response.body)["message"]
    http.path = "/admin/v1/servers"  # a GET of the admin API: nothing to check
    http.method, http.raw_body = "GET", b""
    assert jsonbody.check(request).status.code == code_pb2.OK


def test_nested_messages_and_a_body_mapped_to_one_field() -> None:
    """No request nests a message today; a method that does (or maps its body to one field) is
    checked through the nested message's own fields."""
    from authz_server.admin.gen import admin_pb2 as pb

    reply = pb.CreateKeyResponse.DESCRIPTOR
    assert jsonbody.unknown_fields(reply, {"key": {"key_id": "x", "bogus": 1}, "api_key": "k"}) == ["key.bogus"]
    assert jsonbody.unknown_fields(reply, {"key": [{"labels": 1}]}) == ["key.labels"]
    assert jsonbody._message_of(reply, "key") is pb.GatewayKey.DESCRIPTOR
    assert jsonbody._message_of(pb.CreateKeyRequest.DESCRIPTOR, "expires_at") is None  # a Timestamp is a string
    assert jsonbody._message_of(pb.CreateKeyRequest.DESCRIPTOR, "") is None


def test_a_refusal_names_at_most_ten_fields() -> None:
    why = jsonbody.refusal("POST", "/admin/v1/keys", json.dumps({f"f{i}": 1 for i in range(5000)}).encode())
    assert why is not None and "f0, f1," in why and "f9 and 4990 more." in why and len(why) < 300
