"""cli.py: the mcp-authz command, in process against a SQLite store in tmp_path, and once as a real subprocess.

Every run's stdout and stderr is kept in a session transcript; the last test
checks that no gateway key or signing secret appears anywhere but in the one
output that issued it, and that no credential value or master key appears at all.

Besides every local command: `usage` (the table, --json, the JSON-lines export, time arguments
and pruning), the remote mode's refusals before it connects, and no key given to the CLI ever
printed back. (`certs create`: crypto/test_certs.py.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import io
import json
import os
import re
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from authz_server.cli import MAX_COLUMN, _clip, main, parse_duration, parse_expiry, parse_grace, parse_when, sqlite_path
from authz_server.crypto import keys as gateway_keys
from authz_server.crypto.cipher import Keyring, read_key_file
from authz_server.models import UsageRecord
from authz_server.store import open_store

from .fakes import assert_no_key, redacted

KEY_RE = re.compile(r"mgw_[0-9A-Za-z]{32}")
GH_TOKEN = "ghp_CLIvalueAAAAbbbbCCCCdddd1234"
CRM_KEY = "crm-key-0123456789abcdefXYZ"
CRM_CLIENT = "crm-client-9876543210zyxw"
ALICE_TOKEN = "ghp_ALICEpersonalTOKEN5566778899"
VENV_BIN = Path(sys.executable).parent


@dataclass
class Record:
    argv: list[str]
    code: int
    out: str
    err: str
    issued: list[str] = field(default_factory=list)  # one-time secrets this output may show


@dataclass
class Transcript:
    records: list[Record] = field(default_factory=list)
    credentials: set[str] = field(default_factory=set)  # fed on stdin: never to be printed
    master_keys: set[str] = field(default_factory=set)


@pytest.fixture(scope="session")
def transcript() -> Transcript:
    return Transcript()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@dataclass
class Cli:
    """Runs `main` in process with a given stdin, capturing and recording output."""

    tmp: Path
    store: str
    key_file: Path
    transcript: Transcript
    capsys: pytest.CaptureFixture[str]
    monkeypatch: pytest.MonkeyPatch

    def __call__(self, *argv: str, stdin: str = "", tty: bool = False, common: bool = True) -> Record:
        args = list(argv)
        if common:
            args += ["--store", self.store, "--master-key-file", str(self.key_file)]
        self.monkeypatch.setattr(sys, "stdin", _Tty(stdin) if tty else io.StringIO(stdin))
        self.capsys.readouterr()
        code = main(args)
        captured = self.capsys.readouterr()
        record = Record(args, code, captured.out, captured.err)
        self.transcript.records.append(record)
        assert "Traceback" not in captured.err + captured.out
        return record

    def json(self, *argv: str, stdin: str = "", code: int = 0) -> Any:
        record = self("--json", *argv, stdin=stdin)
        assert record.code == code, record.err or record.out
        doc = json.loads(record.out)
        for name in ("api_key", "signing_secret"):
            if isinstance(doc, dict) and name in doc:
                record.issued.append(doc[name])
        return doc

    def secret_stdin(self, *values: str) -> None:
        self.transcript.credentials.update(values)


@pytest.fixture
def run(
    tmp_path: Path, transcript: Transcript, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Cli:
    for var in list(os.environ):
        if var.startswith("MCP_AUTHZ_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    return Cli(tmp_path, f"sqlite:///{tmp_path}/authz.db", tmp_path / "master.key", transcript, capsys, monkeypatch)


@pytest.fixture
def ready(run: Cli) -> Cli:
    """An initialised store, a master key file, and a `github` server in individual mode."""
    doc = run.json("init")
    run.transcript.master_keys.add(read_key_file(run.key_file))
    assert doc["master_key_file"] == str(run.key_file)
    run.json("servers", "add", "github", "--mode", "individual", "-H", "Authorization: Bearer {{API_KEY}}")
    return run


# --- init ------------------------------------------------------------------------------


def test_init_prints_the_admin_key_once_and_writes_a_0600_key_file(run: Cli) -> None:
    rec = run("init", "--store", "sqlite:///authz.db", common=False)
    assert rec.code == 0, rec.err
    keys_shown = KEY_RE.findall(rec.out)
    assert len(keys_shown) == 1
    (key,) = keys_shown
    rec.issued.append(key)
    assert "shown once" in rec.out
    key_file = run.tmp / "mcp-authz.key"  # beside the SQLite file
    assert f"wrote it to {key_file.name}" in rec.out
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    spec = read_key_file(key_file)
    run.transcript.master_keys.add(spec)
    assert spec not in rec.out
    key_id = gateway_keys.parse(key).key_id
    assert f"({key_id})" in rec.out
    # Later commands find the key file beside the database without being told.
    listing = run("keys", "list", "--store", "sqlite:///authz.db", common=False)
    assert listing.code == 0, listing.err
    assert key_id in listing.out and "initial admin key" in listing.out and "active" in listing.out
    assert KEY_RE.search(listing.out) is None and key[4:] not in listing.out
    # A second init refuses and writes nothing.
    again = run("init", "--store", "sqlite:///authz.db", common=False)
    assert again.code == 1 and "already initialised" in again.err
    assert sorted(p.name for p in run.tmp.iterdir()) == ["authz.db", "mcp-authz.key"]


def test_init_json_with_an_explicit_key_file_and_with_an_env_key(run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = run.json("init", "--admin-name", "root", "--team", "ops")
    run.transcript.master_keys.add(read_key_file(run.key_file))
    assert doc["master_key_file"] == str(run.key_file) and doc["store"] == run.store
    assert doc["principal"]["name"] == "root" and doc["principal"]["team"] == "ops"
    assert doc["principal"]["roles"] == ["admin"]
    assert doc["key"]["principal"] == "root" and doc["key"]["status"] == "active"
    assert gateway_keys.parse(doc["api_key"]).key_id == doc["key"]["key_id"]
    assert Keyring.from_spec(read_key_file(run.key_file)).versions == (1,)
    spec = Keyring.generate_spec()
    run.transcript.master_keys.add(spec)
    monkeypatch.setenv("MCP_AUTHZ_MASTER_KEY", spec)
    other = f"sqlite:///{run.tmp}/other.db"
    rec = run("--json", "init", "--store", other, common=False)
    assert rec.code == 0, rec.out
    out = json.loads(rec.out)
    rec.issued.append(out["api_key"])
    assert out["master_key_file"] is None and not (run.tmp / "mcp-authz.key").exists()
    assert run("keys", "list", "--store", other, common=False).code == 0


def test_init_refuses_to_reuse_an_unconfigured_key_file(run: Cli) -> None:
    (run.tmp / "mcp-authz.key").write_text("whatever")
    rec = run("init", "--store", "sqlite:///authz.db", common=False)
    assert rec.code == 2
    assert "mcp-authz.key exists already" in rec.err and "--master-key-file" in rec.err
    assert sorted(p.name for p in run.tmp.iterdir()) == ["mcp-authz.key"]  # no empty database left behind


@pytest.mark.parametrize(
    ("key_file", "says"),
    [("bad.key", "malformed"), ("missing-dir/new.key", "its directory does not exist")],
)
def test_a_master_key_init_cannot_use_leaves_no_empty_database(run: Cli, key_file: str, says: str) -> None:
    bad = run.tmp / "bad.key"
    bad.write_text("not a key\n")
    bad.chmod(0o600)
    rec = run("init", "--store", "sqlite:///authz.db", "--master-key-file", key_file, common=False)
    assert rec.code == 2 and says in rec.err, rec.err
    assert sorted(p.name for p in run.tmp.iterdir()) == ["bad.key"]
    rec = run("init", "--store", "sqlite:///authz.db", "--admin-name", "Bad Name", common=False)
    assert rec.code == 1 and "admin name is invalid" in rec.err


# --- every command, as JSON -------------------------------------------------------------------


def test_every_command_prints_one_json_document(ready: Cli) -> None:
    run = ready
    servers = run.json("servers", "list")["servers"]
    assert [(s["name"], s["mode"], s["headers"]) for s in servers] == [
        ("github", "individual", ["Authorization: Bearer {{API_KEY}}"])
    ]
    added = run.json(
        "servers", "add", "crm", "--mode", "shared", "-H", "X-API-Key: {{API_KEY}}", "-H", "X-Client-ID: {{CLIENT_ID}}",
        "-H", "X-Trace: {{TRACE}}", "--optional", "TRACE", "--description", "the CRM",
    )
    assert added["server"]["placeholders"] == [
        {"name": "API_KEY", "required": True},
        {"name": "CLIENT_ID", "required": True},
        {"name": "TRACE", "required": False},
    ]
    assert len(added["signing_secret"]) >= 40 and added["server"]["shared_status"] == "missing"
    run.secret_stdin(CRM_KEY, CRM_CLIENT)
    shared = run.json("servers", "set-shared", "crm", stdin=f"API_KEY={CRM_KEY}\nCLIENT_ID = {CRM_CLIENT}\n")
    assert shared["server"]["shared_values"] == {"API_KEY": "…fXYZ", "CLIENT_ID": "…zyxw"}
    assert shared["server"]["shared_status"] == "configured"
    shown = run.json("servers", "show", "crm")["server"]
    assert shown["description"] == "the CRM" and shown["has_signing_secret"] is True
    rotated = run.json("servers", "rotate-signing-secret", "crm")
    assert rotated["server"] == "crm" and rotated["signing_secret"] != added["signing_secret"]

    alice = run.json("principals", "add", "alice", "--team", "eng", "--roles", "user,manager", "--rate-limit", "120")
    assert alice["principal"]["roles"] == ["manager", "user"] and alice["principal"]["rate_limit_per_minute"] == 120
    bot = run.json("principals", "add", "deploy-bot", "--kind", "service")["principal"]
    assert (bot["kind"], bot["team"], bot["roles"]) == ("service", "default", ["user"])
    assert [p["name"] for p in run.json("principals", "list")["principals"]] == ["admin", "alice", "deploy-bot"]
    assert [p["name"] for p in run.json("principals", "list", "--team", "eng")["principals"]] == ["alice"]
    assert run.json("principals", "disable", "alice")["principal"]["disabled"] is True
    assert run.json("principals", "enable", "alice")["principal"]["disabled"] is False
    assert [t["name"] for t in run.json("teams", "list")["teams"]] == ["default", "eng"]
    assert run.json("teams", "disable", "eng")["team"] == {
        "name": "eng", "disabled": True, "created_at": run.json("teams", "list")["teams"][1]["created_at"]
    }
    assert run.json("teams", "enable", "eng")["team"]["disabled"] is False

    created = run.json(
        "keys", "create", "alice", "--label", "laptop", "--expires", "2099-01-31", "--servers", "github,crm:search"
    )
    assert created["key"]["expires_at"] == "2099-01-31T00:00:00Z"
    assert created["key"]["scope"] == ["github", "crm:search"] and created["key"]["label"] == "laptop"
    key_id = created["key"]["key_id"]
    assert gateway_keys.parse(created["api_key"]).key_id == key_id
    listed = run.json("keys", "list", "--principal", "alice")["keys"]
    assert [(k["key_id"], k["status"]) for k in listed] == [(key_id, "active")]
    assert "api_key" not in json.dumps(listed) and created["api_key"] not in json.dumps(listed)
    regen = run.json("keys", "regenerate", key_id, "--grace", "10m")
    assert regen["replaced"] == key_id and regen["grace_seconds"] == 600
    assert regen["key"]["label"] == "laptop" and regen["key"]["scope"] == ["github", "crm:search"]
    statuses = {k["key_id"]: (k["status"], k["revoked_at"]) for k in run.json("keys", "list")["keys"]}
    assert statuses[key_id][0] == "active" and statuses[key_id][1] is not None  # in its grace period
    revoked = run.json("keys", "revoke", key_id)["key"]
    assert revoked["status"] == "revoked" and revoked["key_id"] == key_id

    run.secret_stdin(ALICE_TOKEN)
    override = run.json("overrides", "set", "--principal", "alice", "--server", "github", stdin=ALICE_TOKEN + "\n")
    assert override["override"] == {
        "principal": "alice",
        "kind": "user",
        "server": "github",
        "values": {"API_KEY": "…8899"},
        "updated_by": "cli",
        "updated_at": override["override"]["updated_at"],
        "expires_at": None,
        "status": "configured",
        "status_reason": "",
    }
    assert [o["server"] for o in run.json("overrides", "list", "--principal", "alice")["overrides"]] == ["github"]
    assert run.json("overrides", "list", "--server", "crm")["overrides"] == []
    assert run.json("overrides", "delete", "--principal", "alice", "--server", "github") == {
        "deleted": {"principal": "alice", "server": "github"}
    }
    assert run.json("servers", "remove", "crm") == {"removed": {"server": "crm"}}
    assert run.json("keys", "revoke", key_id, code=0)["key"]["status"] == "revoked"
    missing = run.json("servers", "show", "crm", code=1)
    assert missing == {"error": {"reason": "not_found", "message": "No server named crm."}}


def test_tables_for_people(ready: Cli) -> None:
    run = ready
    rec = run("principals", "add", "bob", "--roles", "user")
    assert rec.code == 0 and "Added user bob" in rec.out
    rec = run("keys", "create", "bob", "--label", "ci", "--expires", "30d")
    assert rec.code == 0 and "shown once" in rec.out
    rec.issued += KEY_RE.findall(rec.out)
    listing = run("keys", "list").out.splitlines()
    assert listing[0].split() == [
        "KEY", "ID", "PRINCIPAL", "LABEL", "STATUS", "CREATED", "LAST", "USED", "EXPIRES", "REVOKED", "SCOPE"
    ]
    assert len(listing) == 3 and any(" bob " in line and " ci " in line for line in listing)
    assert run("overrides", "list").out.strip() == "(no overrides)"
    servers = run("servers", "list").out.splitlines()
    assert servers[0].split() == ["NAME", "MODE", "PLACEHOLDERS", "SHARED", "DESCRIPTION"]
    assert servers[1].split()[:3] == ["github", "individual", "API_KEY"]


def test_table_cells_are_capped_and_json_is_whole(ready: Cli) -> None:
    description = "d" * 400 + "🟢" * 50  # wide characters count twice
    run = ready
    run.json("servers", "add", "wide", "--mode", "none", "--description", description)
    lines = run("servers", "list").out.splitlines()
    (row,) = [line for line in lines if line.startswith("wide")]
    cell = row.split()[-1]
    assert cell == "d" * (MAX_COLUMN - 1) + "…" and max(len(line) for line in lines) < 2 * MAX_COLUMN
    listed = {s["name"]: s for s in run.json("servers", "list")["servers"]}
    assert listed["wide"]["description"] == description
    assert _clip("ab🟢", 3) == "ab…" and _clip("a🟢b", 3) == "a…" and _clip("abc", 3) == "abc"


# --- secrets from stdin --------------------------------------------------------------------------


@pytest.fixture
def crm(ready: Cli) -> Cli:
    ready.json(
        "servers", "add", "crm", "--mode", "individual", "-H", "X-API-Key: {{API_KEY}}",
        "-H", "X-Client-ID: {{CLIENT_ID}}", "-H", "X-Trace: {{TRACE}}", "--optional", "TRACE",
    )
    ready.json("principals", "add", "alice")
    return ready


@pytest.mark.parametrize(
    ("server", "stdin", "masks"),
    [
        ("github", f"{GH_TOKEN}\n", {"API_KEY": "…1234"}),
        ("github", f"  {GH_TOKEN}  \r\n\n", {"API_KEY": "…1234"}),
        ("github", f"API_KEY={GH_TOKEN}\n", {"API_KEY": "…1234"}),
        ("github", "dGVzdC10b2tlbi12YWx1ZQ==\n", {"API_KEY": "…ZQ=="}),  # '=' in a bare value stays
        ("crm", f"API_KEY={CRM_KEY}\nCLIENT_ID={CRM_CLIENT}\n", {"API_KEY": "…fXYZ", "CLIENT_ID": "…zyxw"}),
        (
            "crm",
            f"\nCLIENT_ID={CRM_CLIENT}\nAPI_KEY={CRM_KEY}\nTRACE=\n",
            {"API_KEY": "…fXYZ", "CLIENT_ID": "…zyxw"},
        ),
        ("crm", f"API_KEY={CRM_KEY}\nCLIENT_ID=a=b=c=d=e=f=g=h=i\nTRACE=trace-value-1234567\n",
         {"API_KEY": "…fXYZ", "CLIENT_ID": "…=h=i", "TRACE": "…4567"}),
    ],
)
def test_override_values_from_stdin(crm: Cli, server: str, stdin: str, masks: dict[str, str]) -> None:
    crm.secret_stdin(GH_TOKEN, CRM_KEY, CRM_CLIENT, "dGVzdC10b2tlbi12YWx1ZQ==", "trace-value-1234567")
    doc = crm.json("overrides", "set", "--principal", "alice", "--server", server, stdin=stdin)
    assert doc["override"]["values"] == masks


@pytest.mark.parametrize(
    ("server", "stdin", "message"),
    [
        ("github", "", "No values on stdin"),
        ("github", "\n  \n", "No values on stdin"),
        ("github", f"{GH_TOKEN}\n{GH_TOKEN}\n", "one placeholder, API_KEY: give its value as a single line"),
        ("crm", f"{CRM_KEY}\n", "Line 1 of stdin is not NAME=VALUE"),
        ("crm", f"API_KEY={CRM_KEY}\nsecret-{CRM_CLIENT}==\n", "Line 2 of stdin is not NAME=VALUE"),
        ("crm", f"API_KEY={CRM_KEY}\nAPI_KEY={CRM_KEY}\n", "API_KEY is given twice"),
        ("crm", f"API_KEY={CRM_KEY}\n", "needs a value for CLIENT_ID"),
        ("crm", f"API_KEY={CRM_KEY}\nCLIENT_ID=\n", "The value of CLIENT_ID is empty"),
        ("crm", f"API_KEY={CRM_KEY}\nCLIENT_ID={CRM_CLIENT}\nOTHER=x\n", "Unknown placeholder OTHER"),
        ("crm", f"API_KEY={CRM_KEY}\x07\nCLIENT_ID={CRM_CLIENT}\n", "API_KEY contains a control character"),
    ],
)
def test_bad_stdin_is_refused_without_echo(crm: Cli, server: str, stdin: str, message: str) -> None:
    crm.secret_stdin(GH_TOKEN, CRM_KEY, CRM_CLIENT)
    rec = crm("overrides", "set", "--principal", "alice", "--server", server, stdin=stdin)
    assert rec.code == 1 and message in rec.err
    for value in (GH_TOKEN, CRM_KEY, CRM_CLIENT):
        assert value not in rec.err + rec.out
    assert crm.json("overrides", "list")["overrides"] == []


def test_tty_prompts_per_placeholder(crm: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"API_KEY": CRM_KEY, "CLIENT_ID": CRM_CLIENT, "TRACE": ""}
    prompts: list[str] = []

    def fake_getpass(prompt: str = "") -> str:
        prompts.append(prompt)
        return answers[prompt.split(" ")[0]]

    monkeypatch.setattr(getpass, "getpass", fake_getpass)
    crm.secret_stdin(CRM_KEY, CRM_CLIENT)
    rec = crm("overrides", "set", "--principal", "alice", "--server", "crm", tty=True)
    assert rec.code == 0, rec.err
    assert prompts == ["API_KEY for crm: ", "CLIENT_ID for crm: ", "TRACE for crm (optional, Enter to skip): "]
    assert "API_KEY=…fXYZ" in rec.out and "TRACE" not in rec.out
    answers["CLIENT_ID"] = ""
    rec = crm("overrides", "set", "--principal", "alice", "--server", "crm", tty=True)
    assert rec.code == 1 and "CLIENT_ID is required" in rec.err


def test_set_shared_from_stdin_and_mode_checks(ready: Cli) -> None:
    run = ready
    run.json("servers", "add", "linear", "--mode", "shared", "-H", "Authorization: Bearer {{API_KEY}}")
    run.secret_stdin(GH_TOKEN)
    rec = run("servers", "set-shared", "linear", stdin=GH_TOKEN)
    assert rec.code == 0 and rec.out.strip() == "Set shared values of linear: API_KEY=…1234"
    # Wrong mode or unknown server: refused before stdin is read.
    rec = run("servers", "set-shared", "github", stdin=GH_TOKEN)
    assert rec.code == 1 and "individual mode" in rec.err and "overrides set" in rec.err
    rec = run("servers", "set-shared", "nope", stdin=GH_TOKEN)
    assert rec.code == 1 and "No server named nope" in rec.err
    run.json("servers", "add", "open", "--mode", "none")
    rec = run("overrides", "set", "--principal", "admin", "--server", "open", stdin=GH_TOKEN)
    assert rec.code == 1 and "none mode" in rec.err


# --- errors and exit codes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["keys"], "the following arguments are required: ACTION"),
        (["keys", "revoke"], "the following arguments are required: key_id"),
        (["overrides", "set", "--principal", "a"], "the following arguments are required: --server-name"),
        (["keys", "create", "bob", "--expires", "soonish"], "argument --expires: expected an ISO date"),
        (["keys", "regenerate", "AAAAAAA", "--grace", "forever"], "argument --grace: expected a duration"),
        (["servers", "add", "x", "--mode", "oauth"], "argument --mode: invalid choice"),
        (["principals", "add", "x", "--rate-limit", "many"], "argument --rate-limit"),
        (["overrides", "set", "--principal", "a", "--server", "b", GH_TOKEN], "unexpected extra arguments (not shown)"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(run: Cli, argv: list[str], message: str) -> None:
    rec = run(*argv, common=False)
    assert rec.code == 2 and message in rec.err and rec.out == ""
    assert "usage: mcp-authz" in rec.err and GH_TOKEN not in rec.err
    as_json = run("--json", *argv, common=False)
    assert as_json.code == 2 and json.loads(as_json.out)["error"]["reason"] == "usage"


def test_master_key_problems_exit_2(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    run = ready
    wrong = run.tmp / "wrong.key"
    spec = "1:" + base64.b64encode(os.urandom(32)).decode()
    run.transcript.master_keys.add(spec)
    wrong.write_text(spec)
    wrong.chmod(0o600)
    rec = run("keys", "list", "--store", run.store, "--master-key-file", str(wrong), common=False)
    assert rec.code == 2 and rec.err.strip() == (
        "error: The master key (version 1) does not match this store. Use the key the store was initialised with."
    )
    # Nothing is written under a wrong key.
    rec = run("principals", "add", "mallory", "--store", run.store, "--master-key-file", str(wrong), common=False)
    assert rec.code == 2
    assert "mallory" not in run("principals", "list").out
    readable = run.tmp / "readable.key"
    readable.write_text(read_key_file(run.key_file))
    readable.chmod(0o644)
    rec = run("--json", "keys", "list", "--store", run.store, "--master-key-file", str(readable), common=False)
    assert rec.code == 2
    assert json.loads(rec.out) == {
        "error": {
            "reason": "master_key",
            "message": f"The master key file {readable} is readable by others (mode 0644); run chmod 600.",
        }
    }
    rec = run("keys", "list", "--store", run.store, common=False)
    assert rec.code == 2 and "No master key" in rec.err
    monkeypatch.setenv("MCP_AUTHZ_MASTER_KEY", "not base64 !!")
    rec = run("keys", "list", "--store", run.store, common=False)
    assert rec.code == 2 and "master key is malformed" in rec.err and "not base64" not in rec.err
    # The flag wins over the environment.
    assert run("keys", "list").code == 0
    monkeypatch.setenv("MCP_AUTHZ_MASTER_KEY", read_key_file(run.key_file))
    monkeypatch.setenv("MCP_AUTHZ_STORE", run.store)
    assert run("keys", "list", common=False).code == 0


def test_store_problems(run: Cli) -> None:
    rec = run("keys", "list")
    assert rec.code == 2 and "No store at" in rec.err and "mcp-authz init" in rec.err
    assert not (run.tmp / "authz.db").exists()
    rec = run("keys", "list", "--store", "mysql://x/y", "--master-key-file", str(run.key_file), common=False)
    assert rec.code == 2 and "store URL must start with" in rec.err


def test_operation_errors_exit_1(ready: Cli) -> None:
    run = ready
    for argv, message in [
        (["principals", "disable", "nobody"], "No principal named nobody."),
        (["teams", "enable", "nobody"], "No team named nobody."),
        (["servers", "add", "github", "--mode", "none"], "A server named github exists already."),
        (["servers", "add", "x", "--mode", "shared", "-H", "Host: {{A}}"], "Header Host is reserved"),
        (["keys", "create", "admin", "--servers", "nope"], "names server nope, which does not exist"),
        (["keys", "create", "admin", "--expires", "2001-01-01"], "expiry must be in the future"),
        (["keys", "revoke", "mgw_" + "A" * 32], "That is a whole gateway key"),
        (["overrides", "delete", "--principal", "admin", "--server", "github"], "admin has no override"),
    ]:
        rec = run(*argv)
        assert rec.code == 1, argv
        assert rec.err.startswith("error: ") and message in rec.err, rec.err
        assert rec.out == ""


# --- connect ---------------------------------------------------------------------------------------


def test_connect_prints_every_client_or_one_ready_to_paste(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    run = ready
    docs = run.json("connect", "--server-name", "github")
    assert list(docs) == ["claude-desktop", "cursor", "vscode", "claude-code", "curl"]
    cursor = json.loads(docs["cursor"]["text"])["mcpServers"]["github"]
    assert cursor == {"url": "http://127.0.0.1:10000/mcp/github", "headers": {"Authorization": "Bearer <YOUR_GATEWAY_KEY>"}}
    everything = run("connect", "--server-name", "github")
    assert everything.code == 0 and everything.out.count("== ") == 5 and "mgw_" not in everything.out.replace("(mgw_…)", "")

    monkeypatch.setenv("MCP_AUTHZ_GATEWAY_URL", "https://gw.example.com")
    one = run("connect", "--server-name", "github", "--client", "claude-code")
    assert one.code == 0 and one.out == ("claude mcp add --transport http github https://gw.example.com/mcp/github "
                                         "--header 'Authorization: Bearer <YOUR_GATEWAY_KEY>'\n")  # fmt: skip
    assert "Replace <YOUR_GATEWAY_KEY>" in one.err
    flag = run("connect", "--server-name", "github", "--client", "curl", "--gateway-url", "http://127.0.0.1:8080")
    assert "http://127.0.0.1:8080/mcp/github" in flag.out

    key = "mgw_" + "K" * 32
    monkeypatch.setenv("MCP_AUTHZ_KEY", key)  # not remote mode: no --server, no $MCP_AUTHZ_SERVER
    filled = run("connect", "--server-name", "github", "--client", "cursor", "--key-from-env")
    filled.issued.append(key)  # the caller's own key, asked for
    assert filled.code == 0 and json.loads(filled.out)["mcpServers"]["github"]["headers"]["Authorization"] == f"Bearer {key}"


def test_connect_refuses_clearly(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    run = ready
    for argv, code, message in [
        (["--server-name", "githb"], 1, "No server named githb."),
        (["--server-name", "Git Hub"], 1, "server name is invalid"),
        (["--server-name", "github", "--gateway-url", "http://gw/$(id)"], 1, "The gateway URL must be"),
        (["--server-name", "github", "--key-from-env"], 2, "--key-from-env needs your gateway key in $MCP_AUTHZ_KEY"),
        (["--server-name", "github", "--client", "emacs"], 2, "invalid choice"),
    ]:
        rec = run("connect", *argv)
        assert (rec.code, rec.out) == (code, ""), argv
        assert message in rec.err, rec.err
    monkeypatch.setenv("MCP_AUTHZ_KEY", "ghp_notagatewaykey")
    rec = run("connect", "--server-name", "github", "--key-from-env")
    assert rec.code == 2 and "does not hold a gateway key" in rec.err and "ghp_" not in rec.err


# --- argument parsing helpers ----------------------------------------------------------------------

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30d", NOW + timedelta(days=30)),
        ("12h", NOW + timedelta(hours=12)),
        ("15m", NOW + timedelta(minutes=15)),
        ("2w", NOW + timedelta(weeks=2)),
        ("2026-12-31", datetime(2026, 12, 31, tzinfo=timezone.utc)),
        ("2026-12-31T18:30", datetime(2026, 12, 31, 18, 30, tzinfo=timezone.utc)),
        ("2026-12-31T18:30Z", datetime(2026, 12, 31, 18, 30, tzinfo=timezone.utc)),
        ("2026-12-31T18:30+02:00", datetime(2026, 12, 31, 16, 30, tzinfo=timezone.utc)),
    ],
)
def test_parse_expiry(text: str, expected: datetime) -> None:
    assert parse_expiry(text, now=NOW) == expected


@pytest.mark.parametrize("text", ["", "30", "30x", "d30", "tomorrow", "2026-13-01"])
def test_parse_expiry_rejects(text: str) -> None:
    with pytest.raises(Exception, match="expected"):
        parse_expiry(text, now=NOW)


@pytest.mark.parametrize(
    ("parse", "text", "message"),
    [(parse_expiry, "99999999d", "reaches past the years 1 to 9999"), (parse_when, "99999999d", "reaches past"),
     (parse_expiry, "9" * 30 + "d", "the duration is too long"), (parse_grace, "9" * 20 + "w", "too long")],
)  # fmt: skip
def test_a_duration_past_the_calendar_is_a_usage_error(parse: Any, text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse(text)


def test_parse_duration_and_grace() -> None:
    assert parse_duration("45s") == timedelta(seconds=45)
    assert parse_grace("300") == 300 and parse_grace("10m") == 600 and parse_grace("1h") == 3600
    assert sqlite_path("sqlite:///rel/a.db") == Path("rel/a.db")
    assert sqlite_path("sqlite:////abs/a.db") == Path("/abs/a.db")
    assert sqlite_path("postgresql://h/db") is None


# --- serve and run ------------------------------------------------------------------------------------


def test_serve_and_run_hand_validated_settings_to_the_app(run: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    import authz_server.app as app

    spec = Keyring.generate_spec()
    run.transcript.master_keys.add(spec)
    monkeypatch.setenv("MCP_AUTHZ_MASTER_KEY", spec)
    calls: list[tuple[str, Any, Any, Any]] = []

    async def fake_serve(settings: Any, keyring: Any) -> None:
        calls.append(("serve", settings, keyring, None))

    async def fake_run(settings: Any, keyring: Any, envoy_config: Path) -> None:
        calls.append(("run", settings, keyring, envoy_config))

    monkeypatch.setattr(app, "serve", fake_serve)
    monkeypatch.setattr(app, "run_with_envoy", fake_run)
    rec = run(
        "serve", "--listen", "0.0.0.0:9100", "--key-header", "X-Gateway-Key", "--poll-interval", "0.5",
        "--store", "sqlite:///s.db", "--insecure-check-listener", "--admin-listen", "unix:/run/mcp-authz/admin.sock",
        common=False,
    )
    assert rec.code == 0, rec.err
    rec = run("run", "--envoy-config", "my/envoy.yaml", common=False)
    assert rec.code == 0, rec.err
    (kind, settings, keyring, _), (kind2, settings2, _, config) = calls
    assert (kind, settings.listen, settings.key_header) == ("serve", "0.0.0.0:9100", "x-gateway-key")
    assert settings.poll_interval == 0.5
    assert settings.store_url == "sqlite:///s.db" and keyring.versions == (1,)
    assert settings.insecure_check_listener and settings.admin_listen == "unix:/run/mcp-authz/admin.sock"
    assert (kind2, settings2.listen, config) == ("run", "127.0.0.1:9001", Path("my/envoy.yaml"))
    assert (settings2.admin_listen, settings2.check_tls, settings2.insecure_check_listener) == ("127.0.0.1:9002", None, False)
    rec = run("serve", "--listen", "nowhere", common=False)
    assert rec.code == 2 and "listen address must be HOST:PORT" in rec.err
    rec = run("--json", "serve", "--poll-interval", "0", common=False)
    assert rec.code == 2 and json.loads(rec.out)["error"]["reason"] == "config"
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--listen", "0.0.0.0:9001"], "without mutual TLS"),
        (["--listen", "10.1.2.3:9001"], "without mutual TLS"),
        (["--listen", "sidecar.internal:9001"], "without mutual TLS"),  # a name may resolve anywhere
        (["--listen", "0.0.0.0:9001", "--tls-cert", "s.crt", "--tls-key", "s.key"], "must be mutual"),
        (["--tls-cert", "s.crt"], "needs both a certificate and its key"),
        (["--admin-listen", "0.0.0.0:9002"], "clear text"),
        (["--admin-listen", "127.0.0.1:9001"], "a listener of its own"),
        (["--listen", "unix:relative.sock"], "unix:/absolute/path"),
    ],
)
def test_serve_refuses_listeners_that_open_a_trust_boundary(run: Cli, monkeypatch: pytest.MonkeyPatch, argv: list[str],
                                                            says: str) -> None:
    import authz_server.app as app

    spec = Keyring.generate_spec()
    run.transcript.master_keys.add(spec)
    monkeypatch.setenv("MCP_AUTHZ_MASTER_KEY", spec)
    started: list[Any] = []

    async def fake_serve(settings: Any, keyring: Any) -> None:
        started.append(settings)

    monkeypatch.setattr(app, "serve", fake_serve)
    rec = run("serve", *argv, common=False)
    assert rec.code == 2 and says in rec.err, rec.err
    assert not started


# --- the real entry point -----------------------------------------------------------------------------


def test_installed_entry_point(tmp_path: Path, transcript: Transcript) -> None:
    exe = VENV_BIN / "mcp-authz"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_AUTHZ_")}
    key_file = tmp_path / "k.key"
    common = ["--store", f"sqlite:///{tmp_path}/e.db", "--master-key-file", str(key_file)]

    def proc(*argv: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(exe), *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
        transcript.records.append(Record(list(argv), done.returncode, done.stdout, done.stderr))
        return done

    done = proc("--json", "init", *common)
    assert done.returncode == 0, done.stderr
    transcript.master_keys.add(read_key_file(key_file))
    doc = json.loads(done.stdout)
    transcript.records[-1].issued.append(doc["api_key"])
    listing = proc("keys", "list", "--json", *common)
    assert listing.returncode == 0 and json.loads(listing.stdout)["keys"][0]["key_id"] == doc["key"]["key_id"]
    bad = proc("keys", "list", "--store", f"sqlite:///{tmp_path}/e.db", "--master-key-file", str(tmp_path / "none"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: Cannot read the master key file")
    assert "Traceback" not in bad.stderr
    version = subprocess.run(
        [sys.executable, "-m", "authz_server", "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    assert version.returncode == 0 and version.stdout.startswith("mcp-authz ")


# --- the remote CLI, before any connection ------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for var in list(os.environ):
        if var.startswith("MCP_AUTHZ_"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("argv", "env", "code", "message"),
    [
        (["--server", "github", "overrides", "list"], {}, 2, "HOST:PORT"),
        (["--server", "127.0.0.1:1", "servers", "list", "--store", "sqlite:///x.db"], {}, 2, "--store"),
        (["--server", "127.0.0.1:1", "servers", "list"], {}, 2, "MCP_AUTHZ_KEY"),
        (["--server", "127.0.0.1:1", "servers", "list"], {"MCP_AUTHZ_KEY": "not-a-key"}, 2, "does not hold a gateway key"),
        (["--server", "127.0.0.1:1", "init"], {}, 2, "init runs locally only"),
        (["--server", "127.0.0.1:1", "serve"], {}, 2, "serve runs locally only"),
        (["--server", "127.0.0.1:1", "usage", "prune", "--older-than", "1d"], {}, 2, "usage prune runs locally only"),
        (["servers", "list"], {"MCP_AUTHZ_SERVER": "nonsense"}, 2, "HOST:PORT"),
    ],
)
def test_remote_mode_refuses_before_connecting(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str], env: dict[str, str],
    code: int, message: str,
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert main(argv) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert "not-a-key" not in err


def test_an_unreachable_sidecar_is_an_operation_error(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = gateway_keys.generate()[1].reveal()
    clean_env.setenv("MCP_AUTHZ_KEY", key)
    clean_env.setenv("MCP_AUTHZ_SERVER", f"127.0.0.1:{_closed_port()}")
    assert main(["--json", "whoami"]) == 1
    out = capsys.readouterr().out
    assert json.loads(out)["error"]["reason"] == "unavailable" and key not in out


# --- audit, overrides status, servers update ------------------------------------------------------------


def test_local_audit_status_and_server_update(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    common = ["--store", f"sqlite:///{tmp_path}/a.db"]

    def run(*argv: str) -> str:
        assert main([*argv, *common]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    run("init")
    clean_env.setenv("MCP_AUTHZ_MASTER_KEY_FILE", str(tmp_path / "mcp-authz.key"))
    run("servers", "add", "github", "--mode", "individual", "-H", "Authorization: Bearer {{API_KEY}}",
        "--upstream-url", "http://127.0.0.1:9/mcp")
    run("principals", "add", "alice", "--team", "eng")
    assert "upstream:     https://mcp.example.com/mcp" in run(
        "servers", "update", "github", "--upstream-url", "https://mcp.example.com/mcp")
    table = run("overrides", "status", "--server-name", "github")
    assert "🟡 missing" in table and "alice" in table and "🟢 configured  🟡 missing  🔴 invalid  ⏰ expired" in table
    clean_env.setattr("sys.stdin", __import__("io").StringIO("ghp_localTOKEN0123456789\n"))
    run("overrides", "set", "--server-name", "github", "--principal", "alice", "--expires", "30d")
    assert "🟢 configured" in run("overrides", "status", "--server", "github", "--principal", "alice")
    events = json.loads(run("--json", "audit", "--action", "overrides.*"))["events"]
    assert [e["action"] for e in events] == ["overrides.status", "overrides.set", "overrides.status"]
    assert all(e["actor"] == "cli" for e in events)
    export = run("audit", "--export", "--actor", "cli")
    lines = [json.loads(line) for line in export.splitlines()]
    assert lines and {e["actor"] for e in lines} == {"cli"}
    assert [json.loads(line) for line in run("audit", "--export", "--limit", "2").splitlines()] == lines[:2]
    assert "ghp_localTOKEN0123456789" not in export + json.dumps(events)


# --- usage ------------------------------------------------------------------------------------------------

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


# --- usage: query -----------------------------------------------------------------------------------------


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


# --- usage: export ----------------------------------------------------------------------------------------


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


# --- usage: prune -----------------------------------------------------------------------------------------


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


def test_usage_argument_errors_exit_2(ready: Cli, people: dict[str, str]) -> None:
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


def test_usage_operation_errors_exit_1(ready: Cli, people: dict[str, str]) -> None:
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


# --- usage: time arguments (NOW: above) -------------------------------------------------------------------


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


# --- a key given to the CLI is never printed back -----------------------------------------------------------


@pytest.fixture
def keyed_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
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
def test_the_cli_never_prints_a_key_it_was_given(keyed_cli, argv: tuple[str, ...], code: int, says: str) -> None:  # type: ignore[no-untyped-def]
    run, admin_key = keyed_cli
    shown = redacted(gateway_keys.parse(admin_key).key_id)
    got, out = run(*(a.format(key=admin_key) for a in argv))
    assert got == code, out
    assert "Traceback" not in out
    assert_no_key(out, admin_key)
    assert says.format(shown=shown) in (json.loads(out)["error"]["message"] if argv[0] == "--json" else out)
    # The audit trail the CLI wrote keeps no key either.
    code, audit = run("--json", "audit")
    assert code == 0, audit
    assert_no_key(audit, admin_key)


# --- the transcript: last --------------------------------------------------------------------------------


# --- master-key -----------------------------------------------------------------------------------------


def _remember_keys(run: Cli) -> list[str]:
    """Every key (base64) in the key file, for the leak scan; and the file's versions, newest first."""
    entries = [e.split(":", 1) for e in read_key_file(run.key_file).split(",")]
    run.transcript.master_keys.update(b64 for _, b64 in entries)
    return [v for v, _ in entries]


