"""No key-shaped string in an audit event, a log line or an error, whatever a caller sends.

Redaction happens at four chokepoints, each tested here: `AuditEvent` itself (models.py),
the JSON log formatter, `AuthzError` (every error's message, and a denial's hint), and the
CLI's error printer (argparse quotes bad values). `crypto.keys.redact` is the one definition.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckResponse

from authz_server.admin.api import error_message
from authz_server.admin.service import Actor, AdminService
from authz_server.cli import main
from authz_server.crypto import keys as gateway_keys
from authz_server.crypto.keys import REDACTED, Argon2Params, KeyHasher, redact
from authz_server.crypto.cipher import Keyring
from authz_server.envoy import response as resp
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
from authz_server.models import AuditEvent, AuthMode, Role
from authz_server.observability.logs import JsonFormatter
from authz_server.store.memory import MemoryStore

from .world import World, request

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
FAST = Argon2Params(time_cost=1, memory_cost_kib=8, parallelism=1)


def _key() -> tuple[str, str]:
    """(key id, whole key), a real one."""
    key_id, key = gateway_keys.generate()
    return key_id, key.reveal()


def _shown(key_id: str) -> str:
    return f"mgw_{key_id}{REDACTED}"


def _assert_clean(text: str, *whole_keys: str) -> None:
    assert not gateway_keys.contains_key(text), text
    for key in whole_keys:
        # Not even the secret part of a key (a caller may have dropped the prefix elsewhere).
        assert key[4 + gateway_keys.KEY_ID_LEN :] not in text, text


# --- redact itself ----------------------------------------------------------------------------

K1_ID, K1 = _key()
K2_ID, K2 = _key()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (K1, _shown(K1_ID)),
        (f"key:{K1}", f"key:{_shown(K1_ID)}"),
        (f"Bearer {K1} and more", f"Bearer {_shown(K1_ID)} and more"),
        (f"/mcp/github/{K1}/tools?x=1", f"/mcp/github/{_shown(K1_ID)}/tools?x=1"),
        (f"'{K1}'", f"'{_shown(K1_ID)}'"),
        (K1[:24], _shown(K1_ID)),  # truncated copy: 20 characters after the prefix
        (K1[:20], _shown(K1_ID)),  # 16 characters after the prefix: still a secret's worth
        (K1[:19], K1[:19]),  # 15: below the threshold
        (f"{K1}, {K2}", f"{_shown(K1_ID)}, {_shown(K2_ID)}"),
        (f"{K1}{K2}", f"{_shown(K1_ID)}{_shown(K2_ID)}"),  # back to back: a run stops where a key begins
        (f"mgw_{K1}", f"mgw_{_shown(K1_ID)}"),
        ("/files/mgw_notes.txt", "/files/mgw_notes.txt"),
        ("mgw_…", "mgw_…"),
        ("100% of mgw_ prefixes", "100% of mgw_ prefixes"),
        (f"%2F{K1}%2F", f"%2F{_shown(K1_ID)}%2F"),  # percent escapes around a key are kept
        ("", ""),
        ("no prefix at all", "no prefix at all"),
    ],
    ids=[
        "whole", "in-target", "in-text", "in-path", "quoted", "truncated-20", "truncated-16", "short-15",
        "two", "glued", "double-prefix", "notes-file", "ellipsis", "percent", "percent-escaped", "empty", "plain",
    ],
)
def test_redact(text: str, expected: str) -> None:
    got = redact(text)
    assert got == expected
    assert not gateway_keys.contains_key(got)
    assert redact(got) == got  # idempotent


def test_redact_returns_the_same_string_when_there_is_no_prefix() -> None:
    text = "nothing to see " * 10
    assert redact(text) is text


# --- audit events -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["actor", "action", "target", "outcome", "request_id", "details-key", "details-value"]
)
def test_an_audit_event_is_redacted_in_every_field(field: str) -> None:
    key_id, key = _key()
    base = {"actor": "p_alice", "action": "keys.revoke", "target": "key:abcdefg", "outcome": "ok", "request_id": "r1"}
    details = {"source": "127.0.0.1"}
    if field == "details-key":
        details[f"x{key}"] = "v"
    elif field == "details-value":
        details["message"] = f"got {key}"
    else:
        base[field] = f"key:{key}"
    event = AuditEvent(at=T0, details=details, **base)
    _assert_clean(repr(event), key)
    assert _shown(key_id) in repr(event)
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


# --- log lines --------------------------------------------------------------------------------


def _format(record: logging.LogRecord) -> str:
    line = JsonFormatter().format(record)
    json.loads(line)  # still one JSON object
    return line


def test_a_log_line_is_redacted_in_message_args_extras_and_exception() -> None:
    key_id, key = _key()
    try:
        raise ValueError(f"bad value {key}")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "presented %s", (key,), exc_info)
    record.key_id = key  # an extra field: the wrong thing passed as a key id
    record.path = f"/mcp/github/{key}"
    record.nested = {"values": [key]}
    line = _format(record)
    _assert_clean(line, key)
    doc = json.loads(line)
    assert doc["msg"] == f"presented {_shown(key_id)}"
    assert doc["key_id"] == _shown(key_id)
    assert doc["path"] == f"/mcp/github/{_shown(key_id)}"
    assert doc["nested"] == {"values": [_shown(key_id)]}
    assert f"ValueError: bad value {_shown(key_id)}" in doc["exc"]


def test_a_log_line_with_an_escaped_character_next_to_a_key_is_redacted() -> None:
    key_id, key = _key()
    record = logging.LogRecord("t", logging.INFO, __file__, 1, f'"quoted"\n{key}\té', None, None)
    doc = json.loads(_format(record))
    assert doc["msg"] == f'"quoted"\n{_shown(key_id)}\té'


# --- errors -----------------------------------------------------------------------------------


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
    key_id, key = _key()
    exc = build(key)
    shown = " ".join([exc.message, str(exc), repr(exc), exc.reason, getattr(exc, "hint", ""), error_message(exc)])
    _assert_clean(shown, key)
    assert _shown(key_id) in shown


@pytest.mark.parametrize("reason", list(Reason))
def test_denial_defaults_are_kept(reason: Reason) -> None:
    # Some defaults mention 'mgw_…' to show what a key looks like: that is no key, and stays.
    denied = Denied(reason)
    assert (denied.message, denied.hint) == (REASONS[reason].message, REASONS[reason].hint)


# --- the admin service: a whole key where a key id belongs ----------------------------------


@pytest.mark.parametrize("operation", ["revoke", "regenerate"])
async def test_revoking_a_whole_key_is_refused_and_the_audit_shows_only_its_key_id(operation: str) -> None:
    store = MemoryStore()
    await store.migrate()
    svc = AdminService(store, Keyring.from_spec(Keyring.generate_spec()), KeyHasher(FAST), lambda: T0)
    _, _, admin_key = await svc.initialize(Actor.operator())
    key_id, key = gateway_keys.parse(admin_key.reveal()).key_id, admin_key.reveal()
    call = svc.revoke_key if operation == "revoke" else svc.regenerate_key
    with pytest.raises(InvalidInput) as refused:
        await call(Actor.operator(), key)
    _assert_clean(refused.value.message, key)
    events = await store.query_audit(limit=1000)
    (event,) = [e for e in events if e.action == f"keys.{operation}"]
    assert event.outcome == "error"
    assert event.target == f"key:{_shown(key_id)}"
    for e in events:
        _assert_clean(repr(e), key)


# --- Check: a key-shaped tool name in a denial --------------------------------------------------


def test_a_key_shaped_tool_name_is_redacted_in_the_denial_body() -> None:
    w = World()
    w.server("github", AuthMode.INDIVIDUAL)
    caller = w.key(w.principal("alice", roles=(Role.USER,)), scope=("github:search",))
    tool_id, tool = _key()  # someone else's key, sent as the tool name
    inp = request(bearer=caller, mcp_method="tools/call", tool=tool)
    with pytest.raises(Denied) as refused:
        w.pipeline().decide(inp)
    assert refused.value.code is Reason.SCOPE_TOOL
    r = CheckResponse.FromString(resp.deny(refused.value, inp.request_id, "github", inp.tool, inp.mcp_method))
    body = r.denied_response.body
    _assert_clean(body, tool)
    assert f"'{_shown(tool_id)}'" in json.loads(body)["error"]["message"]
    for header in r.denied_response.headers:
        _assert_clean(header.header.value, tool)


# --- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    for var in list(os.environ):
        if var.startswith("MCP_AUTHZ_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    common = ["--store", f"sqlite:///{tmp_path}/authz.db", "--master-key-file", str(tmp_path / "master.key")]

    def run(*argv: str, common_args: bool = True) -> tuple[int, str]:
        monkeypatch.setattr(sys, "stdin", io.StringIO(""))
        capsys.readouterr()
        code = main([*argv, *(common if common_args else [])])
        out = capsys.readouterr()
        return code, out.out + out.err

    code, out = run("--json", "init")
    assert code == 0, out
    return run, json.loads(out)["api_key"]


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (("keys", "revoke", "{key}"), 1, "whole gateway key"),
        (("--json", "keys", "revoke", "{key}"), 1, "whole gateway key"),
        (("keys", "regenerate", "{key}"), 1, "whole gateway key"),
        (("keys", "{key}"), 2, "{shown}"),  # argparse: invalid choice, quoting the value
        (("--json", "keys", "{key}"), 2, "{shown}"),
        (("servers", "add", "x", "--mode", "{key}"), 2, "{shown}"),
        (("keys", "revoke", "{key}", "{key}"), 2, "not shown"),  # unrecognized arguments
        (("audit", "--since", "{key}"), 2, "--since"),
    ],
)
def test_the_cli_never_prints_a_key_it_was_given(cli, argv: tuple[str, ...], code: int, says: str) -> None:  # type: ignore[no-untyped-def]
    run, admin_key = cli
    shown = _shown(gateway_keys.parse(admin_key).key_id)
    got, out = run(*(a.format(key=admin_key) for a in argv))
    assert got == code, out
    assert "Traceback" not in out
    _assert_clean(out, admin_key)
    assert says.format(shown=shown) in (json.loads(out)["error"]["message"] if argv[0] == "--json" else out)
    # The audit trail the CLI wrote keeps no key either.
    code, audit = run("--json", "audit")
    assert code == 0, audit
    _assert_clean(audit, admin_key)


def test_a_usage_record_keeps_no_key_from_the_request() -> None:
    """The tool name, MCP method and request id of a usage record come from the request."""
    from authz_server.models import UsageRecord

    key = gateway_keys.generate()[1].reveal()
    record = UsageRecord(datetime.now(timezone.utc), f"req-{key}", "p_1", "abcdefg", "github", key, f"tools/{key}", "deny",
                         "scope_tool", 403, 10, 20, 1.5)  # fmt: skip
    assert key not in repr(record)
    assert record.tool == f"{key[:11]}{REDACTED}" and record.server == "github"
