"""Start-up refusals: `mcp-authz serve` (and `run`) that cannot start exits 2, promptly, with one line.

Each case starts the real command as a subprocess with one thing wrong and checks that it
- exits with status 2 (the CLI's status for a configuration it cannot run with),
- writes exactly one line to stderr, `error: …` naming the problem (no traceback, no log lines)
  and nothing to stdout,
- exits within MAX_SECONDS (a hang is killed after HANG_SECONDS and fails the test),
- leaves nothing behind: the files in its directories (contents included) are the same before
  and after (no empty database, no -wal/-shm), and on PostgreSQL the list of schemas and the
  tables in the named schema are the same.

The measured times are printed (`pytest -s` shows them). PostgreSQL cases use the server at
127.0.0.1:5432 (database `test`) and are skipped, with the reason, when it does not answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from authz_server import app
from authz_server.config import Settings
from authz_server.crypto.cipher import ENV_KEY_FILE, Keyring, load_keyring, write_key_file
from authz_server.errors import ConfigError

from ..postgres import reachable_url
from .harness import LOOPBACK, REPO_ROOT, SHIPPED_ENVOY_YAML, free_port
from .sidecar import BIN, CLI, World, seed

MAX_SECONDS = 5.0  # generous for a loaded CI machine; measured times are well under 2 s
HANG_SECONDS = 15.0  # past this the process is killed and the test fails: it hangs


@dataclass
class Refusal:
    code: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def line(self) -> str:
        """The one line on stderr (the test fails unless there is exactly one)."""
        lines = self.stderr.splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{self.stderr}"
        return lines[0]


def snapshot(*directories: Path) -> dict[str, str]:
    """Every file under `directories`, with a digest of its contents."""
    files = {}
    for directory in directories:
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif not path.is_dir():
                files[str(path)] = "(not a file)"
    return files


def base_env(store_url: str, key_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MCP_AUTHZ_")}
    env.update({"MCP_AUTHZ_STORE": store_url, ENV_KEY_FILE: str(key_file),
                "MCP_AUTHZ_METRICS_LISTEN": f"{LOOPBACK}:{free_port()}",
                "MCP_AUTHZ_CONSOLE_LISTEN": f"{LOOPBACK}:{free_port()}"})  # fmt: skip
    return env


def start(args: Sequence[str], env: dict[str, str], cwd: Path, command: str = "serve") -> Refusal:
    """Run `mcp-authz COMMAND` on free local ports (unless `args` name others) and wait for it to exit."""
    argv = [CLI, command, "--listen", f"{LOOPBACK}:{free_port()}", "--admin-listen", f"{LOOPBACK}:{free_port()}",
            *args]  # fmt: skip
    began = time.monotonic()
    try:
        done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=HANG_SECONDS,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        pytest.fail(f"'mcp-authz {command}' did not exit within {HANG_SECONDS:.0f}s; stderr:\n{err}")
    refusal = Refusal(done.returncode, done.stdout, done.stderr, time.monotonic() - began)
    print(f"\n  refused in {refusal.seconds:.2f}s (exit {refusal.code}): {done.stderr.strip()}")
    return refusal


def assert_refused(refusal: Refusal, *says: str) -> None:
    assert refusal.code == 2, f"exit {refusal.code}; stderr:\n{refusal.stderr}"
    line = refusal.line
    assert line.startswith("error: "), line
    for text in says:
        assert text in line, line
    assert "Traceback" not in refusal.stderr and refusal.stdout == ""
    assert refusal.seconds < MAX_SECONDS, f"took {refusal.seconds:.2f}s to exit"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """An initialised SQLite store and its master key, shared by the cases that must not change it."""
    return asyncio.run(seed(tmp_path_factory.mktemp("refusals") / "world"))


@pytest.fixture
def other_key(tmp_path: Path) -> Path:
    """A well-formed master key that is not the store's."""
    path = tmp_path / "keys" / "other.key"
    path.parent.mkdir()
    write_key_file(path, Keyring.generate_spec())
    return path


