"""`make run`: the whole gateway on this machine, with a demo MCP server, user and key.

First run: creates .run/ with a SQLite store, a 0600 master key, a `demo` MCP server
(shared mode, `Authorization: Bearer {{API_KEY}}`), and a `demo` user. Every run: issues
a fresh demo key (revoking the previous run's), starts the example MCP server, the
sidecar and Envoy, and prints the gateway URL, the key (once) and a command to call a tool.
Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from authz_server.admin.service import Actor, AdminService  # noqa: E402
from authz_server.crypto.cipher import Keyring, read_key_file, write_key_file  # noqa: E402
from authz_server.crypto.keys import KeyHasher  # noqa: E402
from authz_server.models import AuthMode, Role  # noqa: E402
from authz_server.store import open_store  # noqa: E402

DATA = REPO / ".run"
DB = DATA / "mcp-authz.db"
KEY_FILE = DATA / "mcp-authz.key"  # beside the database, where the CLI looks by default
SIGNING_FILE = DATA / "demo-signing.secret"
STORE_URL = f"sqlite:///{DB}"
GATEWAY = "http://127.0.0.1:10000/mcp/demo"
PORTS = {10000: "Envoy listener", 9901: "Envoy admin", 9001: "sidecar Check listener", 9002: "sidecar admin listener",
         9090: "sidecar metrics", 9100: "example MCP server"}
DEMO_LABEL = "make-run"


async def prepare() -> str:
    """Create the demo world on first use; return a fresh demo key."""
    DATA.mkdir(mode=0o700, exist_ok=True)
    first = not KEY_FILE.exists()
    if first:
        write_key_file(KEY_FILE, Keyring.generate_spec())
    keyring = Keyring.from_spec(read_key_file(KEY_FILE))
    store = await open_store(STORE_URL)
    try:
        admin = AdminService(store, keyring, KeyHasher())
        op = Actor.operator()
        if first:
            _, _, admin_key = await admin.initialize(op)
            print(f"Admin key for this demo store (shown once): {admin_key.reveal()}\n")
            _, signing = await admin.add_server(
                op, "demo", AuthMode.SHARED, headers=("Authorization: Bearer {{API_KEY}}",),
                description="The example MCP server (examples/mcp_server.py)",
            )
            fd = os.open(SIGNING_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(signing.reveal())
            await admin.set_shared(op, "demo", {"API_KEY": "demo-shared-upstream-token"})
            await admin.add_principal(op, "demo", "demo", (Role.USER,))
        await admin.verify_master_key()
        for old in await admin.list_keys(op, "demo"):
            if old.label == DEMO_LABEL and old.status == "active":
                await admin.revoke_key(op, old.key_id)
        _, key = await admin.create_key(op, "demo", label=DEMO_LABEL)
        return key.reveal()
    finally:
        await store.close()


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise SystemExit(f"A component exited during start-up (exit {p.returncode}); see the output above.")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"Not ready after {timeout:.0f}s: {url}")


def _stop_like_ctrl_c(*_: object) -> None:
    """SIGTERM (kill, a supervisor) stops the children as Ctrl-C does."""
    raise KeyboardInterrupt


def main() -> int:
    busy = [f"{port} ({what})" for port, what in PORTS.items() if _busy(port)]
    if busy:
        print(f"error: ports in use: {', '.join(busy)}. Stop whatever uses them and retry.", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    key = asyncio.run(prepare())
    env = {**os.environ, "MCP_AUTHZ_STORE": STORE_URL, "MCP_AUTHZ_MASTER_KEY_FILE": str(KEY_FILE)}
    env.pop("MCP_AUTHZ_MASTER_KEY", None)
    bin_dir = Path(sys.executable).parent
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "examples" / "mcp_server.py"), "--port", "9100",
             "--signing-secret-file", str(SIGNING_FILE)],
            cwd=REPO,
        ),
        subprocess.Popen([str(bin_dir / "mcp-authz"), "run", "--envoy-config", str(REPO / "envoy" / "envoy.yaml")],
                         cwd=REPO, env=env),
    ]
    try:
        _wait_ready("http://127.0.0.1:9901/ready", procs)
        print(
            f"""
mcp-authz is running: Envoy -> sidecar -> example MCP server.

  Gateway URL:             {GATEWAY}
  Demo key (shown once):   {key}

Call a tool through the gateway:
  MCP_AUTHZ_KEY={key} {bin_dir / 'python'} examples/call_tool.py {GATEWAY} echo_headers

Metrics and health:  http://127.0.0.1:9090/metrics  /healthz  /readyz
Admin API:           JSON at http://127.0.0.1:10000/admin/v1/whoami (through Envoy),
                     gRPC at 127.0.0.1:9002 (mcp-authz --server 127.0.0.1:9002, your key in MCP_AUTHZ_KEY)

Manage it from another terminal:
  export MCP_AUTHZ_STORE={STORE_URL}
  {bin_dir / 'mcp-authz'} keys list

Ctrl-C stops everything.
""",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    sys.exit(main())
