"""The one error tree of mcp-authz.

    AuthzError                      base: every error has a `reason` and a safe `message`
    ├── Denied                      a request refused by Check or the admin API's authentication;
    │                               `reason` is a `Reason`, whose REASONS row gives its HTTP and
    │                               gRPC status, JSON-RPC code, metric label and audit action
    ├── ConfigError                 unsafe or invalid settings: the sidecar refuses to start
    │   └── MasterKeyError          master key missing, malformed, unreadable or wrong for the store
    ├── InvalidInput                bad arguments to a management operation (CLI or admin API)
    ├── NotFound                    a management operation named something that does not exist
    ├── Conflict                    it would create something that exists already
    ├── PermissionDenied            the caller's role does not allow the operation
    ├── StoreError                  the store is unreachable, or a row cannot be read
    │   └── CorruptRow              a row exists but does not decode (bad JSON, bad ciphertext)
    └── RemoteError                 the remote CLI's admin API call was refused or failed; its
                                    `reason` is the sidecar's (permission_denied, key_revoked...)

`Check` never raises: the servicer turns every `Denied` into a denial response
through `REASONS`, and anything unexpected into `Reason.INTERNAL` (503).
No message in this module, or built by its callers, may contain a secret.
The admin gRPC API maps this tree to gRPC status codes in one table
(`authz_server.admin.api.ERROR_STATUS`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Reason(str, enum.Enum):
    """Why a request was refused. The value is the metric label and the audit outcome."""

    REQUEST_UNREADABLE = "request_unreadable"
    KEY_IN_URL = "key_in_url"
    KEY_MISSING = "key_missing"
    KEY_MALFORMED = "key_malformed"
    KEY_CHECKSUM = "key_checksum"
    KEY_UNKNOWN = "key_unknown"
    KEY_INVALID = "key_invalid"
    KEY_REVOKED = "key_revoked"
    KEY_EXPIRED = "key_expired"
    PRINCIPAL_DISABLED = "principal_disabled"
    TEAM_DISABLED = "team_disabled"
    SERVER_UNMAPPED = "server_unmapped"
    SERVER_UNKNOWN = "server_unknown"
    SCOPE_SERVER = "scope_server"
    SCOPE_TOOL = "scope_tool"
    CREDENTIAL_MISSING = "credential_missing"
    CREDENTIAL_UNREADABLE = "credential_unreadable"
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    NOT_READY = "not_ready"
    INTERNAL = "internal"


class GrpcCode(enum.IntEnum):
    """The gRPC status codes a denial maps to (numbered as google.rpc.Code and grpc.StatusCode)."""

    INVALID_ARGUMENT = 3
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    UNAVAILABLE = 14
    UNAUTHENTICATED = 16


# A denial's HTTP status decides its gRPC status (Check's own, and the admin API's) and the
# JSON-RPC error code of the body MCP clients show (server-error codes, -32000 to -32099).
_BY_STATUS: dict[int, tuple[GrpcCode, int]] = {
    400: (GrpcCode.INVALID_ARGUMENT, -32600),
    401: (GrpcCode.UNAUTHENTICATED, -32001),
    403: (GrpcCode.PERMISSION_DENIED, -32003),
    429: (GrpcCode.RESOURCE_EXHAUSTED, -32029),
    503: (GrpcCode.UNAVAILABLE, -32053),
}
AUTHN_FAILURE = "authn.failure"  # the security event of a refused key, whichever API refused it


@dataclass(frozen=True, slots=True)
class ReasonInfo:
    """One row of the denial table: everything that follows from a `Reason`."""

    reason: Reason
    status: int  # HTTP
    audit_action: str  # the security event recorded for it ("": none)
    message: str
    hint: str

    @property
    def label(self) -> str:
        """The metric label, and the audit event's outcome."""
        return self.reason.value

    @property
    def grpc_code(self) -> GrpcCode:
        return _BY_STATUS[self.status][0]

    @property
    def rpc_error_code(self) -> int:
        """The JSON-RPC error code of the denial's body."""
        return _BY_STATUS[self.status][1]

    @property
    def bearer_error(self) -> str:
        """The RFC 6750 error code of its WWW-Authenticate challenge: `invalid_token` for a refused
        key, `insufficient_scope` for a key scoped elsewhere, "" for none (every 401 is challenged,
        envoy/resource_metadata.py)."""
        if self.status == 401:
            return "" if self.reason is Reason.KEY_MISSING else "invalid_token"
        return "insufficient_scope" if self.reason in (Reason.SCOPE_SERVER, Reason.SCOPE_TOOL) else ""


