"""The core loop over a real gRPC server and client on loopback: unary replies now or later, client
streams, bad input, shutdown.

And the servicer on top of it: a key's first use is answered from the hashing thread, while warm
Checks go on being answered meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest, CheckResponse
from google.rpc import code_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authz_server.envoy.core_loop import CoreLoop, Respond
from authz_server.envoy.servicer import METHOD
from authz_server.envoy.health import Health
from authz_server.envoy.servicer import AuthorizationServicer
from authz_server.models import AuthMode
from authz_server.observability import metrics as metrics_module
from authz_server.observability.batch import BatchWriter
from authz_server.observability.last_used import LastUsed
from authz_server.pipeline.pipeline import Pipeline

from .test_authn_cache import CountingHasher
from .world import World


STREAM = "/test.Log/Stream"


class Recorder:
    """A Stream that records what it was given."""

    def __init__(self, opened: list[Recorder], fail_on: bytes = b"") -> None:
        opened.append(self)
        self.messages: list[bytes] = []
        self.closed = 0
        self.fail_on = fail_on

    def receive(self, message: bytes) -> None:
        if message == self.fail_on:
            raise RuntimeError("bug")
        self.messages.append(message)

    def close(self) -> None:
        self.closed += 1


class Served:
    """A grpc.server whose Check runs on a CoreLoop calling `check`, plus health on the pool; and a
    client-streaming method whose streams are Recorders."""

    def __init__(self, check: object, fail_on: bytes = b"") -> None:
        self.streams: list[Recorder] = []
        self.server = grpc.server(ThreadPoolExecutor(4))
        checker = health.HealthServicer()
        checker.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(checker, self.server)
        self.loop = CoreLoop(self.server)
        self.loop.unary(METHOD, CheckRequest.FromString, check)  # type: ignore[arg-type]
        self.loop.client_stream(STREAM, bytes, lambda: Recorder(self.streams, fail_on), b"done")
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.loop.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.raw = self.channel.unary_unary(METHOD)  # bytes in, bytes out
        self.stream = self.channel.stream_unary(STREAM)

    def check(self, request: CheckRequest, timeout: float = 5) -> bytes:
        return self.raw(request.SerializeToString(), timeout=timeout)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(grace=1).wait()
        self.loop.close()


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        s.stop()


def _request(path: str) -> CheckRequest:
    r = CheckRequest()
    r.attributes.request.http.path = path
    return r


def test_replies_now_and_shares_the_port_with_the_other_services(served: list[Served]) -> None:
    s = Served(lambda request, respond: respond(request.attributes.request.http.path.encode()))
    served.append(s)
    assert s.check(_request("/a")) == b"/a"
    assert s.check(_request("/b")) == b"/b"
    reply = health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_reply_given_later_from_another_thread_does_not_hold_up_other_calls(served: list[Served]) -> None:
    held: list[Respond] = []

    def check(request: CheckRequest, respond: Respond) -> None:
        if request.attributes.request.http.path == "/later":
            held.append(respond)  # answered from another thread, as a first-use key is
        else:
            respond(b"now")

    s = Served(check)
    served.append(s)
    later = s.raw.future(_request("/later").SerializeToString(), timeout=5)
    _wait_until(lambda: bool(held))
    assert held and not later.done()
    assert [s.check(_request("/x")) for _ in range(3)] == [b"now"] * 3  # not stuck behind the held call
    threading.Thread(target=held[0], args=(b"later",)).start()
    assert later.result(timeout=5) == b"later"


def test_a_malformed_request_is_invalid_argument_and_the_loop_goes_on(served: list[Served]) -> None:
    s = Served(lambda request, respond: respond(b"ok"))
    served.append(s)
    with pytest.raises(grpc.RpcError) as exc:
        s.raw(b"\xff\xff\xff", timeout=5)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert s.check(_request("/")) == b"ok"


def test_a_check_that_raises_costs_that_call_only(served: list[Served]) -> None:
    def check(request: CheckRequest, respond: Respond) -> None:
        if request.attributes.request.http.path == "/boom":
            raise RuntimeError("bug")
        respond(b"ok")

    s = Served(check)
    served.append(s)
    with pytest.raises(grpc.RpcError) as exc:
        s.check(_request("/boom"), timeout=0.5)
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert s.check(_request("/")) == b"ok"


def test_close_stops_the_thread_and_a_reply_after_it_is_dropped() -> None:
    held: list[Respond] = []
    s = Served(lambda request, respond: held.append(respond))
    later = s.raw.future(_request("/").SerializeToString(), timeout=5)
    _wait_until(lambda: bool(held))
    s.channel.close()
    s.server.stop(grace=0.2).wait()  # cancels the held call
    s.loop.close()
    assert not s.loop._thread.is_alive()
    held[0](b"too late")  # must neither raise nor touch the shut-down queue
    with pytest.raises(grpc.RpcError):
        later.result(timeout=5)


def test_a_client_stream_gets_its_messages_in_order_then_one_reply(served: list[Served]) -> None:
    s = Served(lambda request, respond: respond(b"ok"))
    served.append(s)
    assert s.stream(iter([b"1", b"2", b"3"]), timeout=5) == b"done"
    assert s.stream(iter([]), timeout=5) == b"done"
    assert [(r.messages, r.closed) for r in s.streams] == [([b"1", b"2", b"3"], 1), ([], 1)]


def test_streams_hold_no_thread_and_checks_go_on_while_they_stay_open(served: list[Served]) -> None:
    """More open streams than the server has threads (4), as many Envoy workers would hold."""
    s = Served(lambda request, respond: respond(b"ok"))
    served.append(s)
    release = threading.Event()
    calls = [s.stream.future(_held_open(b"hello", release), timeout=10) for _ in range(8)]
    _wait_until(lambda: sum(len(r.messages) for r in s.streams) == 8)
    assert len(s.streams) == 8 and all(r.messages == [b"hello"] and not r.closed for r in s.streams)
    assert s.check(_request("/")) == b"ok"
    reply = health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    release.set()
    assert [c.result(timeout=5) for c in calls] == [b"done"] * 8
    assert all(r.closed == 1 for r in s.streams)


def test_a_stream_cut_off_by_its_client_is_closed(served: list[Served]) -> None:
    s = Served(lambda request, respond: respond(b"ok"))
    served.append(s)
    release = threading.Event()
    call = s.stream.future(_held_open(b"a", release), timeout=10)
    _wait_until(lambda: bool(s.streams and s.streams[0].messages))
    call.cancel()
    _wait_until(lambda: s.streams[0].closed > 0)
    release.set()
    assert s.streams[0].closed == 1 and s.streams[0].messages == [b"a"]


def test_a_stream_whose_handler_fails_ends_with_internal_and_the_next_one_works(served: list[Served]) -> None:
    s = Served(lambda request, respond: respond(b"ok"), fail_on=b"bad")
    served.append(s)
    with pytest.raises(grpc.RpcError) as exc:
        s.stream(iter([b"1", b"bad", b"2"]), timeout=5)
    assert exc.value.code() == grpc.StatusCode.INTERNAL
    assert s.stream(iter([b"3"]), timeout=5) == b"done"
    assert [(r.messages, r.closed) for r in s.streams] == [([b"1"], 1), ([b"3"], 1)]


def test_the_servicer_answers_a_first_use_from_the_hashing_thread(served: list[Served]) -> None:
    """A key on its first use waits for Argon2 while a warm key is answered meanwhile; both get 200s."""
    w = World()
    hasher = CountingHasher()
    w.hasher = hasher
    w.server("github", AuthMode.NONE)
    warm, cold = w.key(w.principal("warm")), w.key(w.principal("cold"))
    w.pipeline().decide(_input(warm))  # verified once: this pipeline waits out the first use
    pipeline: Pipeline = w.pipeline(waits=False)
    health_state = Health(60)
    health_state.serving = True
    metrics = metrics_module.create()
    servicer = AuthorizationServicer(pipeline, health_state, metrics, BatchWriter("audit", _sink, 10),
                                     LastUsed(None, 60))  # type: ignore[arg-type]
    s = Served(servicer.check)
    served.append(s)
    hasher.gate.clear()  # the cold key's verification waits until released
    first_use = s.raw.future(_check(cold).SerializeToString(), timeout=10)
    _wait_until(lambda: hasher.calls > 0)
    assert _status(s.raw(_check(warm).SerializeToString(), timeout=5)) == code_pb2.OK
    assert not first_use.done()
    hasher.gate.set()
    assert _status(first_use.result(timeout=10)) == code_pb2.OK
    assert hasher.calls == 2  # warm once, cold once
    allowed = [m for m in metrics.collect_checks() if m.name == "mcp_authz_check_decisions"]
    assert sum(sample.value for sample in allowed[0].samples if sample.labels.get("decision") == "allow") == 2


def test_the_servicer_answers_503_when_a_verification_cannot_run(served: list[Served]) -> None:
    w = World()
    hasher = CountingHasher()
    w.hasher = hasher
    w.server("github", AuthMode.NONE)
    key = w.key(w.principal("alice"))
    hasher.verify = lambda *_a: (_ for _ in ()).throw(RuntimeError("hasher broke"))  # type: ignore[method-assign]
    health_state = Health(60)
    health_state.serving = True
    servicer = AuthorizationServicer(w.pipeline(waits=False), health_state, metrics_module.create(),
                                     BatchWriter("audit", _sink, 10), LastUsed(None, 60))  # type: ignore[arg-type]
    s = Served(servicer.check)
    served.append(s)
    reply = CheckResponse.FromString(s.raw(_check(key).SerializeToString(), timeout=10))
    assert reply.status.code != code_pb2.OK and reply.denied_response.status.code == 503


def _wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def _held_open(first: bytes, release: threading.Event) -> Iterator[bytes]:
    """A client stream that sends one message, then stays open until released."""
    yield first
    release.wait(10)


async def _sink(_items: object) -> None:
    return None


def _check(key: str) -> CheckRequest:
    r = CheckRequest()
    http = r.attributes.request.http
    http.method, http.path = "POST", "/mcp/github"
    http.headers["authorization"] = f"Bearer {key}"
    http.headers["x-request-id"] = "rid"
    r.attributes.context_extensions["mcp_server"] = "github"
    return r


def _input(key: str):  # type: ignore[no-untyped-def]
    from authz_server.envoy.request import to_input

    return to_input(_check(key))


def _status(body: bytes) -> int:
    return CheckResponse.FromString(body).status.code


def test_a_grpcio_without_the_core_server_handle_is_refused_with_a_clear_message() -> None:
    from authz_server.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        CoreLoop(object())  # type: ignore[arg-type]  # what a grpcio that renamed its internals would give
    assert "constraints.txt" in str(exc.value)
