"""Issue 14, admin input, end to end: the real sidecar, a real Envoy, the CLI as a subprocess.

1. a misspelt JSON field (`expires` for `expires_at`) through Envoy is a 400 naming it, and no
   key is created, where Envoy's transcoder alone dropped it and made a key that never expires;
2. out-of-range times and request bytes that are not the message are INVALID_ARGUMENT over
   gRPC, with no traceback in the sidecar's log;
3. a refused 1 MiB name leaves a small audit event, and every view of the audit trail keeps
   working: JSON through Envoy, the export stream, `mcp-authz audit` local and remote;
4. the SQLite store's files are 0600 after the sidecar has written to them, also when an older
   version had left them 0644.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import stat
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import grpc
import httpx
import pytest

from authz_server.admin.gen import admin_pb2, admin_pb2_grpc
from authz_server.admin import wire
from authz_server.admin.remote import RemoteAdmin
from authz_server.admin.rpcs import RPCS, SERVICE_NAME, Rpc, Stream
from authz_server.admin.service import Actor
from authz_server.models import FIELD_MAX, TRUNCATED, Role, Secret

from .harness import EnvoyProcess, run_envoy, run_example_server
from .sidecar import CLI, Sidecar, World, add_key, admin_service, run_sidecar, seed

pytestmark = pytest.mark.e2e
HUGE = "n" * (1 << 20)  # a 1 MiB name, refused
ANY = Actor.key_holder()


@dataclass
class Stack:
    world: World
    sidecar: Sidecar
    envoy: EnvoyProcess

    def bearer(self, who: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.world.keys[who]}"}

    def json_api(self, method: str, path: str, who: str, body: Any = None) -> httpx.Response:
        return httpx.request(method, f"{self.envoy.base_url}{path}", headers=self.bearer(who), json=body, timeout=30)

    def stub(self, channel: grpc.Channel) -> Any:
        return admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]

    def metadata(self, who: str) -> tuple[tuple[str, str], ...]:
        return tuple(self.bearer(who).items())

    def remote_cli(self, who: str, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_AUTHZ_")}
        env["MCP_AUTHZ_KEY"] = self.world.keys[who]
        return subprocess.run([CLI, "--server", self.sidecar.admin_target, *args], capture_output=True, text=True,
                              env=env, timeout=60)  # fmt: skip


async def _add_admin(world: World) -> None:
    async with admin_service(world) as svc:
        await svc.add_principal(Actor.operator(), "root", "ops", [Role.ADMIN])
        await add_key(svc, world, "root")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("admin-input")
    with ExitStack() as stop:
        upstream = stop.enter_context(run_example_server(tmp))
        world = asyncio.run(seed(tmp / "world"))
        asyncio.run(_add_admin(world))
        sidecar = stop.enter_context(run_sidecar(world))
        envoy = stop.enter_context(run_envoy(tmp, authz_port=sidecar.port, authz_admin_port=sidecar.admin_port,
                                             upstream_port=upstream.port))  # fmt: skip
        yield Stack(world, sidecar, envoy)


def _key_count(stack: Stack, who: str) -> int:
    return len(stack.json_api("GET", "/admin/v1/keys", who).json()["keys"])


# 1 -- a misspelt JSON field ------------------------------------------------------------------------


def test_a_misspelt_expiry_through_envoy_is_refused_and_creates_no_key(stack: Stack) -> None:
    before = _key_count(stack, "alice")
    typo = stack.json_api("POST", "/admin/v1/keys", "alice", {"label": "ci", "expires": "2030-01-01T00:00:00Z"})
    assert typo.status_code == 400, typo.text
    assert typo.headers["content-type"] == "application/json"
    assert typo.json()["code"] == 3 and typo.json()["message"].startswith(
        "Unknown field in the request body: expires. CreateKey takes principal, label, expires_at, scope.")
    assert _key_count(stack, "alice") == before  # the call never reached the admin API

    # Both JSON spellings of the real field make a key that expires; a body without one, a key that does not.
    for body in ({"label": "ci", "expires_at": "2030-01-01T00:00:00Z"}, {"label": "ci", "expiresAt": "2030-01-01T00:00:00Z"}):
        made = stack.json_api("POST", "/admin/v1/keys", "alice", body)
        assert made.status_code == 200, made.text
        assert made.json()["key"]["expires_at"] == "2030-01-01T00:00:00Z"
    assert "expires_at" not in stack.json_api("POST", "/admin/v1/keys", "alice", {"label": "ci"}).json()["key"]

    # Path variables and maps are fields too; an unknown one in an override is refused the same way.
    put = stack.json_api("PUT", "/admin/v1/overrides/github", "alice", {"values": {"API_KEY": "v-0123456789"},
                                                                         "expiry": "2030-01-01T00:00:00Z"})
    assert put.status_code == 400 and "Unknown field in the request body: expiry." in put.json()["message"]


# 2 -- bad values over gRPC ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "request_"),
    [
        ("CreateKey", admin_pb2.CreateKeyRequest(label="x", expires_at={"seconds": -10**12})),
        ("CreateKey", admin_pb2.CreateKeyRequest(label="x", expires_at={"seconds": 2**62})),
        ("CreateKey", admin_pb2.CreateKeyRequest(label="x", expires_at={"seconds": 1_900_000_000, "nanos": -1})),
        ("QueryAudit", admin_pb2.QueryAuditRequest(since={"seconds": -10**12})),
        ("QueryAudit", admin_pb2.QueryAuditRequest(until={"seconds": 2**62})),
        ("QueryUsage", admin_pb2.QueryUsageRequest(since={"seconds": 0, "nanos": -5})),
        ("SetOverride", admin_pb2.SetOverrideRequest(server="github", values={"API_KEY": "v"},
                                                     expires_at={"seconds": 2**40})),
    ],
)  # fmt: skip
def test_a_time_out_of_range_is_invalid_argument(stack: Stack, method: str, request_: Any) -> None:
    with grpc.insecure_channel(stack.sidecar.admin_target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            getattr(stack.stub(channel), method)(request_, metadata=stack.metadata("root"), timeout=10)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("The time in ")
    assert "from 1970-01-01 to 9999-12-31" in refused.value.details()


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/admin/v1/audit?since=0001-01-01T00:00:00Z", None),
     ("GET", "/admin/v1/usage?until=1969-12-31T23:59:59Z", None),
     ("POST", "/admin/v1/keys", {"label": "x", "expires_at": "1900-01-01T00:00:00Z"})],
)  # fmt: skip
def test_a_time_out_of_range_through_envoy_is_a_400(stack: Stack, method: str, path: str, body: Any) -> None:
    answer = stack.json_api(method, path, "root", body)
    assert answer.status_code == 400, answer.text
    assert "out of range: give a time from 1970-01-01 to 9999-12-31" in answer.json()["message"]


@pytest.mark.parametrize("junk", [b"\x0a\x05ab", b"\x0a\x02\xff\xfe", b"\xff" * 10 + b"\x01", b"\x1a"])
@pytest.mark.parametrize("method", ["AddPrincipal", "QueryAudit", "ExportAudit"])
def test_bytes_that_are_not_the_request_are_invalid_argument(stack: Stack, method: str, junk: bytes) -> None:
    path = f"/mcp_authz.admin.v1.Admin/{method}"
    with grpc.insecure_channel(stack.sidecar.admin_target) as channel:
        identity = {"request_serializer": None, "response_deserializer": None}
        call = (channel.unary_stream if method == "ExportAudit" else channel.unary_unary)(path, **identity)
        with pytest.raises(grpc.RpcError) as refused:
            answer = call(junk, metadata=stack.metadata("root"), timeout=10)
            if method == "ExportAudit":
                list(answer)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("The request could not be read as its protobuf message")


def _extremes(fd: Any) -> list[Any]:
    """Values at and past every bound, for one request field."""
    kind = wire.kind_of(fd)
    if kind == "time":
        return [(-1, 0), (2**62, 0), (0, -1), (253_402_300_799, 999_999_999)]
    if kind == "map":
        return [{"": ""}, {"K" * 5000: "v"}, {"API_KEY": "\x00"}, {str(i): "v" for i in range(300)}, {"API_KEY": "x" * 100_000}]
    if kind == "list":
        return [[""], ["x" * 5000], ["a"] * 1000, ["\x00"], ["github:" + "t" * 300]]
    if fd.type == fd.TYPE_STRING:
        return ["", "\x00", "x" * 100_000, "mgw_abc", "../..", "é" * 70, "-", "*", "a/b", "github:"]
    if fd.type == fd.TYPE_BOOL:
        return [True]
    return [-1, 2**31 - 1, -(2**31)]


def _request(rpc: Rpc, fd: Any, value: Any) -> Any:
    msg = rpc.request()
    kind = wire.kind_of(fd)
    if kind == "time":
        getattr(msg, fd.name).seconds, getattr(msg, fd.name).nanos = value
    elif kind == "map":
        getattr(msg, fd.name).update(value)
    elif kind == "list":
        getattr(msg, fd.name).extend(value)
    else:
        setattr(msg, fd.name, value)
    return msg


def test_no_admin_value_is_an_internal_error(stack: Stack) -> None:
    """Every field of every method, alone at and past its bounds: refused with a 4xx status (or
    done), never INTERNAL. Runs on this module's world: it may add, change or remove things."""
    internal = []
    with grpc.insecure_channel(stack.sidecar.admin_target) as channel:
        for rpc in RPCS:
            streams = isinstance(rpc.reply, Stream)
            call = (channel.unary_stream if streams else channel.unary_unary)(
                f"/{SERVICE_NAME}/{rpc.name}", request_serializer=rpc.request.SerializeToString,
                response_deserializer=bytes)  # fmt: skip
            for fd in rpc.request.DESCRIPTOR.fields:
                for value in _extremes(fd):
                    try:
                        answer = call(_request(rpc, fd, value), metadata=stack.metadata("root"), timeout=20)
                        if streams:
                            list(answer)
                    except grpc.RpcError as refused:
                        if refused.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                            internal.append((rpc.name, fd.name, repr(value)[:40], refused.details()))
    assert internal == []