_KEY_HINT = "Send a gateway key as 'Authorization: Bearer mgw_…', in the x-api-key header, or as a path segment."
_ASK_FOR_KEY = "Ask an administrator for a key."
_RETRY = "Retry shortly."

# A key exposed in a URL is a security event like a refused key, though its answer is a 400.
# A CheckRequest the sidecar cannot read (envoy/request.py: malformed, or too large even without
# its metadata) is refused before anything is known of it: a 400, as its cause is the request
# (no other request is refused with it), never Check's gRPC error, which Envoy answers with a 503.
REASONS: dict[Reason, ReasonInfo] = {
    row.reason: row
    for row in (
        ReasonInfo(Reason.REQUEST_UNREADABLE, 400, "", "The gateway could not read this request.",
                   "Send a well-formed request of ordinary size; operators find the cause in the sidecar's log."),
        ReasonInfo(
            Reason.KEY_IN_URL, 400, AUTHN_FAILURE,
            "A gateway key was found in the URL's query string or inside a path segment; the request was not "
            "forwarded.",
            "Send the key as 'Authorization: Bearer mgw_…' or in the x-api-key header (or as a whole path segment). "
            "A key that travelled in a URL may sit in logs and browser history: regenerate it.",
        ),
        ReasonInfo(Reason.KEY_MISSING, 401, AUTHN_FAILURE, "No gateway key was presented.", _KEY_HINT),
        ReasonInfo(Reason.KEY_MALFORMED, 401, AUTHN_FAILURE, "The gateway key is malformed.",
                   "A gateway key is 'mgw_' followed by 32 letters and digits."),
        ReasonInfo(Reason.KEY_CHECKSUM, 401, AUTHN_FAILURE, "The gateway key's checksum does not match.",
                   "Check the key for a typo or a truncated copy."),
        ReasonInfo(Reason.KEY_UNKNOWN, 401, AUTHN_FAILURE, "The gateway key is not recognised.", _ASK_FOR_KEY),
        ReasonInfo(Reason.KEY_INVALID, 401, AUTHN_FAILURE, "The gateway key is not recognised.", _ASK_FOR_KEY),
        ReasonInfo(Reason.KEY_REVOKED, 401, AUTHN_FAILURE, "The gateway key has been revoked.",
                   "Use the key that replaced it, or ask for a new one."),
        ReasonInfo(Reason.KEY_EXPIRED, 401, AUTHN_FAILURE, "The gateway key has expired.", "Ask for a new key."),
        ReasonInfo(Reason.PRINCIPAL_DISABLED, 401, AUTHN_FAILURE, "The account that owns this key is disabled.",
                   "Ask an administrator to enable it."),
        ReasonInfo(Reason.TEAM_DISABLED, 401, AUTHN_FAILURE, "The team that owns this key is disabled.",
                   "Ask an administrator to enable the team."),
        ReasonInfo(Reason.SERVER_UNMAPPED, 403, "", "This route is not mapped to an MCP server.",
                   "The Envoy route needs check_settings.context_extensions.mcp_server."),
        ReasonInfo(Reason.SERVER_UNKNOWN, 403, "", "The MCP server for this route is not registered.",
                   "An administrator adds it with 'mcp-authz servers add'."),
        ReasonInfo(Reason.SCOPE_SERVER, 403, "", "This gateway key is not allowed to use this MCP server.",
                   "Use a key scoped to this server."),
        ReasonInfo(Reason.SCOPE_TOOL, 403, "", "This gateway key is not allowed to call this tool.",
                   "Use a key scoped to this tool."),
        ReasonInfo(Reason.CREDENTIAL_MISSING, 403, "",
                   "This MCP server needs your own credential, and none is configured.",
                   "Add it with 'mcp-authz overrides set'."),
        ReasonInfo(Reason.CREDENTIAL_UNREADABLE, 503, "",
                   "A stored credential for this MCP server could not be decrypted.",
                   "An operator must check the master key or set the credential again."),
        ReasonInfo(Reason.RATE_LIMITED, 429, "", "Too many requests for this account.",
                   "Retry after the indicated delay."),
        ReasonInfo(Reason.OVERLOADED, 503, "", "The authorization service is busy.", _RETRY),
        ReasonInfo(Reason.NOT_READY, 503, "", "The authorization service is starting or has lost its store.", _RETRY),
        ReasonInfo(Reason.INTERNAL, 503, "", "The authorization service failed.",
                   "Retry shortly; operators see the log."),
    )
}  # fmt: skip


