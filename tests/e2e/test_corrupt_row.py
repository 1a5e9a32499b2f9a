"""A stored credential that no longer decrypts: the sidecar starts, says so without the
value, answers 503 for that server only, and every other server keeps working."""

from __future__ import annotations

import base64
import json
import sqlite3
from contextlib import ExitStack
from pathlib import Path

import pytest

from .harness import post_initialize, run_envoy, run_example_server
from .sidecar import run_sidecar, seed

pytestmark = pytest.mark.e2e


def _tamper_shared_value(db: Path, server: str) -> None:
    with sqlite3.connect(db) as conn:
        (raw,) = conn.execute("SELECT shared_values FROM servers WHERE name = ?", (server,)).fetchone()
        values = json.loads(raw)
        for sealed in values.values():
            ct = bytearray(base64.b64decode(sealed["c"]))
            ct[0] ^= 0x01
            sealed["c"] = base64.b64encode(bytes(ct)).decode()
        conn.execute("UPDATE servers SET shared_values = ? WHERE name = ?", (json.dumps(values), server))


async def test_corrupt_credential_is_503_for_its_server_only(tmp_path: Path) -> None:
    world = await seed(tmp_path / "world")
    _tamper_shared_value(tmp_path / "world" / "authz.db", "linear")
    with ExitStack() as stop:
        sidecar = stop.enter_context(run_sidecar(world))
        upstream = stop.enter_context(run_example_server(tmp_path))
        envoy = stop.enter_context(
            run_envoy(tmp_path, authz_port=sidecar.port, upstream_port=upstream.port, servers=("linear", "github"))
        )
        r = await post_initialize(envoy.url("linear"), {"authorization": f"Bearer {world.keys['bob']}"})
        assert r.status == 503
        assert r.body["error"]["data"]["reason"] == "credential_unreadable"
        assert upstream.stats()["requests"] == 0
        ok = await post_initialize(envoy.url("github"), {"authorization": f"Bearer {world.keys['alice']}"})
        assert ok.status == 200
        logs = sidecar.logs()
        assert "server credentials unreadable" in logs and '"server": "linear"' in logs
        for secret in world.credentials:
            assert secret not in logs
