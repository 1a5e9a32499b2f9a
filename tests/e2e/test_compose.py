"""docker-compose.yml run without Docker: every service's own command, environment and healthcheck,
started in dependency order as plain processes, then the newcomer's commands from the file's
header, as written. Each service sees only its own volumes (a directory each, at the paths the
file mounts), /app is a copy of what the image copies, and the file's fixed ports are moved to
free ones, in the commands and in the copied envoy.yaml alike. A path a command uses that its
service does not mount, a port that does not line up, or a flag a program lacks fails here."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from .harness import INITIALIZE_REQUEST, MCP_ACCEPT, REPO_ROOT, ManagedProcess, _spawn, free_port, wait_until

pytestmark = pytest.mark.e2e
COMPOSE = REPO_ROOT / "docker-compose.yml"
FIXED_PORTS = (10000, 9901, 9001, 9002, 9090, 9100)
IMAGE_DIRS = ("envoy", "examples")  # what the Dockerfile copies beside the installed package
VENV_BIN = Path(sys.executable).parent
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's `${VAR}` and `${VAR:-default}` (and `$$` for a literal `$`)."""
    text = _INTERPOLATION.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), text)
    return text.replace("$$", "$")


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return interpolate(node, env or {})
        if isinstance(node, list):
            return [walk(item) for item in node]
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        return node

    return walk(raw)  # type: ignore[no-any-return]


