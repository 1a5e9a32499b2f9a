"""The two methods Envoy calls for every request, served straight off gRPC core's
completion queue by one thread: Check, and the access-log stream.

`grpc.server` hands every call from its poller thread to a worker and back: the
worker waits on a condition for each message, which the poller delivers, and
each hand-off is a futex wake and a fight for the GIL. For a unary call that does
~25 µs of Python, that costs several times the call itself, and each access-log
stream holds a worker thread for its lifetime (benchmarks/RESULTS.md). Here one
thread takes each call, its messages and its reply from its own completion
queue: a warm Check never leaves the thread it arrived on, and a stream costs no
thread at all.

Both methods are registered with the core server as methods of their own,
delivered only to this queue; everything else (admin, health, reflection) stays
with `grpc.server` on the same port. Handlers must never block: a Check whose key
needs its first-use Argon2 run replies later from the hashing thread.

No message ends a stream: one its reader cannot read is skipped, logged (sampled), and the
stream goes on, so the other entries Envoy sends on it are not lost. Both readers Envoy's
calls use never raise anyway (envoy/request.py answers a Check it cannot read with a
denial; envoy/accesslog.py skips and counts an entry it cannot read).

This uses grpcio's Cython layer (`grpc._cython.cygrpc`) and the server's core
handle, which are not public API: grpcio is pinned, and the end-to-end tests
serve every Check and access-log entry through this loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from google.protobuf.message import DecodeError
from grpc._cython import cygrpc

from authz_server.errors import ConfigError
from authz_server.observability.logs import Sampler

log = logging.getLogger(__name__)

# A handler's answer: the serialized reply, or None for gRPC UNAVAILABLE (ask another server).
Respond = Callable[[bytes | None], None]
_POLL_SECONDS = 1.0


class Stream(Protocol):
    """One open client stream: its messages in order, then `close` once, however it ended."""

    def receive(self, message: Any) -> None: ...

    def close(self) -> None: ...


class CoreLoop:
    """Serves registered methods of `server` on one thread. Register them all before the server starts."""

    def __init__(self, server: grpc.Server) -> None:
        core = getattr(server, "_cy_server", None)
        if not isinstance(core, cygrpc.Server):
            raise _unsupported()
        self._core = core
        self._queue = cygrpc.CompletionQueue()
        try:
            core.register_completion_queue(self._queue)
        except (AttributeError, TypeError) as exc:
            raise _unsupported() from exc
        self._methods: list[_Accept] = []
        self._lock = threading.Lock()  # a reply from another thread must not race the queue's shutdown
        self._open = True
        self.sampler = Sampler()  # log lines about calls' input, at most a few a second
        self._thread = threading.Thread(target=self._run, name="core-loop", daemon=True)

    def unary(self, method: str, parse: Callable[[bytes], Any], handle: Callable[[Any, Respond], None]) -> None:
        """`handle(request, respond)` must call `respond(serialized reply)`, or `respond(None)` for UNAVAILABLE,
        exactly once, now or from any thread."""
        self._register(_Accept(self, method, lambda call: _Unary(self, call, parse, handle)))

    def client_stream(self, method: str, parse: Callable[[bytes], Any], open_stream: Callable[[], Stream],
                      reply: bytes) -> None:  # fmt: skip
        """Each call's messages go to a `Stream` of its own; `reply` answers the client when it ends the stream."""
        self._register(_Accept(self, method, lambda call: _ClientStream(self, call, parse, open_stream(), reply)))

    def _register(self, accept: _Accept) -> None:
        self._core.register_method(accept.method)
        self._methods.append(accept)

    def start(self) -> None:
        """Start taking calls; call it right after the gRPC server has started."""
        try:
            for accept in self._methods:
                accept.request()
        except (AttributeError, TypeError) as exc:
            raise _unsupported() from exc
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        """Stop, once the gRPC server has stopped (so no call of ours is left in flight)."""
        with self._lock:
            if not self._open:
                return
            self._open = False
            self._queue.shutdown()
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)

    def _run(self) -> None:
        queue = self._queue
        timeout, shutdown = cygrpc.CompletionType.queue_timeout, cygrpc.CompletionType.queue_shutdown
        while True:
            event = queue.poll(time.time() + _POLL_SECONDS)
            kind = event.completion_type
            if kind == timeout:
                continue
            if kind == shutdown:
                return
            tag = event.tag
            if tag is None:  # a reply was sent
                continue
            try:
                tag.completed(event)
            except Exception:  # noqa: BLE001 - this thread must outlive any one call
                log.exception("gRPC call failed", extra={"method": getattr(tag, "method", "")})

    def start_batch(self, call: cygrpc.Call, operations: tuple[cygrpc.Operation, ...], tag: object) -> None:
        """Start operations on `call` unless the loop has closed (the server's shutdown ended the call). Any thread."""
        with self._lock:
            if self._open:
                call.start_server_batch(operations, tag)

    def finish(self, call: cygrpc.Call, body: bytes | None, code: cygrpc.StatusCode, details: bytes = b"") -> None:
        """Send the reply (if any) and the status in one batch. Any thread."""
        status = cygrpc.SendStatusFromServerOperation(None, code, details, 0)
        operations: tuple[cygrpc.Operation, ...]
        if body is None:
            operations = (cygrpc.SendInitialMetadataOperation(None, 0), status)
        else:
            operations = (cygrpc.SendInitialMetadataOperation(None, 0), cygrpc.SendMessageOperation(body, 0), status)
        self.start_batch(call, operations, None)