def test_master_key_add_rotate_status_retire(ready: Cli) -> None:
    ready.secret_stdin(ALICE_TOKEN)
    ready.json("principals", "add", "alice")
    ready.json("overrides", "set", "--principal", "alice", "--server", "github", stdin=f"API_KEY={ALICE_TOKEN}\n")
    _remember_keys(ready)
    rec = ready("master-key", "add")
    assert rec.code == 0, rec.err
    assert _remember_keys(ready) == ["2", "1"]
    assert stat.S_IMODE(ready.key_file.stat().st_mode) == 0o600
    assert "Added master key version 2" in rec.out and "master-key rotate" in rec.out
    assert sorted(p.name for p in ready.tmp.iterdir()) == ["authz.db", "master.key"]  # no temporary file left

    status = ready.json("master-key", "status")
    assert status["active_version"] == 2 and status["rows_under_old_versions"] == 2
    assert [(v["version"], v["servers"], v["overrides"]) for v in status["versions"]] == [(2, 0, 0), (1, 1, 1)]
    refused = ready("master-key", "retire", "--version", "1")
    assert refused.code == 1 and "2 rows are still sealed under master key version 1" in refused.err
    assert _remember_keys(ready) == ["2", "1"]  # the file is untouched

    rotated = ready.json("master-key", "rotate", "--batch", "1")
    assert (rotated["resealed_servers"], rotated["resealed_overrides"], rotated["batches"]) == (1, 1, 2)
    assert rotated["rows_under_old_versions"] == 0
    again = ready("master-key", "rotate")
    assert again.code == 0 and "Re-encrypted 0 server(s) and 0 override(s)" in again.out
    table = ready("master-key", "status")
    assert table.code == 0 and "Every sealed value is under the active version." in table.out
    assert re.search(r"^2\s+yes\s+yes\s+yes\s+1\s+1$", table.out, re.M), table.out

    retired = ready("master-key", "retire", "--version", "1")
    assert retired.code == 0, retired.err
    assert _remember_keys(ready) == ["2"] and stat.S_IMODE(ready.key_file.stat().st_mode) == 0o600
    # The credential set before the rotation is still served: it opens under version 2 alone.
    listing = ready.json("overrides", "list")
    assert [o["status"] for o in listing["overrides"]] == ["configured"]
    assert ready("master-key", "retire", "--version", "2").code == 1  # the active one, never
    assert [e["action"] for e in ready.json("audit", "--action", "master_key.*")["events"]] == [
        "master_key.add", "master_key.retire", "master_key.rotate", "master_key.rotate", "master_key.retire",
        "master_key.retire"]  # fmt: skip


