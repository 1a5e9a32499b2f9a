"""CheckRequest -> CheckInput. The only place that reads Envoy's request protobuf.

`parse` reads what the core loop received, and never raises. A request upb reads whole is
returned as it is. One it cannot read (or larger than `MAX_REQUEST_BYTES`, a bound of our
own) is read again at the wire level without its dynamic metadata (`WithoutMetadata`), or,
when even the rest does not read, not at all (`Unreadable`): the servicer refuses it with
`request_unreadable`, a 400, and never answers Check with a gRPC error (which Envoy turns
into a 503 for everyone's request alike).

Why drop the metadata rather than refuse the request: the metadata is the only part of a
CheckRequest shaped by the request body. Envoy's MCP filter copies `params.name` and
`params._meta` into it at whatever depth the body has, and past about 30 levels of JSON
upb refuses the whole message (its limit is 100 nested messages). The rest (method, path,
headers, `context_extensions`, source) is Envoy's own and is all the decision needs but
the tool. Without the metadata the MCP method and tool are unknown, as when the filter
passed a body through (`_mcp_fields`): a key limited to certain tools is refused (the tool
scope fails closed), and a valid key that may use the whole server is allowed, so a
well-formed call with deep arguments in `_meta` still works for it, and its usage is
recorded. Nothing of the dropped metadata is guessed at: no tool name is read from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from google.protobuf.message import DecodeError

from authz_server.envoy import protowire
from authz_server.pipeline.types import CheckInput

MCP_FILTER_NAMESPACE = "envoy.filters.http.mcp"
# What the shipped Envoy sends is far smaller: the MCP filter's metadata comes from at most
# 64 KiB of body (envoy.yaml's max_request_body_size), headers are capped at 60 KiB and only
# a few are sent. A larger request is read without its metadata, or not at all.
MAX_REQUEST_BYTES = 1 << 20
_ATTRIBUTES = 1  # CheckRequest.attributes
_METADATA = frozenset({11, 13})  # AttributeContext.metadata_context, .route_metadata_context


@dataclass(frozen=True, slots=True)
class WithoutMetadata:
    """A CheckRequest read without its dynamic metadata, which was too deep or too large to read."""

    request: CheckRequest
    why: str  # "unreadable" (upb refused it) or "too_large" (over MAX_REQUEST_BYTES)
    size: int


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A CheckRequest the sidecar cannot read at all: refused with Reason.REQUEST_UNREADABLE."""

    why: str  # "malformed" or "too_large"
    size: int


Parsed: TypeAlias = CheckRequest | WithoutMetadata | Unreadable


def parse(data: bytes) -> Parsed:
    """The core loop's reader for Check: never raises."""
    if len(data) <= MAX_REQUEST_BYTES:
        try:
            request: CheckRequest = CheckRequest.FromString(data)
            return request
        except DecodeError:
            why = "unreadable"
    else:
        why = "too_large"
    try:
        rest = _without_metadata(data)
    except protowire.WireError:
        return Unreadable("malformed", len(data))
    if len(rest) > MAX_REQUEST_BYTES:
        return Unreadable("too_large", len(data))
    try:
        return WithoutMetadata(CheckRequest.FromString(rest), why, len(data))
    except DecodeError:
        return Unreadable("malformed", len(data))


def _without_metadata(data: bytes) -> bytes:
    """The CheckRequest in `data` without the dynamic metadata in its attributes (each occurrence
    of `attributes` rewritten, every other field kept as it was)."""
    parts: list[bytes] = []
    for field in protowire.fields(data):
        if field.number == _ATTRIBUTES and field.kind == protowire.LEN:
            attributes = protowire.without(data, _METADATA, field.start, field.end)
            parts.append(protowire.length_delimited(_ATTRIBUTES, attributes))
        else:
            parts.append(data[field.key_start : field.end])
    return b"".join(parts)


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
        host=http.host,
        scheme=http.scheme,
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
