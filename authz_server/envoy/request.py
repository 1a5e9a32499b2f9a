"""CheckRequest -> CheckInput. The only place that reads Envoy's request protobuf."""

from __future__ import annotations

from envoy.service.auth.v3.external_auth_pb2 import CheckRequest

from authz_server.pipeline.types import CheckInput

MCP_FILTER_NAMESPACE = "envoy.filters.http.mcp"


def to_input(request: CheckRequest) -> CheckInput:
    attrs = request.attributes
    http = attrs.request.http
    mcp_method, tool = "", ""
    filter_metadata = attrs.metadata_context.filter_metadata
    if MCP_FILTER_NAMESPACE in filter_metadata:
        mcp_method, tool = _mcp_fields(filter_metadata[MCP_FILTER_NAMESPACE])
    return CheckInput(
        method=http.method,
        path=http.path,
        headers=http.headers,  # a read-only protobuf map with lowercase keys; not copied
        context_extensions=attrs.context_extensions,
        # http.id is Envoy's internal stream id; the upstream sees x-request-id, so that is the id we sign and log.
        request_id=http.headers.get("x-request-id", ""),
        source_ip=attrs.source.address.socket_address.address,
        mcp_method=mcp_method,
        tool=tool,
    )


def _mcp_fields(struct: object) -> tuple[str, str]:
    """`method` and `params.name` from the MCP filter's metadata.

    When the filter only read part of the body (`is_exceeding_limit`) or passed it on
    with a reason (`passthrough_reason`, e.g. duplicate keys an upstream parser might
    read differently), neither is trustworthy: both are returned empty, so a key
    limited to certain tools is refused rather than judged on a guess.
    """
    fields = struct.fields  # type: ignore[attr-defined]
    if "passthrough_reason" in fields or ("is_exceeding_limit" in fields and fields["is_exceeding_limit"].bool_value):
        return "", ""
    method = fields["method"].string_value if "method" in fields else ""
    tool = ""
    if method == "tools/call" and "params" in fields:  # elsewhere params.name is a prompt, not a tool
        params = fields["params"].struct_value.fields
        if "name" in params:
            tool = params["name"].string_value
    return method, tool