@dataclass
class Host:
    """One machine standing in for the Docker host: volumes, the image's /app, the port map."""

    root: Path
    compose: dict[str, Any]
    ports: dict[int, int] = field(default_factory=dict)
    app: Path = field(init=False)

    def __post_init__(self) -> None:
        self.ports = {port: free_port() for port in FIXED_PORTS}
        self.app = self.root / "app"
        for name in IMAGE_DIRS:
            shutil.copytree(REPO_ROOT / name, self.app / name, ignore=shutil.ignore_patterns("__pycache__"))
        envoy_yaml = self.app / "envoy" / "envoy.yaml"
        envoy_yaml.write_text(self.move_ports(envoy_yaml.read_text(encoding="utf-8")), encoding="utf-8")

    def move_ports(self, text: str) -> str:
        return re.sub(r"(?<!\d)(\d{4,5})(?!\d)", lambda m: str(self.ports.get(int(m.group(1)), m.group(1))), text)

    def mounts(self, service: str) -> dict[str, Path]:
        """The service's mounts (container path -> a host directory per named volume), and its own /tmp."""
        spec = self.compose["services"][service]
        out = {"/tmp": self.root / "tmp" / service}
        for volume in spec.get("volumes", []):
            name, target = volume.split(":")[:2]
            assert name in self.compose["volumes"], f"{service}: undeclared volume {name}"
            out[target] = self.root / "volumes" / name
        for path in out.values():
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return out

    def translate(self, service: str, text: str) -> str:
        """A command word as it runs here: mounted paths moved to their directories (in one pass), ports
        moved, and every interface (0.0.0.0) narrowed to the host's loopback."""
        mounts = self.mounts(service)
        pattern = "|".join(re.escape(target) for target in sorted(mounts, key=len, reverse=True))
        text = re.sub(rf"(?<![\w.-])({pattern})(?=/|$|\s|:|')", lambda m: str(mounts[m.group(1)]), text)
        return self.move_ports(text.replace("0.0.0.0", "127.0.0.1"))

    def argv(self, service: str, extra: list[str] | None = None) -> list[str]:
        spec = self.compose["services"][service]
        words = [*spec.get("entrypoint", []), *(extra if extra is not None else spec.get("command", []))]
        return [self.translate(service, word) for word in words]

    def env(self, service: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        own = {k: self.translate(service, str(v)) for k, v in self.compose["services"][service].get("environment", {}).items()}
        base = {k: v for k, v in os.environ.items() if not k.startswith("MCP_AUTHZ_")}
        return {**base, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "PYTHONPATH": str(REPO_ROOT), **own, **(extra or {})}

    def leftover_container_paths(self, service: str) -> list[str]:
        """Absolute paths in the service's command and environment that are neither mounted nor the image's."""
        spec = self.compose["services"][service]
        words = [*spec.get("entrypoint", []), *spec.get("command", []), *map(str, spec.get("environment", {}).values())]
        found = set()
        for word in words:
            for path in re.findall(r"(?<![\w.:-])(/[a-z][\w./-]*)", self.translate(service, word)):
                if not path.startswith(str(self.root)):
                    found.add(path)
        return sorted(found)

    def run(self, service: str, extra: list[str] | None = None, env: Mapping[str, str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return subprocess.run(self.argv(service, extra), cwd=self.app, env=self.env(service, env), input=stdin,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    def healthy(self, service: str) -> bool:
        test = self.compose["services"][service]["healthcheck"]["test"]
        assert test[0] == "CMD"
        argv = [self.translate(service, word) for word in test[1:]]
        done = subprocess.run(argv, cwd=self.app, env=self.env(service), capture_output=True, timeout=10)
        return done.returncode == 0


def start_order(compose: dict[str, Any], services: list[str]) -> list[str]:
    """Dependencies first (compose's depends_on), among the given services."""
    ordered: list[str] = []

    def visit(name: str) -> None:
        if name in ordered or name not in services:
            return
        for dependency in compose["services"][name].get("depends_on", {}):
            visit(dependency)
        ordered.append(name)

    for name in services:
        visit(name)
    return ordered


@contextmanager
def compose_up(host: Host, services: list[str]) -> Iterator[dict[str, ManagedProcess]]:
    """`docker compose up` of `services`: one-shot services run to exit 0 (service_completed_successfully),
    the others start and are waited for until their healthcheck passes."""
    running: dict[str, ManagedProcess] = {}
    with ExitStack() as stop:
        for name in start_order(host.compose, services):
            spec = host.compose["services"][name]
            assert not host.leftover_container_paths(name), f"{name} uses paths it does not mount"
            if "healthcheck" not in spec:  # a one-shot service
                done = host.run(name)
                assert done.returncode == 0, f"{name}: {done.stdout}\n{done.stderr}"
                (host.root / f"{name}.log").write_text(done.stdout + done.stderr)
                continue
            process = _spawn(name, host.argv(name), host.root, env=host.env(name), cwd=host.app)
            stop.callback(process.stop, 10)
            running[name] = process
            wait_until(lambda: host.healthy(name), timeout=60, what=f"{name} healthcheck", process=process)  # noqa: B023
        yield running


def header_commands() -> list[list[str]]:
    """The `docker compose …` lines at the top of docker-compose.yml: what a newcomer types."""
    lines = []
    for line in COMPOSE.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   docker compose "):
            lines.append(shlex.split(line[1:].split("   #")[0]))
    return lines


def test_the_default_stack_serves_a_tool_call_as_the_header_says(tmp_path: Path) -> None:
    _newcomer(tmp_path, {"MCP_GATEWAY_HOST": "gateway.test"})


def test_the_postgres_option_serves_the_same(tmp_path: Path) -> None:
    from tests.postgres import reachable_url

    base = reachable_url("docker-compose's PostgreSQL option")
    schema = f"compose_{uuid.uuid4().hex[:10]}"
    try:
        _newcomer(tmp_path, {"MCP_AUTHZ_STORE": f"{base}?schema={schema}"})
    finally:
        asyncio.run(_drop_schema(base, schema))


async def _drop_schema(url: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url, timeout=3)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def _newcomer(tmp_path: Path, env: dict[str, str]) -> Host:
    host = Host(tmp_path, load_compose(env))
    up, run_cli, call = header_commands()[:3]
    assert up[:3] == ["docker", "compose", "up"]
    default = [name for name, spec in host.compose["services"].items() if not spec.get("profiles")]
    assert set(default) == {"init", "envoy", "authz", "example"}
    with compose_up(host, default):
        init_log = (tmp_path / "init.log").read_text()
        assert "mgw_" not in init_log and "admin key" in init_log  # its key id and file, never the key
        admin_key = host.mounts("init")["/data"] / "admin.key"
        assert admin_key.stat().st_mode & 0o777 == 0o600

        # docker compose run --rm cli keys create demo --label me
        assert run_cli[:5] == ["docker", "compose", "run", "--rm", "cli"]
        created = host.run("cli", run_cli[5:])
        assert created.returncode == 0, created.stderr
        key = re.search(r"mgw_\S+", created.stdout)
        assert key

        # docker compose exec -e MCP_AUTHZ_KEY=mgw_… example python examples/call_tool.py URL echo_headers
        assert call[:5] == ["docker", "compose", "exec", "-e", "MCP_AUTHZ_KEY=mgw_…"] and call[5] == "example"
        argv = [host.translate("example", word) for word in call[6:]]
        done = subprocess.run(argv, cwd=host.app, env=host.env("example", {"MCP_AUTHZ_KEY": key.group(0)}),
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert '"x-user-id": "demo"' in done.stdout and "mgw_" not in done.stdout
        # `overrides test` against the demo's upstream URL (the example, beside the sidecar).
        shown = host.run("cli", ["servers", "show", "demo"])
        assert str(host.ports[9100]) in shown.stdout, shown.stdout

        # The example's DNS-rebinding protection: loopback names and MCP_GATEWAY_HOST pass, others get 421.
        url = f"http://127.0.0.1:{host.ports[10000]}/mcp/demo"
        named = {"gateway.test": 200, "localhost": 200, "elsewhere.test": 421} if env.get("MCP_GATEWAY_HOST") else {}
        for name, status in named.items():
            answer = httpx.post(url, json=INITIALIZE_REQUEST, timeout=10, headers={
                "host": f"{name}:10000", "authorization": f"Bearer {key.group(0)}", "accept": MCP_ACCEPT})  # fmt: skip
            assert answer.status_code == status, (name, answer.status_code, answer.text)
    return host


def _sidecar_on_loopback(text: str) -> str:
    """The mtls sidecar's host name (not its service name) as 127.0.0.1: no Docker DNS here."""
    return re.sub(r"(?<=[\s'\"])authz-mtls(?=:\d|\s|'|\")", "127.0.0.1", text)


def test_the_mtls_profile_serves_through_mutual_tls(tmp_path: Path) -> None:
    """Profile mtls: the sidecar's host name becomes 127.0.0.1 (the certificate is made for it)."""
    host = Host(tmp_path, load_compose({}))
    host.compose = yaml.safe_load(_sidecar_on_loopback(yaml.safe_dump(host.compose)))
    assert "authz-mtls" in host.compose["services"]  # the service keeps its name
    mtls = [name for name, spec in host.compose["services"].items() if "mtls" in spec.get("profiles", [])]
    # The mtls sidecar and Envoy bind the same loopback ports as the default stack's would: not started here.
    with compose_up(host, ["init", *mtls]):
        created = host.run("cli", ["keys", "create", "demo", "--label", "mtls"])
        key = re.search(r"mgw_\S+", created.stdout)
        assert key, created.stderr
        url = f"http://127.0.0.1:{host.ports[10000]}/mcp/demo"
        done = subprocess.run([sys.executable, "examples/call_tool.py", url, "whoami"], cwd=host.app,
                              env=host.env("example-mtls", {"MCP_AUTHZ_KEY": key.group(0)}), capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert '"signature_verified": true' in done.stdout and '"x-user-id": "demo"' in done.stdout
        # The header's remote CLI line: the admin API over TLS, verified against the CA the cli finds.
        (remote,) = [argv for argv in header_commands() if "--server" in argv]
        assert remote[:5] == ["docker", "compose", "run", "--rm", "cli"]
        who = host.run("cli", [_sidecar_on_loopback(f" {w}").strip() for w in remote[5:]],
                       env={"MCP_AUTHZ_KEY": key.group(0)})  # fmt: skip
        assert who.returncode == 0 and "demo" in who.stdout, who.stdout + who.stderr
        # Envoy's container never sees the CA key, the store or the master key.
        assert set(host.mounts("envoy-mtls")) == {"/tmp", "/certs"}
        assert not (host.mounts("envoy-mtls")["/certs"] / "ca.key").exists()
