"""`make run`: the whole gateway on this machine, with a demo MCP server, user and key.

    python examples/run_demo.py [--port 10000] [--free-ports] [--data-dir .run]
    python examples/run_demo.py --setup-only --data-dir /data [--store URL] [--upstream-url URL]

First run: creates the data directory (.run/) with a SQLite store, a 0600 master key, an
admin key in admin.key (0600), a `demo` MCP server (shared mode, `Authorization: Bearer
{{API_KEY}}`, its upstream URL set for `overrides test`) and a `demo` user. Every run: points
`demo` at the example server's port, issues a fresh demo key (revoking the previous run's),
starts the example MCP server, the sidecar and Envoy (through `mcp-authz run`), and prints the
gateway URL, the key (once), its key id and a command to call a tool. Ctrl-C stops everything.

`--setup-only` creates or updates the demo world and exits, issuing no demo key:
docker-compose.yml's `init` runs it. Ports: `--port` (or MCP_AUTHZ_RUN_PORT) moves the
gateway; `--free-ports` (or MCP_AUTHZ_RUN_FREE_PORTS=1) picks free ports for everything else
instead of 9901, 9001, 9002, 9090 and 9100, so two demos can run on one host.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from authz_server.admin.service import Actor, AdminService  # noqa: E402
from authz_server.crypto.cipher import Keyring, read_key_file, write_key_file  # noqa: E402
from authz_server.crypto.keys import KeyHasher  # noqa: E402
from authz_server.envoy import bootstrap  # noqa: E402
from authz_server.errors import AuthzError, NotFound  # noqa: E402
from authz_server.models import AuthMode, Role  # noqa: E402
from authz_server.store import open_store  # noqa: E402

LOOPBACK = "127.0.0.1"
SERVER, USER, ADMIN = "demo", "demo", "admin"  # `initialize` names the first admin `admin`
DEMO_LABEL, ADMIN_LABEL = "make-run", "make-run-admin"
SHARED_TOKEN = "demo-shared-upstream-token"  # the demo server's shared upstream credential
UPSTREAM_CLUSTER = "mcp_example"  # envoy/envoy.yaml's cluster for the example server
DEFAULT_PORT = 10000
FIXED = {"envoy_admin": 9901, "check": 9001, "admin": 9002, "console": 9003, "metrics": 9090, "example": 9100}
WHAT = {"gateway": "Envoy listener", "envoy_admin": "Envoy admin", "check": "sidecar Check listener",
        "admin": "sidecar admin listener", "console": "sidecar console listener", "metrics": "sidecar metrics", "example": "example MCP server"}  # fmt: skip


@dataclass(frozen=True)
class Files:
    """Where the demo keeps its state: the CLI finds the master key beside the SQLite file."""

    data: Path
    store_url: str

    @classmethod
    def at(cls, data: Path, store_url: str | None = None) -> Files:
        return cls(data, store_url or f"sqlite:///{data / 'mcp-authz.db'}")

    @property
    def master_key(self) -> Path:
        return self.data / "mcp-authz.key"

    @property
    def admin_key(self) -> Path:
        return self.data / "admin.key"

    @property
    def envoy_config(self) -> Path:
        return self.data / "envoy.yaml"


def _write_secret(path: Path, text: str) -> None:
    """A fresh 0600 file (replacing any before it), never readable by others in between."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


async def prepare(files: Files, upstream_url: str, signing_file: Path, *, issue_demo_key: bool) -> tuple[str, str] | None:
    """Create the demo world on first use, point `demo` at `upstream_url`, make sure an admin key
    file exists; return a fresh demo key and its key id when asked."""
    files.data.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not files.master_key.exists():
        write_key_file(files.master_key, Keyring.generate_spec())
    keyring = Keyring.from_spec(read_key_file(files.master_key))
    store = await open_store(files.store_url)
    try:
        admin = AdminService(store, keyring, KeyHasher())
        op = Actor.operator()
        if not await store.get_key_checks():
            _, view, admin_key = await admin.initialize(op)
            _write_secret(files.admin_key, admin_key.reveal())
            print(f"Created the demo store: admin key {view.key_id} written to {files.admin_key} (mode 0600).")
            _, signing = await admin.add_server(
                op, SERVER, AuthMode.SHARED, headers=("Authorization: Bearer {{API_KEY}}",),
                description="The example MCP server (examples/mcp_server.py)", upstream_url=upstream_url,
            )  # fmt: skip
            _write_secret(signing_file, signing.reveal())
            await admin.set_shared(op, SERVER, {"API_KEY": SHARED_TOKEN})
            await admin.add_principal(op, USER, "demo", (Role.USER,))
        await admin.verify_master_key()
        try:
            server = await admin.show_server(op, SERVER)
        except NotFound:
            raise NotFound(f"This store has no server {SERVER!r}: it was not made by the demo. Use another "
                           "--data-dir (or --store).") from None  # fmt: skip
        if server.upstream_url != upstream_url:
            await admin.update_server(op, SERVER, upstream_url=upstream_url)  # the example moved (or an older demo)
        if not files.admin_key.exists():
            try:
                view, admin_key = await admin.create_key(op, ADMIN, label=ADMIN_LABEL)
            except NotFound:
                print(f"note: no principal {ADMIN!r} in this store, so no admin key file.", file=sys.stderr)
            else:
                _write_secret(files.admin_key, admin_key.reveal())
                print(f"Admin key {view.key_id} written to {files.admin_key} (mode 0600).")
        if not issue_demo_key:
            return None
        for old in await admin.list_keys(op, USER):
            if old.label == DEMO_LABEL and old.status == "active":
                await admin.revoke_key(op, old.key_id)
        view, key = await admin.create_key(op, USER, label=DEMO_LABEL)
        return key.reveal(), view.key_id
    finally:
        await store.close()