def test_master_key_standby_then_activate_for_sidecars_on_several_hosts(ready: Cli) -> None:
    ready.secret_stdin(ALICE_TOKEN)
    ready.json("principals", "add", "alice")
    ready.json("overrides", "set", "--principal", "alice", "--server", "github", stdin=f"API_KEY={ALICE_TOKEN}\n")
    added = ready.json("master-key", "add", "--standby")
    assert (added["added_version"], added["active_version"], added["versions"]) == (2, 1, [2, 1])
    assert _remember_keys(ready) == ["1", "2"]  # last: it opens, it does not seal
    standby = ready("master-key", "rotate")
    assert standby.code == 0 and "Re-encrypted 0 server(s)" in standby.out and "retire" not in standby.out
    ready.json("overrides", "set", "--principal", "alice", "--server", "github", stdin=f"API_KEY={ALICE_TOKEN}\n")
    assert ready.json("master-key", "status")["versions"][1] == {
        "version": 1, "active": True, "in_key_file": True, "in_store": True, "servers": 1, "overrides": 1}  # fmt: skip

    activated = ready("master-key", "activate", "--version", "2")
    assert activated.code == 0 and "version 2 seals every new value" in activated.out
    assert _remember_keys(ready) == ["2", "1"] and stat.S_IMODE(ready.key_file.stat().st_mode) == 0o600
    assert ready.json("master-key", "rotate")["resealed_overrides"] == 1
    missing = ready("master-key", "activate", "--version", "7")
    assert missing.code == 2 and "not in the key file" in missing.err
    assert [e["action"] for e in ready.json("audit", "--action", "master_key.*")["events"]] == [
        "master_key.add", "master_key.rotate", "master_key.activate", "master_key.rotate"]  # fmt: skip


