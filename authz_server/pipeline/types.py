"""The plain values that flow through the decision pipeline. No protobuf here.

    CheckInput --authn--> Identity --resolve--> Credentials --mutate--> Decision
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from authz_server.models import Principal


@dataclass(frozen=True, slots=True)
class CheckInput:
    """What the pipeline needs of one Envoy CheckRequest."""

    method: str
    path: str  # with query string, as Envoy received it
    headers: Mapping[str, str]  # lowercase names
    context_extensions: Mapping[str, str]
    request_id: str = ""
    source_ip: str = ""
    mcp_method: str = ""  # JSON-RPC method, when Envoy's MCP filter supplies it
    tool: str = ""  # tools/call tool name, when known


@dataclass(frozen=True, slots=True)
class PresentedKey:
    """A gateway key found in the request, and where."""

    key: str
    source: str  # "bearer", "header" or "path"
    path_without_key: str | None = None  # the path with key-shaped segments removed, when it had any


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller."""

    principal: Principal
    key_id: str
    scope: tuple[str, ...]
    key_source: PresentedKey


@dataclass(frozen=True, slots=True)
class Decision:
    """An allowed request: what Envoy must change before forwarding it."""

    headers_to_set: tuple[tuple[str, str], ...]
    headers_to_remove: tuple[str, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    principal_id: str = ""
    key_id: str = ""
    server: str = ""
