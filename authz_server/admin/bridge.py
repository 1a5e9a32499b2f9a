"""Serve the asyncio admin servicer from the sync gRPC server.

The sidecar's one gRPC server is the sync one (Check is faster there), with a
pool of worker threads. The admin use cases live on the event loop with the
store, so each admin call is run there: the worker thread submits the
servicer's coroutine to the loop and waits for its result. Streaming RPCs are
pulled from the loop one message at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from typing import Any

import grpc


class LoopContext:
    """What the admin servicer uses of a grpc.aio context, over a sync one."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self._context = context

    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]]:
        metadata: Sequence[tuple[str, str | bytes]] = self._context.invocation_metadata()
        return metadata

    def peer(self) -> str:
        peer: str = self._context.peer()
        return peer

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Sequence[tuple[str, str]] = ()) -> None:
        if trailing_metadata:
            self._context.set_trailing_metadata(tuple(trailing_metadata))
        self._context.abort(code, details)  # raises; the worker thread sees the call aborted


class OnLoop:
    """A stand-in servicer whose every RPC runs the wrapped servicer's coroutine on `loop`."""

    def __init__(self, servicer: object, loop: asyncio.AbstractEventLoop) -> None:
        self._servicer = servicer
        self._loop = loop

    def __getattr__(self, name: str) -> Callable[[Any, grpc.ServicerContext], Any]:
        method = getattr(self._servicer, name)
        if inspect.isasyncgenfunction(method):
            return lambda request, context: self._pull(method(request, LoopContext(context)))
        return lambda request, context: asyncio.run_coroutine_threadsafe(
            method(request, LoopContext(context)), self._loop
        ).result()

    def _pull(self, stream: AsyncGenerator[Any, None]) -> Iterator[Any]:
        async def next_message() -> Any:
            return await anext(stream)

        try:
            while True:
                try:
                    yield asyncio.run_coroutine_threadsafe(next_message(), self._loop).result()
                except StopAsyncIteration:
                    return
        finally:
            # The stream ended, or the client went away mid-stream: let the servicer's generator clean up.
            with contextlib.suppress(RuntimeError):  # the loop is already closed at shutdown
                asyncio.run_coroutine_threadsafe(stream.aclose(), self._loop)
