"""Stage 6: turn an allowed request into header mutations.

- credential headers from the server's templates, overwriting;
- the gateway key removed from wherever it came (a path key rewrites `:path`);
- client-sent identity headers replaced by the verified ones, always;
- an HMAC-SHA256 signature an upstream can check (examples/verify_signature.py):
      v1 \\n timestamp \\n METHOD \\n path \\n x-user-id \\n x-user-type \\n x-user-team \\n x-user-roles \\n x-request-id
  keyed with the server's signing secret, sent as `v1=<hex>` with the timestamp.
"""

from __future__ import annotations

import hashlib
import hmac

from authz_server.pipeline.resolve import Credentials
from authz_server.pipeline.types import CheckInput, Decision, Identity
from authz_server.state import ServerEntry

IDENTITY_HEADERS = ("x-user-id", "x-user-type", "x-user-team", "x-user-roles")
REQUEST_ID_HEADER = "x-request-id"


def sign(secret: bytes, timestamp: str, method: str, path: str, identity: tuple[str, ...], request_id: str) -> str:
    message = "\n".join(("v1", timestamp, method.upper(), path, *identity, request_id))
    return "v1=" + hmac.new(secret, message.encode(), hashlib.sha256).hexdigest()


class Mutator:
    def __init__(self, key_header: str, signature_header: str, timestamp_header: str) -> None:
        self._key_header = key_header
        self._signature_header = signature_header
        self._timestamp_header = timestamp_header

    def allow(
        self,
        inp: CheckInput,
        identity: Identity,
        server: ServerEntry,
        credentials: Credentials,
        now: float,
    ) -> Decision:
        principal = identity.principal
        identity_values = (
            principal.name,
            principal.kind.value,
            principal.team,
            ",".join(r.value for r in principal.roles),
        )
        path = inp.path
        to_set: list[tuple[str, str]] = list(credentials.headers)
        presented = identity.key_source
        if presented.path_without_key is not None:
            path = presented.path_without_key
            to_set.append((":path", path))
        to_remove: list[str] = []
        for name, value in zip(IDENTITY_HEADERS, identity_values):
            if value:
                to_set.append((name, value))
            else:
                to_remove.append(name)  # an empty value could be dropped by Envoy, leaving the client's
        if inp.request_id:
            to_set.append((REQUEST_ID_HEADER, inp.request_id))
        timestamp = str(int(now))
        to_set.append((self._timestamp_header, timestamp))
        to_set.append(
            (self._signature_header, sign(server.signing_secret, timestamp, inp.method, path, identity_values, inp.request_id))
        )
        set_names = {name for name, _ in to_set}
        if self._key_header not in set_names:
            to_remove.append(self._key_header)
        auth = inp.headers.get("authorization", "")
        if "authorization" not in set_names and (presented.source == "bearer" or "mgw_" in auth):
            to_remove.append("authorization")
        return Decision(
            headers_to_set=tuple(to_set),
            headers_to_remove=tuple(to_remove),
            metadata={
                "principal": principal.name,
                "principal_id": principal.id,
                "key_id": identity.key_id,
                "server": server.name,
                "tool": inp.tool,
                "mcp_method": inp.mcp_method,
                "credential": credentials.source,
                "decision": "allow",
            },
            principal_id=principal.id,
            key_id=identity.key_id,
            server=server.name,
        )
