"""pipeline/grants.py: a (key, server) pair's constant mutations are built once, and rebuilt when
the state changes, the override expires, or the key came from elsewhere."""

from __future__ import annotations

from dataclasses import replace

import pytest

from authz_server.errors import Denied

from ..fakes import alice_key, bob_key, request, standard_world


def test_a_grant_is_built_once_per_key_and_server_and_each_request_gets_its_own_signature() -> None:
    w = standard_world()
    key = alice_key(w)
    pipeline = w.pipeline()
    first = pipeline.decide(request(bearer=key))
    second = pipeline.decide(replace(request(bearer=key), request_id="req-2"))
    assert second.grant is first.grant
    assert dict(first.headers_to_set)["x-request-id"] == "req-1" and dict(second.headers_to_set)["x-request-id"] == "req-2"
    assert dict(first.headers_to_set)["x-mcp-authz-signature"] != dict(second.headers_to_set)["x-mcp-authz-signature"]
    assert pipeline.decide(request(bearer=key, server="linear")).grant is not first.grant  # per server


def test_a_state_change_rebuilds_the_grant() -> None:
    w = standard_world()
    key = alice_key(w)
    pipeline = w.pipeline()
    assert dict(pipeline.decide(request(bearer=key)).headers_to_set)["authorization"] == "Bearer alice-gh"
    w.override(w.state.principals["p_alice"], "github", {"API_KEY": "alice-gh-2"})
    assert dict(pipeline.decide(request(bearer=key)).headers_to_set)["authorization"] == "Bearer alice-gh"  # no change applied
    w.state.version += 1  # what the follower does after every change it applies
    assert dict(pipeline.decide(request(bearer=key)).headers_to_set)["authorization"] == "Bearer alice-gh-2"


def test_a_grant_ends_when_its_override_expires() -> None:
    w = standard_world()
    alice = w.principal("alice")
    key = w.key(alice)
    w.override(alice, "github", {"API_KEY": "soon-gone"}, expires_in=10)
    w.override(alice, "linear", {"API_KEY": "own-linear"}, expires_in=10)
    pipeline = w.pipeline()
    assert dict(pipeline.decide(request(bearer=key)).headers_to_set)["authorization"] == "Bearer soon-gone"
    assert dict(pipeline.decide(request(bearer=key, server="linear")).headers_to_set)["authorization"] == "Bearer own-linear"
    w.now += 11  # no change-log event: only the clock moved
    with pytest.raises(Denied) as exc:
        pipeline.decide(request(bearer=key))
    assert exc.value.reason == "credential_missing"
    assert dict(pipeline.decide(request(bearer=key, server="linear")).headers_to_set)["authorization"] == "Bearer shared-linear"


def test_where_the_key_came_from_decides_whether_authorization_is_removed_even_when_cached() -> None:
    w = standard_world()
    key = bob_key(w)
    pipeline = w.pipeline()
    assert "authorization" in pipeline.decide(request(bearer=key, server="open")).headers_to_remove
    from_header = pipeline.decide(request(headers={"x-api-key": key, "authorization": "Basic dXNlcg=="}, server="open"))
    assert "authorization" not in from_header.headers_to_remove  # the client's own Authorization passes