def _unsupported() -> ConfigError:
    return ConfigError(
        f"grpcio {grpc.__version__} does not offer the core-server calls mcp-authz serves Check with; "
        "install the grpcio version pinned in constraints.txt."
    )


class _Accept:
    """Tag of the standing request for the next call of one method."""

    def __init__(self, loop: CoreLoop, method: str, begin: Callable[[cygrpc.Call], Any]) -> None:
        self.loop = loop
        self.method = method
        self._begin = begin

    def request(self) -> None:
        try:
            self.loop._core.request_registered_call(self.loop._queue, self.loop._queue, self.method, self)
        except ValueError:  # the server began shutting down: it takes no more calls
            pass

    def completed(self, event: cygrpc.RequestCallEvent) -> None:
        if not event.success:  # the server is shutting down
            return
        self.request()
        self._begin(event.call).read()


class _Call:
    """A call of ours in progress; it is its own tag, so each message read completes on `completed`."""

    __slots__ = ("loop", "call", "parse")

    def __init__(self, loop: CoreLoop, call: cygrpc.Call, parse: Callable[[bytes], Any]) -> None:
        self.loop, self.call, self.parse = loop, call, parse

    def read(self) -> None:
        self.loop.start_batch(self.call, (cygrpc.ReceiveMessageOperation(0),), self)


class _Unary(_Call):
    """One unary call: read its request, hand it over, and reply when told to."""

    __slots__ = ("handle",)

    def __init__(self, loop: CoreLoop, call: cygrpc.Call, parse: Callable[[bytes], Any],
                 handle: Callable[[Any, Respond], None]) -> None:  # fmt: skip
        super().__init__(loop, call, parse)
        self.handle = handle

    def completed(self, event: cygrpc.BatchOperationEvent) -> None:
        message = event.batch_operations[0].message() if event.success else None
        if message is None:  # the call ended before its request arrived
            return
        try:
            request = self.parse(message)
        except DecodeError:  # Check's reader never raises (envoy/request.py): it answers what it cannot read
            self.loop.finish(self.call, None, cygrpc.StatusCode.invalid_argument, b"malformed request")
            return
        except Exception:  # noqa: BLE001 - a reader's bug: answer the call rather than leave it hanging
            log.exception("request could not be read")
            self.loop.finish(self.call, None, cygrpc.StatusCode.internal, b"internal error")
            return
        self.handle(request, self.reply)

    def reply(self, body: bytes | None) -> None:
        if body is None:
            self.loop.finish(self.call, None, cygrpc.StatusCode.unavailable, b"not ready")
        else:
            self.loop.finish(self.call, body, cygrpc.StatusCode.ok)


class _ClientStream(_Call):
    """One client-streaming call: each message to its Stream, then one reply when the client is done."""

    __slots__ = ("stream", "reply")

    def __init__(self, loop: CoreLoop, call: cygrpc.Call, parse: Callable[[bytes], Any], stream: Stream,
                 reply: bytes) -> None:  # fmt: skip
        super().__init__(loop, call, parse)
        self.stream, self.reply = stream, reply

    def completed(self, event: cygrpc.BatchOperationEvent) -> None:
        message = event.batch_operations[0].message() if event.success else None
        if message is None:  # the client ended the stream (or the call was cut off: then the reply goes nowhere)
            self.stream.close()
            self.loop.finish(self.call, self.reply, cygrpc.StatusCode.ok)
            return
        try:
            parsed = self.parse(message)
        except Exception as exc:  # noqa: BLE001
            # A message costs only itself: the stream goes on. (The access log's reader never raises:
            # it splits each message into its entries and counts what it cannot read.)
            skipped = self.loop.sampler.admit("stream message unreadable")
            if skipped is not None:
                log.warning("stream message unreadable; skipped", exc_info=not isinstance(exc, DecodeError),
                            extra={"bytes": len(message), "not_logged_before": skipped})  # fmt: skip
            self.read()
            return
        try:
            self.stream.receive(parsed)
        except Exception:  # noqa: BLE001 - a handler's bug: end this stream cleanly; the client opens another
            self.stream.close()
            log.exception("stream failed")
            self.loop.finish(self.call, None, cygrpc.StatusCode.internal, b"internal error")
            return
        self.read()