def _busy(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


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


def render_envoy_config(out: Path, ports: dict[str, int]) -> None:
    """The shipped envoy/envoy.yaml on these ports (`mcp-authz run` aims it at its sidecar)."""
    config = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text(encoding="utf-8"))
    bootstrap.set_listeners(config, port=ports["gateway"])
    bootstrap.set_admin(config, ports["envoy_admin"])
    bootstrap.point_cluster(config, UPSTREAM_CLUSTER, f"{LOOPBACK}:{ports['example']}")
    out.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def _prepared(files: Files, upstream_url: str, signing_file: Path, *, issue_demo_key: bool) -> tuple[str, str] | None:
    """`prepare`; a store or key the demo cannot use is a one-line error (exit 1), not a traceback."""
    try:
        return asyncio.run(prepare(files, upstream_url, signing_file, issue_demo_key=issue_demo_key))
    except AuthzError as exc:
        raise SystemExit(f"error: {exc.message}") from None


def _parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(prog="examples/run_demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=int(env.get("MCP_AUTHZ_RUN_PORT") or DEFAULT_PORT),
                   help=f"the gateway's port (MCP_AUTHZ_RUN_PORT; default {DEFAULT_PORT})")
    p.add_argument("--free-ports", action="store_true", default=env.get("MCP_AUTHZ_RUN_FREE_PORTS", "") not in ("", "0"),
                   help="free ports for everything but the gateway (MCP_AUTHZ_RUN_FREE_PORTS=1)")
    p.add_argument("--data-dir", type=Path, default=Path(env.get("MCP_AUTHZ_RUN_DIR") or REPO / ".run"),
                   help="the demo's store and keys (MCP_AUTHZ_RUN_DIR; default .run/ in the repository)")
    p.add_argument("--setup-only", action="store_true", help="create or update the demo world, issue no key, exit")
    p.add_argument("--store", help="with --setup-only: the store URL (default: SQLite in the data directory)")
    p.add_argument("--upstream-url", help="with --setup-only: the demo server's upstream URL")
    p.add_argument("--signing-secret-file", type=Path,
                   help="the demo server's signing secret (default: demo-signing.secret in the data directory)")
    return p  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    files = Files.at(args.data_dir.resolve(), args.store)
    signing_file = args.signing_secret_file or files.data / "demo-signing.secret"
    if args.setup_only:
        upstream = args.upstream_url or f"http://{LOOPBACK}:{FIXED['example']}/mcp/{SERVER}"
        _prepared(files, upstream, signing_file, issue_demo_key=False)
        print(f"The demo is ready: server {SERVER} (upstream {upstream}), user {USER}, admin key in {files.admin_key}.")
        return 0
    ports = {"gateway": args.port, **{name: _free_port() if args.free_ports else port for name, port in FIXED.items()}}
    busy = [f"{port} ({WHAT[name]})" for name, port in ports.items() if _busy(port)]
    if busy:
        print(f"error: ports in use: {', '.join(busy)}. Stop whatever uses them, or pass --port N or --free-ports.",
              file=sys.stderr)  # fmt: skip
        return 2
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    upstream = f"http://{LOOPBACK}:{ports['example']}/mcp/{SERVER}"
    key, key_id = _prepared(files, upstream, signing_file, issue_demo_key=True) or ("", "")
    render_envoy_config(files.envoy_config, ports)
    env = {**os.environ, "MCP_AUTHZ_STORE": files.store_url, "MCP_AUTHZ_MASTER_KEY_FILE": str(files.master_key)}
    env.pop("MCP_AUTHZ_MASTER_KEY", None)
    bin_dir = Path(sys.executable).parent
    listen = {name: f"{LOOPBACK}:{ports[name]}" for name in ("check", "admin", "console", "metrics")}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "examples" / "mcp_server.py"), "--port", str(ports["example"]),
             "--signing-secret-file", str(signing_file)],
            cwd=REPO,
        ),  # fmt: skip
        subprocess.Popen(
            [str(bin_dir / "mcp-authz"), "run", "--envoy-config", str(files.envoy_config), "--listen", listen["check"],
             "--admin-listen", listen["admin"], "--metrics-listen", listen["metrics"], "--console-listen", listen["console"]],
            cwd=REPO, env=env,
        ),  # fmt: skip
    ]
    gateway = f"http://{LOOPBACK}:{ports['gateway']}"
    try:
        _wait_ready(f"http://{LOOPBACK}:{ports['envoy_admin']}/ready", procs)
        print(
            f"""
mcp-authz is running: Envoy -> sidecar -> example MCP server.

  Gateway URL:             {gateway}/mcp/{SERVER}
  Demo key (shown once):   {key}
  Demo key id:             {key_id}   (user {USER}; a new key each run, the previous one revoked)
  Admin key:               in {files.admin_key} (mode 0600), for the README's $ADMIN_KEY

Call a tool through the gateway:
  MCP_AUTHZ_KEY={key} {bin_dir / 'python'} examples/call_tool.py {gateway}/mcp/{SERVER} echo_headers

Console (browser):   {gateway}/console/   (sign in with the demo key, or the admin key)
Metrics and health:  http://{listen['metrics']}/metrics  /healthz  /readyz
Admin API:           JSON at {gateway}/admin/v1/whoami (through Envoy),
                     gRPC at {listen['admin']} (mcp-authz --server {listen['admin']}, your key in MCP_AUTHZ_KEY)

Manage it from another terminal (the README's walkthrough):
  export MCP_AUTHZ_STORE={files.store_url}
  export ADMIN_KEY=$(cat {files.admin_key})
  alias mcp-authz={bin_dir / 'mcp-authz'}
  mcp-authz keys list

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
