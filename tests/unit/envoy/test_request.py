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
