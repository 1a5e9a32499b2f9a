"""admin/api.py, the admin gRPC API's edges without a sidecar: the one table from error to gRPC
status, and the messages it answers with."""

from __future__ import annotations

import grpc
import pytest

from authz_server.admin.api import DENIED_STATUS, ERROR_STATUS, Unreadable, error_message, grpc_status, reader
from authz_server.admin.rpcs import RPCS, Rpc
from authz_server.errors import (
    AuthzError,
    ConfigError,
    Conflict,
    CorruptRow,
    Denied,
    InvalidInput,
    MasterKeyError,
    NotFound,
    PermissionDenied,
    Reason,
    StoreError,
)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (Denied(Reason.KEY_REVOKED), grpc.StatusCode.UNAUTHENTICATED),
        (Denied(Reason.KEY_MISSING), grpc.StatusCode.UNAUTHENTICATED),
        (Denied(Reason.OVERLOADED), grpc.StatusCode.UNAVAILABLE),
        (Denied(Reason.NOT_READY), grpc.StatusCode.UNAVAILABLE),
        (PermissionDenied("no"), grpc.StatusCode.PERMISSION_DENIED),
        (NotFound("no"), grpc.StatusCode.NOT_FOUND),
        (Conflict("no"), grpc.StatusCode.ALREADY_EXISTS),
        (InvalidInput("no"), grpc.StatusCode.INVALID_ARGUMENT),
        (StoreError("no"), grpc.StatusCode.UNAVAILABLE),
        (CorruptRow("no"), grpc.StatusCode.UNAVAILABLE),
        (ConfigError("no"), grpc.StatusCode.FAILED_PRECONDITION),
        (MasterKeyError("no"), grpc.StatusCode.FAILED_PRECONDITION),
        (AuthzError("no"), grpc.StatusCode.INTERNAL),
    ],
)
def test_one_table_maps_every_error_to_a_grpc_status(error: AuthzError, code: grpc.StatusCode) -> None:
    assert grpc_status(error) is code


def test_the_table_lists_subclasses_before_their_bases() -> None:
    kinds = [kind for kind, _ in ERROR_STATUS]
    for i, kind in enumerate(kinds):
        assert not any(issubclass(kind, earlier) for earlier in kinds[:i]), kind
    assert DENIED_STATUS[401] is grpc.StatusCode.UNAUTHENTICATED


def test_messages_are_the_errors_own_with_a_denials_hint() -> None:
    assert error_message(Denied(Reason.KEY_EXPIRED)) == "The gateway key has expired. Ask for a new key."
    assert error_message(NotFound("No server named x.")) == "No server named x."


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.name)
def test_every_request_reader_never_raises(rpc: Rpc) -> None:
    """Bytes that are not the request (a truncated field, a string that is not UTF-8) reach the
    method as Unreadable, answered INVALID_ARGUMENT, instead of failing inside gRPC as INTERNAL."""
    read = reader(rpc.request)
    assert isinstance(read(b""), rpc.request)
    for junk in (b"\x0a\x05ab", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0a"):
        assert isinstance(read(junk), Unreadable)
    if rpc.request.DESCRIPTOR.fields and rpc.request.DESCRIPTOR.fields[0].type == 9:  # a string
        assert isinstance(read(b"\x0a\x02\xff\xfe"), Unreadable)
