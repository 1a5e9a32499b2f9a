"""envoy/core_loop.py over a real gRPC server and client on loopback: unary replies now or later,
client streams, bad input, shutdown. The servicer on top of it: test_servicer.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from authz_server.envoy.core_loop import CoreLoop, Respond

from ..fakes import Served, wait_until


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
    wait_until(lambda: bool(held))
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


def test_a_request_whose_reader_fails_is_answered_internal_not_left_hanging(served: list[Served]) -> None:
    def read(message: bytes) -> CheckRequest:
        if message == b"bug":
            raise RuntimeError("reader bug")
        return CheckRequest.FromString(message)

    s = Served(lambda request, respond: respond(b"ok"), parse=read)
    served.append(s)
    with pytest.raises(grpc.RpcError) as exc:
        s.raw(b"bug", timeout=5)
    assert exc.value.code() == grpc.StatusCode.INTERNAL
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
    wait_until(lambda: bool(held))
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
    wait_until(lambda: sum(len(r.messages) for r in s.streams) == 8)
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
    wait_until(lambda: bool(s.streams and s.streams[0].messages))
    call.cancel()
    wait_until(lambda: s.streams[0].closed > 0)
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


def test_a_stream_message_its_reader_cannot_read_is_skipped_and_the_stream_goes_on(served: list[Served]) -> None:
    """Each message costs only itself: one the reader refuses (DecodeError) or fails on (a bug) is skipped,
    and the messages after it, on the same stream, still arrive."""
    from google.protobuf.message import DecodeError

    def read(message: bytes) -> bytes:
        if message == b"undecodable":
            raise DecodeError("no")
        if message == b"reader bug":
            raise RuntimeError("bug")
        return message

    s = Served(lambda request, respond: respond(b"ok"), stream_parse=read)
    served.append(s)
    assert s.stream(iter([b"1", b"undecodable", b"2", b"reader bug", b"3"]), timeout=5) == b"done"
    assert [(r.messages, r.closed) for r in s.streams] == [([b"1", b"2", b"3"], 1)]


def _held_open(first: bytes, release: threading.Event) -> Iterator[bytes]:
    """A client stream that sends one message, then stays open until released."""
    yield first
    release.wait(10)


def test_a_grpcio_without_the_core_server_handle_is_refused_with_a_clear_message() -> None:
    from authz_server.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        CoreLoop(object())  # type: ignore[arg-type]  # what a grpcio that renamed its internals would give
    assert "constraints.txt" in str(exc.value)
