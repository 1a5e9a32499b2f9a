"""README "Backup and restore": `mcp-authz backup` copies a SQLite store while a sidecar serves,
and the README's restore steps, run as written, bring it back as it was (including what that
means: a key revoked after the backup works again, one created after it is unknown), with the
replaced store's audit trail still readable to revoke it once more."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from .harness import LOOPBACK, REPO_ROOT
from .sidecar import BIN, CLI, World, run_sidecar, seed_world
from .test_rolling_restart import _check_request

pytestmark = pytest.mark.e2e
MARKER = "<!-- tested: restore -->"


def _restore_block() -> str:
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    start = lines.index(MARKER) + 2  # past the marker and the opening fence
    end = lines.index("```", start)
    return "\n".join(lines[start:end])


def _allowed(world: World, port: int, key: str) -> int:
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        reply = external_auth_pb2_grpc.AuthorizationStub(channel).Check(_check_request(key), timeout=5)
    return int(reply.status.code)


def test_a_backup_taken_while_serving_restores_as_the_readme_says(tmp_path: Path) -> None:
    world = seed_world(tmp_path / "world")
    backups = tmp_path / "backups"
    backups.mkdir()
    copy = backups / "authz-backup.db"
    with run_sidecar(world) as sidecar:
        assert _allowed(world, sidecar.port, world.keys["alice"]) == 0
        done = world.cli("backup", str(copy))
        assert done.returncode == 0, done.stderr
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600 and "master key" in done.stdout
        assert world.cli("backup", str(copy)).returncode == 2  # never over an existing file
        # After the backup: a new key for bob, and alice's key revoked.
        created = world.cli("keys", "create", "bob", "--label", "after-backup", "--json")
        later_key = json.loads(created.stdout)["api_key"]
        assert world.cli("keys", "revoke", world.key_ids["alice"]).returncode == 0

    script = _restore_block().replace("/var/lib/mcp-authz", str(world.dir)).replace("/backups", str(backups))
    env = {**world.env, "PATH": f"{BIN}:{os.environ['PATH']}"}  # `mcp-authz` as installed
    restored = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=world.dir,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert re.search(r"^1\s+yes", restored.stdout, re.MULTILINE), restored.stdout  # the key file opens it
    database = world.dir / "authz.db"
    assert stat.S_IMODE(database.stat().st_mode) == 0o600 and (world.dir / "authz.db.replaced").exists()

    with run_sidecar(world, name="sidecar-restored") as sidecar:
        assert _allowed(world, sidecar.port, world.keys["bob"]) == 0  # from before the backup
        assert _allowed(world, sidecar.port, world.keys["alice"]) == 0  # revoked after it: valid again
        assert _allowed(world, sidecar.port, later_key) != 0  # created after it: unknown
    # The replaced store's audit trail says what to revoke again (the README's command).
    replaced = subprocess.run([CLI, "audit", "--action", "keys.revoke", "--since", "7d", "--json"],
                              env={**world.env, "MCP_AUTHZ_STORE": "sqlite:///authz.db.replaced"}, cwd=world.dir,
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    assert replaced.returncode == 0, replaced.stderr
    assert [e["target"] for e in json.loads(replaced.stdout)["events"]] == [f"key:{world.key_ids['alice']}"]
