"""envoy/request.py: CheckRequest -> CheckInput, the MCP filter's metadata included when it can be trusted."""

from __future__ import annotations

import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from google.protobuf.struct_pb2 import Struct

from authz_server.envoy import request as req


def _check_request(with_mcp: bool = False, **mcp_extra: object) -> CheckRequest:
    r = CheckRequest()
    http = r.attributes.request.http
    http.method = "POST"
    http.path = "/mcp/github?x=1"
    http.id = "14281444534026025030"  # Envoy's stream id, not the request id
    http.host, http.scheme = "gw.example.com:8443", "https"
    http.headers["x-request-id"] = "rid-7"
    http.headers["authorization"] = "Bearer mgw_x"
    r.attributes.context_extensions["mcp_server"] = "github"
    r.attributes.source.address.socket_address.address = "10.1.2.3"
    if with_mcp:
        s = Struct()
        s.update({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "search"},
                  "is_mcp_request": True, "status": "mcp_ok", **mcp_extra})
        r.attributes.metadata_context.filter_metadata[req.MCP_FILTER_NAMESPACE].CopyFrom(s)
    return r


def test_request_translation() -> None:
    inp = req.to_input(_check_request())
    assert (inp.method, inp.path, inp.request_id, inp.source_ip) == ("POST", "/mcp/github?x=1", "rid-7", "10.1.2.3")
    assert inp.headers["authorization"] == "Bearer mgw_x"
    assert inp.context_extensions["mcp_server"] == "github"
    assert (inp.mcp_method, inp.tool) == ("", "")
    assert (inp.host, inp.scheme) == ("gw.example.com:8443", "https")  # what the Bearer challenge names


def test_request_translation_reads_mcp_filter_metadata() -> None:
    inp = req.to_input(_check_request(with_mcp=True))
    assert (inp.mcp_method, inp.tool) == ("tools/call", "search")


def test_params_name_is_a_tool_only_for_tools_call() -> None:
    inp = req.to_input(_check_request(with_mcp=True, method="prompts/get"))
    assert (inp.mcp_method, inp.tool) == ("prompts/get", "")


@pytest.mark.parametrize("extra", [{"is_exceeding_limit": True}, {"passthrough_reason": "mcp_duplicate_keys"}])
def test_untrustworthy_mcp_metadata_is_ignored(extra: dict[str, object]) -> None:
    inp = req.to_input(_check_request(with_mcp=True, **extra))
    assert (inp.mcp_method, inp.tool) == ("", "")


# --- what upb cannot read: parse() never raises ------------------------------------------------------


def _deep_struct(levels: int) -> bytes:
    """A google.protobuf.Struct {"a": {"a": ... {}}} nested `levels` deep, serialized by hand (upb refuses it)."""
    struct = b""
    for _ in range(levels):
        struct = _ld(1, _ld(1, b"a") + _ld(2, _ld(5, struct)))
    return struct


def _ld(number: int, value: bytes) -> bytes:
    from authz_server.envoy.protowire import length_delimited

    return length_delimited(number, value)


def _with_mcp_metadata(request: CheckRequest, struct: bytes) -> bytes:
    """`request` serialized, with the MCP filter's namespace set to `struct` (appended: messages merge)."""
    entry = _ld(1, req.MCP_FILTER_NAMESPACE.encode()) + _ld(2, struct)
    return request.SerializeToString() + _ld(1, _ld(11, _ld(1, entry)))


def _tool_call_metadata(name: bytes) -> bytes:
    """{"method": "tools/call", "params": {"name": <name, a serialized Value>}}"""
    method = _ld(1, _ld(1, b"method") + _ld(2, _ld(3, b"tools/call")))
    params = _ld(1, _ld(1, b"params") + _ld(2, _ld(5, _ld(1, _ld(1, b"name") + _ld(2, name)))))
    return method + params


def test_a_request_upb_reads_is_returned_as_it_is() -> None:
    request = _check_request(with_mcp=True)
    parsed = req.parse(request.SerializeToString())
    assert isinstance(parsed, CheckRequest) and parsed == request
    shallow = req.parse(_with_mcp_metadata(_check_request(), _tool_call_metadata(_ld(3, b"search"))))
    assert isinstance(shallow, CheckRequest)
    assert (req.to_input(shallow).mcp_method, req.to_input(shallow).tool) == ("tools/call", "search")


@pytest.mark.parametrize("levels", [40, 100, 5000])
def test_metadata_too_deep_for_upb_is_dropped_and_the_rest_kept(levels: int) -> None:
    data = _with_mcp_metadata(_check_request(), _tool_call_metadata(_ld(5, _deep_struct(levels))))
    parsed = req.parse(data)
    assert isinstance(parsed, req.WithoutMetadata) and (parsed.why, parsed.size) == ("unreadable", len(data))
    inp = req.to_input(parsed.request)
    assert (inp.method, inp.path, inp.request_id, inp.source_ip) == ("POST", "/mcp/github?x=1", "rid-7", "10.1.2.3")
    assert inp.headers["authorization"] == "Bearer mgw_x" and inp.context_extensions["mcp_server"] == "github"
    assert (inp.mcp_method, inp.tool) == ("", "")  # nothing guessed from what could not be read


def test_metadata_over_the_size_bound_is_dropped_and_a_request_over_it_without_is_unreadable() -> None:
    huge = _ld(1, _ld(1, b"_meta") + _ld(2, _ld(3, b"x" * req.MAX_REQUEST_BYTES)))
    parsed = req.parse(_with_mcp_metadata(_check_request(with_mcp=True), huge))
    assert isinstance(parsed, req.WithoutMetadata) and parsed.why == "too_large"
    assert req.to_input(parsed.request).tool == ""
    long_path = _check_request()
    long_path.attributes.request.http.path = "/" + "x" * req.MAX_REQUEST_BYTES
    assert req.parse(long_path.SerializeToString()) == req.Unreadable("too_large", long_path.ByteSize())


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x0a\x05ab", b"\x0b", _check_request().SerializeToString()[:-1]])
def test_bytes_that_are_no_check_request_are_unreadable(data: bytes) -> None:
    assert req.parse(data) == req.Unreadable("malformed", len(data))


def test_fuzz_parse_never_raises_and_agrees_with_upb_whenever_upb_reads_it() -> None:
    """Random bytes, a real request cut at every length or with bytes flipped, deep and huge metadata at
    random: `parse` always returns, a CheckRequest exactly when upb reads the bytes whole."""
    import random

    from google.protobuf.message import DecodeError

    rng = random.Random(13)
    real = _check_request(with_mcp=True).SerializeToString()
    inputs = [rng.randbytes(rng.randrange(0, 80)) for _ in range(5_000)]
    inputs += [real[:cut] for cut in range(len(real))]
    for _ in range(5_000):
        flipped = bytearray(real)
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        inputs.append(bytes(flipped))
    inputs += [_with_mcp_metadata(_check_request(), _deep_struct(rng.randrange(1, 300))) for _ in range(200)]
    for data in inputs:
        parsed = req.parse(data)
        try:
            whole = CheckRequest.FromString(data)
        except DecodeError:
            assert isinstance(parsed, (req.WithoutMetadata, req.Unreadable))
            if isinstance(parsed, req.WithoutMetadata):
                req.to_input(parsed.request)
        else:
            assert isinstance(parsed, CheckRequest) and parsed == whole
