"""A TCP proxy the test controls, between a sidecar and its PostgreSQL: outages without touching
the machine's database.

- `reset()`: every connection through the proxy is aborted with a TCP RST, and new ones are reset
  as soon as they arrive (a database restarting, a load balancer dropping its flows).
- `hold()`: bytes stop moving both ways and new connections are accepted but not forwarded; nothing
  is closed (a network partition: the peer is silent, no error arrives).
- `restore()`: back to forwarding; held connections carry on where they stopped.

It runs on a thread of its own with its own event loop, so a test's load and the proxy do not
share a loop. Bound to 127.0.0.1 on a free port; stopped on exit, failure included.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from .harness import LOOPBACK, LoopServer

CHUNK = 64 * 1024


@dataclass(eq=False)  # hashed by identity: held in a set
class _Pipe:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with a RST, not a FIN: SO_LINGER with a zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class FaultProxy(LoopServer):
    name = "fault-proxy"

    def __init__(self, target_host: str, target_port: int) -> None:
        super().__init__()
        self.target = (target_host, target_port)
        self.mode = "forward"  # "forward", "reset" or "hold"
        self.connections = 0  # accepted since start
        self.resets = 0  # connections aborted with a RST
        self._pipes: set[_Pipe] = set()
        self._flowing: asyncio.Event | None = None  # set while forwarding; created on the proxy's loop

    def __exit__(self, *exc: object) -> None:
        self._call(self._close_all)
        super().__exit__(*exc)

    def url(self, dsn: str) -> str:
        """`dsn` with its host and port replaced by the proxy's."""
        scheme, _, rest = dsn.partition("://")
        userinfo, _, hostpath = rest.rpartition("@")
        path = hostpath[hostpath.index("/"):] if "/" in hostpath else ""
        return f"{scheme}://{userinfo + '@' if userinfo else ''}{LOOPBACK}:{self.port}{path}"

    # --- the test's controls, from any thread ---------------------------------------------------

    def reset(self) -> None:
        self._call(self._reset)

    def hold(self) -> None:
        self._call(self._hold)

    def restore(self) -> None:
        self._call(self._restore)

    def _call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the proxy's loop and wait for it."""

        async def run() -> None:
            fn()

        asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def _reset(self) -> None:
        self.mode = "reset"
        self._close_all()

    def _hold(self) -> None:
        self.mode = "hold"
        assert self._flowing is not None
        self._flowing.clear()

    def _restore(self) -> None:
        self.mode = "forward"
        assert self._flowing is not None
        self._flowing.set()

    def _close_all(self) -> None:
        for pipe in list(self._pipes):
            self._drop(pipe)

    def _drop(self, pipe: _Pipe) -> None:
        self._pipes.discard(pipe)
        for task in pipe.tasks:
            task.cancel()
        for writer in (pipe.client, pipe.upstream):
            if writer is not None and not writer.transport.is_closing():
                _abort(writer)
                self.resets += 1

    # --- the proxy's loop ---------------------------------------------------------------------

    def started(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        pipe = _Pipe(writer)
        self._pipes.add(pipe)
        if self.mode == "reset":
            self._drop(pipe)
            return
        assert self._flowing is not None
        await self._flowing.wait()  # held: accepted, not forwarded
        if pipe not in self._pipes:
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            self._drop(pipe)
            return
        pipe.upstream = up_writer
        pipe.tasks = [asyncio.create_task(self._pump(reader, up_writer, pipe)),
                      asyncio.create_task(self._pump(up_reader, writer, pipe))]  # fmt: skip

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pipe: _Pipe) -> None:
        assert self._flowing is not None
        try:
            while data := await reader.read(CHUNK):
                await self._flowing.wait()  # held: what was read waits here, and nothing more is read
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            return
        # One side closed: close the pair as a proxy would.
        if pipe in self._pipes:
            self._pipes.discard(pipe)
            for other in (pipe.client, pipe.upstream):
                if other is not None:
                    other.close()
