"""The plain values that flow through the decision pipeline. No protobuf here.

    CheckInput --authn--> Identity --resolve--> Credentials --mutate--> Grant + this request = Decision
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

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
    host: str = ""  # the Host (:authority) the client sent
    scheme: str = ""  # "http" or "https", as Envoy's listener received the request


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


@dataclass(slots=True)
class Grant:
    """The part of an allow decision that is the same for every request of one key on
    one server: credential and identity headers, headers to remove, and metadata.
    Built once and reused until the state changes or the credentials expire."""

    headers: tuple[tuple[str, str], ...]
    remove: tuple[str, ...]
    metadata: Mapping[str, str]
    identity_values: tuple[str, ...]  # user, type, team, roles: what the signature covers
    signing_secret: bytes
    principal_id: str
    key_id: str
    server: str
    version: int  # the AuthState.version it was built from
    expires_at: float | None  # when the credentials it injects expire
    wire: bytes = b""  # the response translator's cache of this grant, serialized


@dataclass(frozen=True, slots=True)
class Decision:
    """An allowed request: what Envoy must change before forwarding it.
    `grant` is shared between requests; the rest belongs to this request alone."""

    grant: Grant
    request_headers: tuple[tuple[str, str], ...]  # :path, x-request-id, timestamp, signature
    request_metadata: Mapping[str, str]  # tool and MCP method, when known

    @property
    def headers_to_set(self) -> tuple[tuple[str, str], ...]:
        return self.grant.headers + self.request_headers

    @property
    def headers_to_remove(self) -> tuple[str, ...]:
        return self.grant.remove

    @property
    def metadata(self) -> Mapping[str, str]:
        return {**self.grant.metadata, **self.request_metadata}

    @property
    def principal_id(self) -> str:
        return self.grant.principal_id

    @property
    def key_id(self) -> str:
        return self.grant.key_id

    @property
    def server(self) -> str:
        return self.grant.server