def test_master_key_refusals(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = read_key_file(ready.key_file)
    _remember_keys(ready)
    assert ready("master-key", "retire").code == 2  # --version is required
    assert ready("master-key", "retire", "--version", "0").code == 2
    assert ready("master-key", "rotate", "--batch", "0").code == 2
    remote = ready("--server", "127.0.0.1:9", "master-key", "status", common=False)
    assert remote.code == 2 and "runs locally only" in remote.err
    # A key given in the environment can be read, not changed in place.
    monkeypatch.setenv("MCP_AUTHZ_MASTER_KEY", spec)
    assert ready("master-key", "status", "--store", ready.store, common=False).code == 0
    env = ready("master-key", "add", "--store", ready.store, common=False)
    assert env.code == 2 and "cannot be changed in place" in env.err
    monkeypatch.delenv("MCP_AUTHZ_MASTER_KEY")
    wrong = ready.tmp / "wrong.key"
    wrong.write_text(Keyring.generate_spec() + "\n")
    wrong.chmod(0o600)
    ready.transcript.master_keys.add(read_key_file(wrong).split(":", 1)[1])
    bad = ready("master-key", "add", "--store", ready.store, "--master-key-file", str(wrong), common=False)
    assert bad.code == 2 and "does not match this store" in bad.err
    assert read_key_file(wrong).count(",") == 0  # a wrong key file is never grown


def test_master_key_rotate_names_an_unreadable_row_and_exits_1(ready: Cli) -> None:
    import sqlite3

    alice = ready.json("principals", "add", "alice")["principal"]["id"]
    ready.secret_stdin(ALICE_TOKEN)
    ready.json("overrides", "set", "--principal", "alice", "--server", "github", stdin=f"API_KEY={ALICE_TOKEN}\n")
    with sqlite3.connect(ready.tmp / "authz.db") as db:  # a tampered ciphertext, under version 1
        db.execute("UPDATE overrides SET sealed_values = ?",
                   ('{"API_KEY":{"v":1,"n":"AAAAAAAAAAAAAAAA","c":"AAAAAAAAAAAAAAAAAAAAAA=="}}',))  # fmt: skip
    assert ready("master-key", "add").code == 0
    _remember_keys(ready)
    rec = ready("master-key", "rotate")
    assert rec.code == 1
    assert f"Not re-encrypted (unreadable): override:{alice}/github: A stored credential does not decrypt" in rec.out
    assert "Re-encrypted 1 server(s) and 0 override(s)" in rec.out and "older version: 1." in rec.out
    doc = ready.json("master-key", "rotate", code=1)
    assert doc["complete"] is False and doc["rows_under_old_versions"] == 1
    assert ready("master-key", "retire", "--version", "1").code == 1


def test_no_secret_leaks_in_any_output(transcript: Transcript) -> None:
    """Runs last (file order): every output of this module, scanned."""
    if len(transcript.records) < 20:
        pytest.skip("needs the transcript of the whole module")
    issued = {s: i for i, r in enumerate(transcript.records) for s in r.issued}
    shown_keys: dict[str, list[int]] = {}
    for i, record in enumerate(transcript.records):
        text = record.out + record.err
        for key in KEY_RE.findall(text):
            shown_keys.setdefault(key, []).append(i)
        for secret, where in issued.items():
            if secret in text:
                assert where == i, f"a one-time secret reappeared in {record.argv}"
        for value in transcript.credentials | transcript.master_keys:
            assert value not in text, f"a credential or master key in the output of {record.argv}"
            assert value[4:-4] not in text
    # Every gateway key printed anywhere was printed once, by the command that issued it.
    assert shown_keys, "the transcript shows no key at all"
    for key, where in shown_keys.items():
        assert where == [issued[key]]
    assert any(r.argv[:2] == ["--json", "init"] or r.argv[:1] == ["init"] for r in transcript.records)