def test_no_bad_input_left_a_traceback(stack: Stack) -> None:
    # Run after the tests above (pytest keeps file order): none of their calls was an internal error.
    logs = stack.sidecar.logs()
    assert "Traceback" not in logs and "admin call failed" not in logs
    assert "Exception deserializing request" not in logs


# 3 -- a refused 1 MiB name and the audit views -----------------------------------------------------


CUT_TARGET = f"principal:{'n' * (FIELD_MAX - len('principal:'))}{TRUNCATED}"  # the huge name's, bounded


def _refused_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["action"] == "principals.add" and e["target"] == CUT_TARGET]


def test_a_refused_huge_name_leaves_a_small_event_and_every_audit_view_works(stack: Stack) -> None:
    with grpc.insecure_channel(stack.sidecar.admin_target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            stack.stub(channel).AddPrincipal(admin_pb2.AddPrincipalRequest(name=HUGE), metadata=stack.metadata("root"),
                                             timeout=30)  # fmt: skip
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    through_envoy = stack.json_api("POST", "/admin/v1/principals", "root", {"name": HUGE})
    assert through_envoy.status_code == 400 and len(through_envoy.content) < 1000

    # Every view of the trail, filtered by the event's bounded target (the filter finds it) and
    # unfiltered (the whole trail still reads, each event small).
    where = urlencode({"target": CUT_TARGET})
    deadline = time.monotonic() + 5
    while True:
        listed = stack.json_api("GET", f"/admin/v1/audit?{where}", "root")
        assert listed.status_code == 200, listed.text[:300]
        events = _refused_events(listed.json()["events"])
        if len(events) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert len(events) == 2 and len(listed.content) < 5_000
    assert all(e["outcome"] == "error" and dict(e["details"])["reason"] == "invalid_input" for e in events)
    whole = stack.json_api("GET", "/admin/v1/audit?limit=10000", "root")
    assert whole.status_code == 200 and max(len(json.dumps(e)) for e in whole.json()["events"]) < 2_000

    # The export stream through Envoy: JSON lines to the end.
    for query in (f"?{where}", ""):
        exported = stack.json_api("GET", f"/admin/v1/audit:export{query}", "root")
        assert exported.status_code == 200
        lines = [json.loads(line) for line in exported.text.splitlines() if line.strip()]
        assert len(_refused_events([line.get("result", line) for line in lines])) == 2
        assert max(len(line) for line in exported.text.splitlines()) < 2_000

    # The export over gRPC, as the remote CLI reads it.
    async def export() -> list[Any]:
        async with RemoteAdmin(stack.sidecar.admin_target, Secret(stack.world.keys["root"])) as admin:
            return [row async for page in await admin.export_audit(ANY) for row in page]

    assert sum(1 for r in asyncio.run(export()) if r.target == CUT_TARGET) == 2

    # `mcp-authz audit`: local (the store) and remote (the sidecar), as a table and as JSON.
    for run in (stack.world.cli, partial(stack.remote_cli, "root")):
        table = run("audit", "--target", CUT_TARGET)
        assert table.returncode == 0, table.stderr[-500:]
        assert len(table.stdout) < 2_000 and table.stdout.count("principals.add") == 2
        as_json = run("audit", "--json", "--target", CUT_TARGET)
        assert as_json.returncode == 0 and len(as_json.stdout) < 5_000
        assert len(_refused_events(json.loads(as_json.stdout)["events"])) == 2
        everything = run("audit", "--json", "--limit", "10000")
        assert everything.returncode == 0 and everything.stdout.count("principals.add") > 2


# 4 -- file modes ----------------------------------------------------------------------------------------


def test_the_store_files_are_0600_after_the_sidecar_wrote(tmp_path: Path) -> None:
    world = asyncio.run(seed(tmp_path / "world"))
    db = Path(world.store_url.removeprefix("sqlite:///"))
    files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
    for f in files:
        if f.exists():
            f.chmod(0o644)  # as an older version left them
    with run_sidecar(world) as sidecar:
        before = sidecar.logs()

        async def whoami() -> None:
            async with RemoteAdmin(sidecar.admin_target, Secret(world.keys["alice"])) as me:
                await me.whoami(ANY)

        asyncio.run(whoami())  # audited: the sidecar itself writes the event to the store
        deadline = time.monotonic() + 5
        while not _audited(db, "whoami") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _audited(db, "whoami"), sidecar.logs()[len(before):]
        # Nothing but the sidecar has opened the store since the files were made 0644.
        modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files if f.exists()}
    assert modes == {db.name: 0o600, f"{db.name}-wal": 0o600, f"{db.name}-shm": 0o600}


def _audited(db: Path, action: str) -> bool:
    """Whether an event of `action` is stored, read without opening the store (which tightens modes)."""
    with closing(sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)) as conn:
        (count,) = conn.execute("SELECT count(*) FROM audit_events WHERE action = ?", (action,)).fetchone()
    return bool(count)
