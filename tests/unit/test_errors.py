"""errors.py: the one reason table that Check's response and the admin API read, and the error
tree, whose messages never carry a key."""

from __future__ import annotations

import pytest

from authz_server.admin.api import error_message, grpc_status
from authz_server.errors import (
    AuthzError,
    Conflict,
    Denied,
    InvalidInput,
    NotFound,
    PermissionDenied,
    REASONS,
    Reason,
    RemoteError,
)

from .fakes import assert_no_key, real_key, redacted


@pytest.mark.parametrize("reason", list(Reason))
def test_every_denial_reason_has_one_row_that_both_apis_read(reason: Reason) -> None:
    """errors.REASONS is the one table: Check's response and the admin API derive their codes from it."""
    from google.rpc import code_pb2

    from authz_server.envoy import response

    info = REASONS[reason]
    assert (info.reason, info.label) == (reason, reason.value)
    assert info.grpc_code.value == code_pb2.Code.Value(info.grpc_code.name)
    assert grpc_status(Denied(reason)).value[0] == info.grpc_code == response._RPC_CODE[info.status]  # noqa: SLF001
    assert response.RPC_ERROR_CODE[info.status] == info.rpc_error_code
    assert info.audit_action == ("authn.failure" if info.status == 401 or reason is Reason.KEY_IN_URL else "")


# --- no key in an error -------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda k: AuthzError(f"about {k}"),
        lambda k: InvalidInput(f"That is not a key id: {k}"),
        lambda k: NotFound(f"No key with id {k}."),
        lambda k: Conflict(f"{k} exists"),
        lambda k: PermissionDenied(f"not yours: {k}"),
        lambda k: RemoteError(f"odd_{k}", f"the sidecar said {k}"),
        lambda k: Denied(Reason.SCOPE_TOOL, f"This gateway key may not call the tool '{k}'."),
        lambda k: Denied(Reason.KEY_MISSING, hint=f"Send it as 'Bearer {k}'"),
    ],
    ids=["base", "invalid-input", "not-found", "conflict", "permission", "remote", "denied-message", "denied-hint"],
)
def test_an_error_never_carries_a_key(build) -> None:  # type: ignore[no-untyped-def]
    key_id, key = real_key()
    exc = build(key)
    shown = " ".join([exc.message, str(exc), repr(exc), exc.reason, getattr(exc, "hint", ""), error_message(exc)])
    assert_no_key(shown, key)
    assert redacted(key_id) in shown


@pytest.mark.parametrize("reason", list(Reason))
def test_denial_defaults_are_kept(reason: Reason) -> None:
    # Some defaults mention 'mgw_…' to show what a key looks like: that is no key, and stays.
    denied = Denied(reason)
    assert (denied.message, denied.hint) == (REASONS[reason].message, REASONS[reason].hint)
