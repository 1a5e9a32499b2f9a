"""py-spy profiles of the sidecar and their text summaries.

`record` samples a running process with `py-spy record --format raw` (collapsed stacks, one
line per distinct stack: `frame;frame;... count`; speedscope and flamegraph.pl both read it),
then writes a short summary: where the samples' leaf frames are (self time), which functions
are on the stack (inclusive time), and a breakdown by area (our pipeline, protobuf translation,
metrics, gRPC, asyncio...). The raw file is git-ignored; the summary is small and committed.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# First match wins: (area, substring of the frame's file path or function).
AREAS: list[tuple[str, str]] = [
    ("mcp-authz: envoy/core_loop.py (the gRPC calls, off the completion queue)", "authz_server/envoy/core_loop.py"),
    ("mcp-authz: envoy/servicer.py (Check wrapper)", "authz_server/envoy/servicer.py"),
    ("mcp-authz: envoy/request.py (CheckRequest -> input)", "authz_server/envoy/request.py"),
    ("mcp-authz: envoy/response.py (decision -> CheckResponse)", "authz_server/envoy/response.py"),
    ("mcp-authz: envoy/accesslog.py (usage attribution)", "authz_server/envoy/accesslog.py"),
    ("mcp-authz: pipeline/ (the decision)", "authz_server/pipeline/"),
    ("mcp-authz: crypto/", "authz_server/crypto/"),
    ("mcp-authz: observability/ (metrics, usage, queues)", "authz_server/observability/"),
    ("mcp-authz: live/, store/ (follower; usage and audit writes)", "authz_server/live/"),
    ("mcp-authz: live/, store/ (follower; usage and audit writes)", "authz_server/store/"),
    ("mcp-authz: other", "authz_server/"),
    ("prometheus_client", "prometheus_client/"),
    ("protobuf (Python API over upb)", "google/protobuf/"),
    ("grpc Cython layer (C-core calls)", "grpc/_cython"),
    ("grpc (Python)", "grpc/"),
    ("logging", "logging/"),
    ("asyncio event loop", "asyncio/"),
    ("aiosqlite / sqlite", "aiosqlite/"),
    ("threading", "threading.py"),
]


def _parse(frame: str) -> tuple[str, str]:
    """`func (path:line)` -> (`func (short path)`, path)."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), ""
    path = match.group("file")
    short = path
    for marker in ("site-packages/", "/lib/python3", "/authz_server/", "/benchmarks/"):
        if marker in path:
            short = path.split(marker, 1)[1]
            if marker == "/authz_server/":
                short = "authz_server/" + short
            if marker == "/lib/python3":
                short = short.split("/", 1)[1] if "/" in short else short
            break
    return f"{match.group('func')} ({short})", path


def area_of(path: str, func: str) -> str:
    for area, marker in AREAS:
        if marker in path or marker in func:
            return area
    return "other"


def summarize(raw: Path, top: int = 25) -> tuple[str, dict[str, Any]]:
    """Text summary of a collapsed-stack file, and its numbers."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()  # by the innermost frame that belongs to a known area
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_parse(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_time[frames[-1][0]] += count
        for name in {name for name, _ in frames}:
            inclusive[name] += count
        area = "other"
        for name, path in reversed(frames):
            found = area_of(path, name)
            if found != "other":
                area = found
                break
        areas[area] += count

    def pct(n: int) -> str:
        return f"{100 * n / total:5.1f}%" if total else "  -  "

    lines = [f"samples: {total} (py-spy --gil: only the thread holding the GIL, i.e. Python CPU time;"
             " native code called with the GIL held is charged to its Python caller)", ""]
    lines.append("by area (innermost known frame):")
    lines += [f"  {pct(n)}  {area}" for area, n in areas.most_common()]
    lines += ["", f"top {top} by self time (leaf frame):"]
    lines += [f"  {pct(n)}  {name}" for name, n in self_time.most_common(top)]
    lines += ["", f"top {top} by inclusive time (on the stack):"]
    lines += [f"  {pct(n)}  {name}" for name, n in inclusive.most_common(top)]
    numbers = {
        "samples": total,
        "areas": {a: n / total for a, n in areas.most_common()} if total else {},
        "self": [(name, n / total) for name, n in self_time.most_common(top)] if total else [],
        "inclusive": [(name, n / total) for name, n in inclusive.most_common(top)] if total else [],
    }
    return "\n".join(lines) + "\n", numbers


def record(pid: int, seconds: float, out_dir: Path, name: str, rate: int = 200, native: bool = False) -> dict[str, Any]:
    """Sample `pid` for `seconds` (only the GIL-holding thread; with `native`, C frames too);
    write `name.collapsed.txt` (git-ignored) and `name.summary.txt` (small, committed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"{name}.collapsed.txt"
    py_spy = Path(sys.executable).parent / "py-spy"
    argv = [str(py_spy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", str(rate),
            "--format", "raw", "--output", str(raw), "--gil"] + (["--native"] if native else [])  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0 or not raw.exists():
        return {"samples": 0, "error": (done.stderr or done.stdout)[-500:], "summary_path": ""}
    text, numbers = summarize(raw)
    summary_path = out_dir / f"{name}.summary.txt"
    header = (f"py-spy record --gil{' --native' if native else ''} --rate {rate}, {int(seconds)} s, on `mcp-authz serve` under "
              f"configuration C's max load (wrk, 32 connections, 1,000 rotating keys).\n"
              f"Raw collapsed stacks (speedscope/flamegraph input): {raw.name} (git-ignored).\n\n")  # fmt: skip
    summary_path.write_text(header + text, encoding="utf-8")
    numbers["summary_path"] = str(summary_path.relative_to(out_dir.parents[1]))
    numbers["text"] = text
    return numbers
