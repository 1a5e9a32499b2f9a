"""Stage 6: turn an allowed request into header mutations.

- credential headers from the server's templates, overwriting;
- the gateway key removed from wherever it came (a path key rewrites `:path`);
- client-sent identity headers replaced by the verified ones, always;
- an HMAC-SHA256 signature an upstream can check (examples/verify_signature.py):
      v1 \\n timestamp \\n METHOD \\n path \\n x-user-id \\n x-user-type \\n x-user-team \\n x-user-roles \\n x-request-id
  keyed with the server's signing secret, sent as `v1=<hex>` with the timestamp.
"""

from __future__ import annotations

import hmac

from authz_server.crypto import keys
from authz_server.pipeline.resolve import Credentials
from authz_server.pipeline.types import CheckInput, Decision, Grant, Identity
from authz_server.live.tables import ServerEntry
from authz_server.rules import IDENTITY_HEADERS, REQUEST_ID_HEADER


def sign(secret: bytes, timestamp: str, method: str, path: str, identity: tuple[str, ...], request_id: str) -> str:
    message = "\n".join(("v1", timestamp, method.upper(), path, *identity, request_id))
    return "v1=" + hmac.digest(secret, message.encode(), "sha256").hex()


class Mutator:
    def __init__(self, key_header: str, signature_header: str, timestamp_header: str) -> None:
        self._key_header = key_header
        self._signature_header = signature_header
        self._timestamp_header = timestamp_header

    def grant(
        self,
        identity: Identity,
        server: ServerEntry,
        credentials: Credentials,
        strip_authorization: bool,
        version: int,
    ) -> Grant:
        """The mutations every request of this key on this server gets. `strip_authorization`:
        the request's Authorization header carried the gateway key, so it must not reach upstream
        unless a credential template overwrites it."""
        principal = identity.principal
        identity_values = (
            principal.name,
            principal.kind.value,
            principal.team,
            ",".join(r.value for r in principal.roles),
        )
        to_set: list[tuple[str, str]] = list(credentials.headers)
        to_remove: list[str] = []
        for name, value in zip(IDENTITY_HEADERS, identity_values):
            if value:
                to_set.append((name, value))
            else:
                to_remove.append(name)  # an empty value could be dropped by Envoy, leaving the client's
        set_names = {name for name, _ in to_set}
        if self._key_header not in set_names:
            to_remove.append(self._key_header)
        if strip_authorization and "authorization" not in set_names:
            to_remove.append("authorization")
        return Grant(
            headers=tuple(to_set),
            remove=tuple(to_remove),
            metadata={
                "principal": principal.name,
                "principal_id": principal.id,
                "key_id": identity.key_id,
                "server": server.name,
                "credential": credentials.source,
                "decision": "allow",
            },
            identity_values=identity_values,
            signing_secret=server.signing_secret,
            principal_id=principal.id,
            key_id=identity.key_id,
            server=server.name,
            version=version,
            expires_at=credentials.expires_at,
        )

    def allow(self, grant: Grant, inp: CheckInput, identity: Identity, now: float) -> Decision:
        """This request's part: the path without a key, the request id, the timestamp and the signature."""
        path = inp.path
        headers: list[tuple[str, str]] = []
        stripped = identity.key_source.path_without_key
        if stripped is not None:
            path = stripped
            headers.append((":path", path))
        if inp.request_id:
            headers.append((REQUEST_ID_HEADER, inp.request_id))
        timestamp = str(int(now))
        headers.append((self._timestamp_header, timestamp))
        headers.append(
            (self._signature_header, sign(grant.signing_secret, timestamp, inp.method, path, grant.identity_values, inp.request_id))
        )
        metadata = {}
        if inp.tool:
            metadata["tool"] = inp.tool
        if inp.mcp_method:
            metadata["mcp_method"] = inp.mcp_method
        return Decision(grant, tuple(headers), metadata)


def strips_authorization(inp: CheckInput, identity: Identity) -> bool:
    """Whether the request's Authorization header held a gateway key."""
    return identity.key_source.source == "bearer" or keys.PREFIX in inp.headers.get("authorization", "")