@pytest.fixture
def held_port() -> Iterator[int]:
    """A local TCP port something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        sock.listen()
        yield int(sock.getsockname()[1])


# --- SQLite --------------------------------------------------------------------------------------


def test_wrong_master_key(world: World, other_key: Path, tmp_path: Path) -> None:
    before = snapshot(world.dir, tmp_path)
    refusal = start([], base_env(world.store_url, other_key), world.dir)
    assert_refused(refusal, "master key", "does not match this store")
    assert snapshot(world.dir, tmp_path) == before


def test_missing_sqlite_file_is_not_created(world: World, tmp_path: Path) -> None:
    db = tmp_path / "authz.db"
    before = snapshot(tmp_path, world.dir)
    refusal = start([], base_env(f"sqlite:///{db}", world.key_file), tmp_path)
    assert_refused(refusal, f"No store at {db}", "mcp-authz init")
    assert snapshot(tmp_path, world.dir) == before
    assert not db.exists()


def test_uninitialised_sqlite_file_is_left_as_it_was(world: World, tmp_path: Path) -> None:
    db = tmp_path / "authz.db"
    db.touch()  # an empty file is an empty SQLite database
    before = snapshot(tmp_path)
    refusal = start([], base_env(f"sqlite:///{db}", world.key_file), tmp_path)
    assert_refused(refusal, "not initialised", "mcp-authz init")
    assert snapshot(tmp_path) == before and db.stat().st_size == 0


def test_sqlite_file_that_is_not_a_database(world: World, tmp_path: Path) -> None:
    db = tmp_path / "authz.db"
    db.write_text("not a database, but someone's notes\n" * 200)
    before = snapshot(tmp_path)
    refusal = start([], base_env(f"sqlite:///{db}", world.key_file), tmp_path)
    assert_refused(refusal, str(db))
    assert snapshot(tmp_path) == before


def test_run_refuses_the_same_way(world: World, other_key: Path, tmp_path: Path) -> None:
    if not (shutil.which("envoy", path=str(BIN)) or shutil.which("envoy")):
        pytest.skip("no envoy binary: 'run' would refuse for that first")
    before = snapshot(world.dir, tmp_path)
    refusal = start(["--envoy-config", str(SHIPPED_ENVOY_YAML)], base_env(world.store_url, other_key), REPO_ROOT,
                    command="run")  # fmt: skip
    assert_refused(refusal, "master key", "does not match this store")
    assert snapshot(world.dir, tmp_path) == before


# --- addresses and TLS files ----------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--listen", "--admin-listen", "--metrics-listen", "--console-listen"])
def test_address_in_use(world: World, held_port: int, flag: str) -> None:
    before = snapshot(world.dir)
    refusal = start([flag, f"{LOOPBACK}:{held_port}"], base_env(world.store_url, world.key_file), world.dir)
    assert_refused(refusal, f"Cannot listen on {LOOPBACK}:{held_port}")
    assert snapshot(world.dir) == before


def test_unix_socket_in_a_missing_directory(world: World, tmp_path: Path) -> None:
    before = snapshot(world.dir, tmp_path)
    address = f"unix:{tmp_path / 'missing' / 'check.sock'}"
    refusal = start(["--listen", address], base_env(world.store_url, world.key_file), world.dir)
    assert_refused(refusal, f"Cannot listen on {address}", "directory does not exist")
    assert snapshot(world.dir, tmp_path) == before


def test_unreadable_tls_file(world: World, tmp_path: Path) -> None:
    before = snapshot(world.dir)
    missing = tmp_path / "admin.crt"
    refusal = start(["--admin-tls-cert", str(missing), "--admin-tls-key", str(tmp_path / "admin.key")],
                    base_env(world.store_url, world.key_file), world.dir)  # fmt: skip
    assert_refused(refusal, "Cannot read the admin listener certificate", str(missing))
    assert snapshot(world.dir) == before


@pytest.mark.parametrize("held", ["listen", "admin_listen", "metrics_listen", "console_listen"])
async def test_a_bind_that_fails_later_is_undone(world: World, held_port: int, held: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """In process, with the early address check bypassed, so gRPC's (or the HTTP server's) own bind
    refuses: serve raises at once, having closed the store, stopped the servers and left no thread."""
    monkeypatch.setattr(app, "_check_address_free", lambda address: None)
    addresses = {"listen": f"{LOOPBACK}:{free_port()}", "admin_listen": f"{LOOPBACK}:{free_port()}",
                 "metrics_listen": f"{LOOPBACK}:{free_port()}", "console_listen": f"{LOOPBACK}:{free_port()}",
                 held: f"{LOOPBACK}:{held_port}"}  # fmt: skip
    settings = Settings.from_env({}, store_url=world.store_url, **addresses)
    keyring = load_keyring({ENV_KEY_FILE: str(world.key_file)})
    threads, files = set(threading.enumerate()), snapshot(world.dir)
    began = time.monotonic()
    try:
        await asyncio.wait_for(app.serve(settings, keyring, stop=asyncio.Event()), HANG_SECONDS)
    except ConfigError as exc:
        assert f"Cannot listen on {LOOPBACK}:{held_port}" in exc.message
    else:
        pytest.fail("serve started on an address in use")
    assert time.monotonic() - began < MAX_SECONDS
    # The store's worker thread and the gRPC servers' pools are not daemons: left open, they hang the exit.
    deadline = time.monotonic() + MAX_SECONDS
    while left := [t for t in threading.enumerate() if t not in threads and not t.daemon]:
        assert time.monotonic() < deadline, f"threads left running: {[t.name for t in left]}"
        await asyncio.sleep(0.05)
    assert snapshot(world.dir) == files  # the store was closed: no -wal or -shm left
    for name, address in addresses.items():  # every port it had bound is let go
        if name != held:
            with socket.socket() as again:
                again.bind((LOOPBACK, int(address.rpartition(":")[2])))


# --- PostgreSQL --------------------------------------------------------------------------------------


def test_postgres_that_does_not_answer(world: World, tmp_path: Path) -> None:
    closed = free_port()  # nothing listens there
    refusal = start([], base_env(f"postgresql://{LOOPBACK}:{closed}/test", world.key_file), tmp_path)
    assert_refused(refusal, f"Cannot connect to PostgreSQL at {LOOPBACK}:{closed}/test")
    assert snapshot(tmp_path) == {}


@pytest.fixture(scope="module")
def pg_base() -> str:
    """A PostgreSQL URL that answers, or a skip naming why none did."""
    return reachable_url("its start-up refusals")


async def _pg_state(base: str, schema: str) -> tuple[list[str], list[str]]:
    """The names of this module's schemas (other tests may create theirs meanwhile), and the tables in `schema`."""
    conn = await asyncpg.connect(base, timeout=5)
    try:
        schemas = [r["nspname"] for r in await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, 't_refuse_') ORDER BY nspname")]
        tables = [r["table_name"] for r in await conn.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY table_name", schema)]
    finally:
        await conn.close()
    return schemas, tables


async def _pg_execute(base: str, sql: str) -> None:
    conn = await asyncpg.connect(base, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def schema(pg_base: str) -> AsyncIterator[str]:
    """A schema name of this test's own (not created), dropped afterwards whatever happened."""
    name = f"t_refuse_{uuid.uuid4().hex[:16]}"
    yield name
    await _pg_execute(pg_base, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.mark.postgres
async def test_missing_postgres_schema_is_not_created(pg_base: str, schema: str, world: World,
                                                      tmp_path: Path) -> None:  # fmt: skip
    before = await _pg_state(pg_base, schema)
    refusal = start([], base_env(f"{pg_base}?schema={schema}", world.key_file), tmp_path)
    assert_refused(refusal, f"schema {schema!r}", "does not exist", "mcp-authz init")
    assert await _pg_state(pg_base, schema) == before and schema not in before[0]
    assert snapshot(tmp_path) == {}


@pytest.mark.postgres
async def test_empty_postgres_schema_is_left_empty(pg_base: str, schema: str, world: World, tmp_path: Path) -> None:
    await _pg_execute(pg_base, f'CREATE SCHEMA "{schema}"')
    before = await _pg_state(pg_base, schema)
    refusal = start([], base_env(f"{pg_base}?schema={schema}", world.key_file), tmp_path)
    assert_refused(refusal, "not initialised", "mcp-authz init")
    assert await _pg_state(pg_base, schema) == before and before[1] == []


@pytest.mark.postgres
async def test_wrong_master_key_on_postgres(pg_base: str, schema: str, other_key: Path, tmp_path: Path) -> None:
    seeded = await seed(tmp_path / "world", f"{pg_base}?schema={schema}")
    before = await _pg_state(pg_base, schema)
    refusal = start([], base_env(seeded.store_url, other_key), tmp_path)
    assert_refused(refusal, "master key", "does not match this store")
    assert await _pg_state(pg_base, schema) == before


def manage(args: Sequence[str], env: dict[str, str], cwd: Path) -> Refusal:
    """Run a management command (`mcp-authz ARGS`) on the local store and wait for it to exit."""
    began = time.monotonic()
    done = subprocess.run([CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=HANG_SECONDS,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    return Refusal(done.returncode, done.stdout, done.stderr, time.monotonic() - began)


MANAGEMENT = (("principals", "list"), ("keys", "list", "--principal", "alice"), ("audit",), ("servers", "list"))


@pytest.mark.postgres
@pytest.mark.parametrize("args", MANAGEMENT, ids=lambda a: " ".join(a))
async def test_a_management_command_creates_no_postgres_schema(
    args: tuple[str, ...], pg_base: str, schema: str, world: World, tmp_path: Path
) -> None:
    """Only `init` creates a store: any other command on a missing schema refuses and changes nothing."""
    refusal = manage(args, base_env(f"{pg_base}?schema={schema}", world.key_file), tmp_path)
    assert_refused(refusal, f"schema {schema!r}", "does not exist", "mcp-authz init")
    assert schema not in (await _pg_state(pg_base, schema))[0]
    await _pg_execute(pg_base, f'CREATE SCHEMA "{schema}"')  # there, but empty: still not initialised here
    refusal = manage(args, base_env(f"{pg_base}?schema={schema}", world.key_file), tmp_path)
    assert_refused(refusal, "not initialised", "mcp-authz init")
    assert (await _pg_state(pg_base, schema))[1] == []
