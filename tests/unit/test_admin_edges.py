"""The admin API's edges without a sidecar: the one error table, the remote CLI's mode
selection and its refusals, and new local commands (audit, overrides status, servers update)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import grpc
import pytest

from authz_server.admin.api import DENIED_STATUS, ERROR_STATUS, error_message, grpc_status
from authz_server.cli import main
from authz_server.crypto import keys as gateway_keys
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
from authz_server.errors import REASONS


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


# --- new local commands -----------------------------------------------------------------------------------


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
