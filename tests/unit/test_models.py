"""models.py: the records that are stored and shown redact any key-shaped string they are given
(`AuditEvent` in every field, `UsageRecord` in what came from the request)."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from authz_server.crypto import keys as gateway_keys
from authz_server.crypto.keys import REDACTED
from authz_server.models import FIELD_MAX, TRUNCATED, AuditEvent, Secret, bounded, mask, remask

from .fakes import T0, assert_no_key, real_key, redacted


@pytest.mark.parametrize(
    "field", ["actor", "action", "target", "outcome", "request_id", "details-key", "details-value"]
)
def test_an_audit_event_is_redacted_in_every_field(field: str) -> None:
    key_id, key = real_key()
    base = {"actor": "p_alice", "action": "keys.revoke", "target": "key:abcdefg", "outcome": "ok", "request_id": "r1"}
    details = {"source": "127.0.0.1"}
    if field == "details-key":
        details[f"x{key}"] = "v"
    elif field == "details-value":
        details["message"] = f"got {key}"
    else:
        base[field] = f"key:{key}"
    event = AuditEvent(at=T0, details=details, **base)
    assert_no_key(repr(event), key)
    assert redacted(key_id) in repr(event)
    # The event is still frozen, and untouched fields keep their values.
    with pytest.raises(AttributeError):
        event.target = "x"  # type: ignore[misc]
    assert event.details["source"] == "127.0.0.1"


def test_an_audit_event_without_a_key_is_unchanged() -> None:
    details = {"source": "127.0.0.1", "file": "mgw_notes.txt"}
    event = AuditEvent(T0, "p_alice", "keys.revoke", "key:abcdefg", "ok", "r1", details)
    assert (event.actor, event.action, event.target, event.outcome, event.request_id) == (
        "p_alice", "keys.revoke", "key:abcdefg", "ok", "r1")
    assert event.details is details


def test_a_usage_record_keeps_no_key_from_the_request() -> None:
    """The tool name, MCP method and request id of a usage record come from the request."""
    from authz_server.models import UsageRecord

    key = gateway_keys.generate()[1].reveal()
    record = UsageRecord(datetime.now(timezone.utc), f"req-{key}", "p_1", "abcdefg", "github", key, f"tools/{key}", "deny",
                         "scope_tool", 403, 10, 20, 1.5)  # fmt: skip
    assert key not in repr(record)
    assert record.tool == f"{key[:11]}{REDACTED}" and record.server == "github"


@pytest.mark.parametrize("length", range(41))
def test_a_mask_shows_at_most_a_quarter_of_a_value_and_at_most_4_characters(length: int) -> None:
    value = "".join(chr(ord("a") + i % 26) for i in range(length))
    shown = mask(value).removeprefix("…")
    assert mask(value).startswith("…")
    assert len(shown) == min(4, length // 4)  # the most the rule allows, so a value stays recognisable
    assert value.endswith(shown)
    assert Secret(value).masked() == mask(value)


@pytest.mark.parametrize("field", ["actor", "action", "target", "outcome", "request_id", "details-key", "details-value"])
def test_every_audit_field_is_bounded(field: str) -> None:
    huge = "n" * (1 << 20)  # a refused 1 MiB name
    base = {"actor": "p_alice", "action": "principals.add", "target": "principal:x", "outcome": "error", "request_id": "r1"}
    details = {"source": "127.0.0.1"}
    if field == "details-key":
        details[huge] = "v"
    elif field == "details-value":
        details["name"] = huge
    else:
        base[field] = huge
    event = AuditEvent(at=T0, details=details, **base)
    values = [event.actor, event.action, event.target, event.outcome, event.request_id,
              *event.details, *event.details.values()]  # fmt: skip
    assert max(len(v) for v in values) == FIELD_MAX + len(TRUNCATED)
    assert f"{'n' * FIELD_MAX}{TRUNCATED}" in values
    assert bounded("n" * FIELD_MAX) == "n" * FIELD_MAX  # at the bound: kept whole


def test_a_key_is_redacted_before_the_field_is_cut() -> None:
    key_id, key = real_key()
    event = AuditEvent(T0, "p_alice", "keys.revoke", "x" * (FIELD_MAX - 5) + key, "ok")
    assert_no_key(repr(event), key)
    assert event.target.endswith(TRUNCATED)


@pytest.mark.parametrize(
    ("stored", "shown"),
    [("ghp_…9xQa", "…9xQa"), ("…9xQa", "…9xQa"), ("…xy", "…xy"), ("…", "…"), ("a=b=…=h=i", "…=h=i"),
     ("…abcdefgh", "…efgh"), ("no ellipsis at all", "…"), ("", "…")],
)  # fmt: skip
def test_a_mask_stored_by_an_older_version_is_held_to_the_rule(stored: str, shown: str) -> None:
    assert remask(stored) == shown
    assert remask(mask("a-credential-of-32-characters-xx")) == mask("a-credential-of-32-characters-xx")


def test_a_usage_records_request_text_is_bounded() -> None:
    from authz_server.models import UsageRecord

    huge = "t" * 70_000  # a tool name as long as Envoy's MCP filter reads
    record = UsageRecord(T0, huge, "p_1", "abcdefg", "github", huge, huge, "allow", "", 200, 10, 20, 1.5)
    assert record.tool == record.mcp_method == record.request_id == "t" * FIELD_MAX + TRUNCATED
    short = UsageRecord(T0, "r1", "p_1", "abcdefg", "github", "add", "tools/call", "allow", "", 200, 10, 20, 1.5)
    assert (short.request_id, short.tool, short.mcp_method) == ("r1", "add", "tools/call")
