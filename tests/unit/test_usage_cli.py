"""`mcp-authz usage`: the table, --json, the JSON-lines export, time arguments and pruning, against SQLite."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
from datetime import datetime, timedelta, timezone

import pytest

from authz_server.cli import main, parse_when
from authz_server.models import UsageRecord
from authz_server.store import open_store
from tests.unit.test_cli import Cli, ready, run, transcript  # noqa: F401 - fixtures

T0 = datetime(2026, 1, 5, 10, 0, 0, 250000, tzinfo=timezone.utc)


def _rec(at: datetime, principal_id: str, server: str = "github", tool: str = "search", **kw: object) -> UsageRecord:
    fields: dict[str, object] = {
        "request_id": f"req-{at:%H%M%S}-{principal_id or 'anon'}",
        "key_id": "KeyId01" if principal_id else "",
        "mcp_method": "tools/call",
        "decision": "allow",
        "reason": "",
        "upstream_status": 200,
        "request_bytes": 321,
        "response_bytes": 4096,
        "duration_ms": 7.75,
    }
    fields.update(kw)
    return UsageRecord(at=at, principal_id=principal_id, server=server, tool=tool, **fields)  # type: ignore[arg-type]


def _append(run: Cli, records: list[UsageRecord]) -> None:
    """Write records as the sidecar's usage writer would, straight into the CLI's store."""

    async def go() -> None:
        store = await open_store(run.store)
        try:
            await store.append_usage(records)
        finally:
            await store.close()

    asyncio.run(go())


@pytest.fixture
def people(ready: Cli) -> dict[str, str]:
    """alice and bob, and four records: alice, bob, an unauthenticated denial, alice on slack."""
    ids = {name: ready.json("principals", "add", name)["principal"]["id"] for name in ("alice", "bob")}
    _append(
        ready,
        [
            _rec(T0, ids["alice"]),
            _rec(T0 + timedelta(minutes=1), ids["bob"], duration_ms=12.125),
            _rec(T0 + timedelta(minutes=2), "", tool="", mcp_method="", decision="deny", reason="key_missing",
                 upstream_status=401, response_bytes=180),
            _rec(T0 + timedelta(minutes=3), ids["alice"], server="slack", tool="post"),
        ],
    )
    return ids


def _lines(out: str) -> list[dict]:
    assert out.endswith("\n") or out == ""
    return [json.loads(line) for line in out.splitlines()]


# --- query -------------------------------------------------------------------------------------------


def test_usage_prints_a_table_oldest_first(ready: Cli, people: dict[str, str]) -> None:
    rec = ready("usage")
    assert rec.code == 0, rec.err
    header, *rows = rec.out.splitlines()
    assert header.split() == ["TIME", "PRINCIPAL", "KEY", "ID", "SERVER", "METHOD", "TOOL", "DECISION", "STATUS",
                              "BYTES", "IN", "BYTES", "OUT", "MS", "REQUEST", "ID"]
    assert [r.split()[:4] for r in rows] == [
        ["2026-01-05", "10:00:00Z", "alice", "KeyId01"],
        ["2026-01-05", "10:01:00Z", "bob", "KeyId01"],
        ["2026-01-05", "10:02:00Z", "-", "-"],
        ["2026-01-05", "10:03:00Z", "alice", "KeyId01"],
    ]
    assert rows[2].split()[4:11] == ["github", "-", "-", "deny", "(key_missing)", "401", "321"]
    assert rows[1].split()[-2:] == ["12.1", "req-100100-" + people["bob"]]
    assert "there may be more" not in rec.out


def test_usage_json_is_one_document_with_every_field(ready: Cli, people: dict[str, str]) -> None:
    doc = ready.json("usage")
    assert doc["limit"] == 1000
    assert [(u["principal"], u["server"], u["tool"], u["decision"]) for u in doc["usage"]] == [
        ("alice", "github", "search", "allow"),
        ("bob", "github", "search", "allow"),
        ("-", "github", "", "deny"),
        ("alice", "slack", "post", "allow"),
    ]
    bob = doc["usage"][1]
    assert {k: v for k, v in bob.items() if k != "id"} == {
        "at": "2026-01-05T10:01:00.250000Z",
        "request_id": "req-100100-" + people["bob"],
        "principal": "bob",
        "principal_id": people["bob"],
        "key_id": "KeyId01",
        "server": "github",
        "tool": "search",
        "mcp_method": "tools/call",
        "decision": "allow",
        "reason": "",
        "upstream_status": 200,
        "request_bytes": 321,
        "response_bytes": 4096,
        "duration_ms": 12.125,
    }
    assert isinstance(bob["id"], int)


# One store for the whole table: setting one up costs more than every query in it.
FILTERS = [
    (["--principal", "alice"], [0, 3]),
    (["--server", "slack"], [3]),
    (["--tool", "search"], [0, 1]),
    (["--principal", "alice", "--server", "github", "--tool", "search"], [0]),
    (["--since", "2026-01-05T10:01:00.250Z"], [1, 2, 3]),  # inclusive
    (["--until", "2026-01-05T10:01:00.250Z"], [0]),  # exclusive
    (["--since", "2026-01-05T11:00:30+01:00", "--until", "2026-01-05T10:02:30"], [1, 2]),  # offsets; naive is UTC
    (["--since", "2026-01-05"], [0, 1, 2, 3]),
    (["--since", "2026-01-06"], []),
    (["--until", "1d"], [0, 1, 2, 3]),  # the records are long past
    (["--since", "1h"], []),
    (["--limit", "2"], [0, 1]),
]


def test_usage_filters(ready: Cli, people: dict[str, str]) -> None:
    everything = [u["request_id"] for u in ready.json("usage")["usage"]]
    for argv, expected in FILTERS:
        found = [u["request_id"] for u in ready.json("usage", *argv)["usage"]]
        assert found == [everything[i] for i in expected], argv


def test_durations_count_back_from_now(ready: Cli, people: dict[str, str]) -> None:
    now = datetime.now(timezone.utc)
    _append(
        ready,
        [
            _rec(now - timedelta(hours=3), people["bob"], request_id="three-hours-ago"),
            _rec(now - timedelta(minutes=20), people["bob"], request_id="twenty-minutes-ago"),
        ],
    )
    def ids(*argv: str) -> list[str]:
        return [u["request_id"] for u in ready.json("usage", "--principal", "bob", *argv)["usage"]]

    assert ids("--since", "1h") == ["twenty-minutes-ago"]
    assert ids("--since", "4h", "--until", "1h") == ["three-hours-ago"]
    assert ids("--since", "2d", "--until", "30m") == ["three-hours-ago"]


def test_the_table_says_when_the_limit_cut_it_short(ready: Cli, people: dict[str, str]) -> None:
    rec = ready("usage", "--limit", "3")
    assert rec.code == 0 and len(rec.out.splitlines()) == 1 + 3 + 1
    assert "the oldest 3 matching records; there may be more" in rec.out
    assert ready("usage", "--limit", "4").out.count("there may be more") == 1  # exactly the limit: cannot know
    assert "there may be more" not in ready("usage", "--limit", "5").out


def test_client_supplied_text_cannot_drive_the_terminal(ready: Cli, people: dict[str, str]) -> None:
    _append(ready, [_rec(T0 + timedelta(minutes=9), "", tool="evil\x1b[2J\rtool", request_id="r\nx")])
    rec = ready("usage", "--since", "2026-01-05T10:09Z")
    assert "\x1b" not in rec.out and "\r" not in rec.out
    assert "evil?[2J?tool" in rec.out and "r?x" in rec.out
    assert ready.json("usage", "--since", "2026-01-05T10:09Z")["usage"][0]["tool"] == "evil\x1b[2J\rtool"


def test_no_records_is_not_an_error(ready: Cli) -> None:
    rec = ready("usage")
    assert rec.code == 0 and rec.out.strip() == "(no usage records)"
    assert ready.json("usage") == {"usage": [], "limit": 1000}
    assert ready("usage", "--export").out == ""


# --- export -----------------------------------------------------------------------------------------------


def test_export_writes_one_json_line_per_record(ready: Cli, people: dict[str, str]) -> None:
    rec = ready("usage", "--export")
    assert rec.code == 0 and rec.err == ""
    lines = _lines(rec.out)
    assert lines == ready.json("usage")["usage"]
    assert len(rec.out.splitlines()) == 4 and all(line.startswith("{") for line in rec.out.splitlines())
    assert _lines(ready("usage", "--export", "--principal", "alice", "--server", "slack").out) == [lines[3]]
    assert _lines(ready("usage", "--export", "--limit", "2").out) == lines[:2]
    assert _lines(ready("usage", "--export", "--json").out) == lines  # --export decides the format


def test_a_large_export_streams_page_by_page(
    ready: Cli, people: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    later = T0 + timedelta(hours=1)
    bulk = [_rec(later + timedelta(milliseconds=i), people["alice"], request_id=f"bulk-{i:04}") for i in range(2500)]
    _append(ready, bulk)
    capped = _lines(ready("usage", "--export", "--limit", "1234").out)
    assert len(capped) == 1234 and capped[-1]["request_id"] == "bulk-1229"  # after the 4 earlier records

    class CountingStdout(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    out = CountingStdout()
    monkeypatch.setattr(sys, "stdout", out)
    code = main(["usage", "--export", "--since", "2026-01-05T11:00Z", "--store", ready.store,
                 "--master-key-file", str(ready.key_file)])
    assert code == 0
    lines = _lines(out.getvalue())
    assert len(lines) == 2500
    assert [u["request_id"] for u in lines] == [f"bulk-{i:04}" for i in range(2500)]
    assert len({u["id"] for u in lines}) == 2500
    assert out.writes == 3  # one write per page of 1000: written as it is read, not gathered first


# --- prune ------------------------------------------------------------------------------------------------


def test_prune_deletes_records_older_than_a_duration(ready: Cli, people: dict[str, str]) -> None:
    now = datetime.now(timezone.utc)
    _append(ready, [_rec(now - timedelta(days=2), people["bob"], request_id="recent")])
    rec = ready("usage", "prune", "--older-than", "30d")
    assert rec.code == 0 and rec.out.startswith("Deleted 4 usage records older than ")
    assert [u["request_id"] for u in ready.json("usage")["usage"]] == ["recent"]
    doc = ready.json("usage", "prune", "--older-than", "1d")
    assert doc["pruned"] == 1 and doc["before"].endswith("Z")
    assert ready.json("usage")["usage"] == []
    assert ready("usage", "prune", "--older-than", "1d").out.startswith("Deleted 0 usage records")


USAGE_ERRORS = [
    (["usage", "prune"], "the following arguments are required: --older-than"),
    (["usage", "prune", "--older-than", "forever"], "argument --older-than: expected a duration"),
    (["usage", "--principal", "alice", "prune", "--older-than", "1d"], "remove --principal"),
    (["usage", "--export", "--since", "1d", "prune", "--older-than", "1d"], "remove --since, --export"),
    (["usage", "--since", "soon"], "argument --since: expected an ISO date"),
    (["usage", "--until", "2026-13-01"], "argument --until: expected an ISO date"),
    (["usage", "--limit", "0"], "argument --limit: expected a positive number"),
    (["usage", "--limit", "-3"], "argument --limit"),
    (["usage", "prnue"], "invalid choice"),
]


def test_usage_errors_exit_2(ready: Cli, people: dict[str, str]) -> None:
    for argv, message in USAGE_ERRORS:
        rec = ready(*argv)
        assert rec.code == 2 and message in rec.err and rec.out == "", (argv, rec.err)
        as_json = ready("--json", *argv)
        assert as_json.code == 2 and json.loads(as_json.out)["error"]["reason"] == "usage", argv
    assert len(ready.json("usage")["usage"]) == 4  # the refused prunes deleted nothing


OPERATION_ERRORS = [
    (["--principal", "ghost"], "not_found", "No principal named ghost."),
    (["--principal", "Not A Name"], "invalid_input", "The principal name is invalid"),
    (["--tool", "bad tool"], "invalid_input", "The tool name is invalid"),
    (["--since", "1h", "--until", "2h"], "invalid_input", "must be before its end"),
    (["--limit", "100001"], "invalid_input", "The limit must be between 1 and 100000"),
    (["--export", "--principal", "ghost"], "not_found", "No principal named ghost."),
]


def test_operation_errors_exit_1(ready: Cli, people: dict[str, str]) -> None:
    for argv, reason, message in OPERATION_ERRORS:
        rec = ready("usage", *argv)
        assert rec.code == 1 and rec.out == "" and message in rec.err, (argv, rec.err)
        doc = ready.json("usage", *argv, code=1)
        assert doc["error"]["reason"] == reason and message in doc["error"]["message"], argv


def test_every_usage_command_is_audited(ready: Cli, people: dict[str, str]) -> None:
    ready("usage", "--principal", "alice")
    ready("usage", "--export", "--server", "github")
    ready("usage", "prune", "--older-than", "3650d")

    async def actions() -> list[tuple[str, str, str]]:
        store = await open_store(ready.store)
        try:
            events = await store.query_audit(action="usage.*")
        finally:
            await store.close()
        return [(e.actor, e.action, e.outcome) for e in events]

    assert asyncio.run(actions()) == [
        ("cli", "usage.query", "ok"),
        ("cli", "usage.export", "ok"),
        ("cli", "usage.prune", "ok"),
    ]


# --- time arguments --------------------------------------------------------------------------------------


NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1h", NOW - timedelta(hours=1)),
        ("7d", NOW - timedelta(days=7)),
        ("90m", NOW - timedelta(minutes=90)),
        ("2w", NOW - timedelta(weeks=2)),
        ("0s", NOW),
        ("2026-02-01", datetime(2026, 2, 1, tzinfo=timezone.utc)),
        ("2026-02-01T08:30:15.5Z", datetime(2026, 2, 1, 8, 30, 15, 500000, tzinfo=timezone.utc)),
        ("2026-02-01T08:30+02:00", datetime(2026, 2, 1, 6, 30, tzinfo=timezone.utc)),
        ("2026-02-01T08:30", datetime(2026, 2, 1, 8, 30, tzinfo=timezone.utc)),
    ],
)
def test_parse_when(text: str, expected: datetime) -> None:
    got = parse_when(text, now=NOW)
    assert got == expected and got.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text", ["", "yesterday", "1y", "-1h", "1.5h", "2026-02-30"])
def test_parse_when_refuses_anything_else(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="expected an ISO date") as caught:
        parse_when(text, now=NOW)
    assert text not in str(caught.value) or not text
