"""admin/wire.py: each view comes back from its message as it was, and an empty message reads as
nothing given."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from authz_server.admin import views, wire
from authz_server.admin.gen import admin_pb2 as pb
from authz_server.errors import InvalidInput
from authz_server.models import Placeholder

_T = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=timezone.utc)
_VIEWS = [
    (wire.SERVER, views.ServerView("gh", "shared", ("A: {{X}}",), (("X", True), ("Y", False)), (("X", "ab…cd"),),
                                   "configured", True, "d", "http://x", _T, _T)),
    (wire.SERVER, views.ServerView("gh", "none", (), (), (), None, False, "", "", None, None)),
    (wire.FORM, views.ServerFormView("gh", "individual", (Placeholder("X", True), Placeholder("Y", False)))),
    (wire.PRINCIPAL, views.PrincipalView("p_1", "a", "user", "eng", ("admin", "user"), True, 60, _T)),
    (wire.PRINCIPAL, views.PrincipalView("p_1", "a", "user", "eng", ("user",), False, None, None)),
    (wire.TEAM, views.TeamView("eng", True, None)),
    (wire.KEY, views.GatewayKeyView("AbC1234", "a", "l", _T, _T, None, _T, ("gh", "gh:t"), "active")),
    (wire.OVERRIDE, views.OverrideView("a", "user", "gh", (("A", "m"),), "cli", _T, _T, "configured", "r")),
    (wire.OVERRIDE, views.OverrideView("a", "", "gh", (), "cli", _T, None, "invalid", "")),
    (wire.STATUS, views.CredentialStatusView("gh", "shared", "a", "user", "eng", "missing", "", (), "", None, "")),
    (wire.OVERRIDE_TEST, views.OverrideTestView("a", "gh", "ok", 200, "d", "configured")),
    (wire.AUDIT, views.AuditView(5, _T, "a", "p_1", "x.y", "t", "ok", "r", (("k", "v"), ("z", "w")))),
    (wire.AUDIT, views.AuditView(None, _T, "-", "-", "authn.failure", "-", "key_unknown", "", ())),
    (wire.USAGE, views.UsageView(3, _T, "r", "a", "p", "k", "s", "t", "m", "allow", "", 200, 1, 2, 3.5)),
    (wire.WHOAMI, views.WhoAmIView("p", "a", "user", "eng", ("user",))),
]  # fmt: skip


@pytest.mark.parametrize(("codec", "view"), _VIEWS)
def test_a_view_comes_back_from_its_message_as_it_was(codec: wire.ViewCodec[Any, Any], view: Any) -> None:
    assert codec.view(codec.message(view)) == view


def test_an_empty_message_reads_as_nothing_given() -> None:
    audit = wire.AUDIT.view(pb.AuditEvent())
    assert (audit.id, audit.at, audit.details) == (None, datetime.fromtimestamp(0, timezone.utc), ())
    server = wire.SERVER.view(pb.Server())
    assert (server.shared_status, server.created_at, server.placeholders) == (None, None, ())
    assert wire.PRINCIPAL.view(pb.Principal()).rate_limit_per_minute is None


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(-1, 0), (-10**12, 0), (2**62, 0), (253_402_300_800, 0), (0, -1), (0, 10**9), (1_700_000_000, -5)],
)
def test_a_time_out_of_range_is_invalid_input(seconds: int, nanos: int) -> None:
    request = pb.QueryAuditRequest()
    request.since.seconds, request.since.nanos = seconds, nanos
    with pytest.raises(InvalidInput, match=r"The time in since is out of range: give a time from 1970-01-01 to 9999-12-31"):
        wire.when(request, "since")


@pytest.mark.parametrize(
    ("seconds", "nanos", "expected"),
    [(0, 0, datetime(1970, 1, 1, tzinfo=timezone.utc)),
     (253_402_300_799, 999_999_999, datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)),
     (1_767_323_045, 678_000_999, _T)],
)  # fmt: skip
def test_a_time_in_range_is_read_to_the_microsecond(seconds: int, nanos: int, expected: datetime) -> None:
    request = pb.CreateKeyRequest()
    request.expires_at.seconds, request.expires_at.nanos = seconds, nanos
    assert wire.when(request, "expires_at") == expected
    assert wire.when(pb.CreateKeyRequest(), "expires_at") is None