def redact(text: str) -> str:
    """`text` with any key-like run cut to its key id (crypto.keys.redact, the one key shape)."""
    # Imported here: crypto.keys imports this module (Denied, Reason). After the first call
    # this is a dictionary lookup, and redact itself returns at once when no "mgw_" is present.
    from authz_server.crypto.keys import redact as _redact

    return _redact(text)


class AuthzError(Exception):
    """Base of every mcp-authz error. `message` is safe to show to any caller.

    Whatever a caller sent and a message quotes, a key-shaped string in it is redacted
    here, so no error can carry a gateway key to a caller, a log line or the audit trail.
    """

    reason: str = "error"

    def __init__(self, message: str) -> None:
        message = redact(message)
        super().__init__(message)
        self.message = message


class Denied(AuthzError):
    """A request refused by the decision pipeline.

    `message` and `hint` default to the REASONS entry; a stage may give more
    specific ones (naming the server, say), never containing a secret.
    `key_id` is set once a key id could be parsed, for the audit trail.
    """

    def __init__(
        self,
        reason: Reason,
        message: str | None = None,
        *,
        hint: str | None = None,
        key_id: str = "",
        retry_after: int | None = None,
    ) -> None:
        info = REASONS[reason]
        super().__init__(message or info.message)
        self.info = info
        self.reason = reason.value
        self.code = reason
        self.status = info.status
        self.hint = redact(hint) if hint else info.hint
        self.key_id = key_id
        self.retry_after = retry_after
        # Filled in by the pipeline once known, for metrics and the audit trail.
        self.principal_id = ""
        self.server = ""


class ConfigError(AuthzError):
    reason = "config"


class MasterKeyError(ConfigError):
    reason = "master_key"


class InvalidInput(AuthzError):
    reason = "invalid_input"


class NotFound(AuthzError):
    reason = "not_found"


class Conflict(AuthzError):
    reason = "conflict"


class PermissionDenied(AuthzError):
    reason = "permission_denied"


class StoreError(AuthzError):
    reason = "store"


class CorruptRow(StoreError):
    reason = "corrupt_row"


class StoreRefused(StoreError):
    """The store is up but refused what was written (a constraint, a bad value): writing the same
    again fails the same way, so a write-behind queue does not retry it (observability/batch.py)."""

    reason = "store"


class RemoteError(AuthzError):
    """A call to a remote sidecar's admin API failed. `reason` is the one the sidecar sent
    (its `mcp-authz-reason` trailer), or the transport's when no sidecar answered."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = redact(reason)
