"""console/sessions.py: tokens, idle and absolute expiry, the bound."""

from __future__ import annotations

from authz_server.console.sessions import Sessions


class Tick:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_finds_its_session_and_only_a_digest_is_kept() -> None:
    sessions = Sessions()
    token, session = sessions.start("k1", "p1")
    assert len(token) >= 43 and len(session.csrf_token) >= 43 and token != session.csrf_token
    assert sessions.find(token) is session
    assert sessions.find(token + "x") is None and sessions.find("") is None
    assert token not in repr(vars(sessions))  # kept by digest only
    other, _ = sessions.start("k1", "p1")
    assert other != token and len(sessions) == 2


def test_idle_sessions_end_and_use_keeps_them_alive_up_to_the_maximum() -> None:
    clock = Tick()
    sessions = Sessions(idle=100, max_age=250, clock=clock)
    token, _ = sessions.start("k1", "p1")
    for _ in range(2):
        clock.now += 99
        assert sessions.find(token) is not None  # sliding
    clock.now += 60  # 258 s after sign-in: past the maximum though used 60 s ago
    assert sessions.find(token) is None
    assert len(sessions) == 0
    idle, _ = sessions.start("k2", "p2")
    clock.now += 100
    assert sessions.find(idle) is None


def test_sign_out_ends_a_session_at_once() -> None:
    sessions = Sessions()
    token, _ = sessions.start("k1", "p1")
    sessions.end(token)
    sessions.end(token)  # twice: nothing to do
    assert sessions.find(token) is None


def test_the_store_is_bounded_and_drops_the_least_recently_used() -> None:
    sessions = Sessions(limit=3)
    a, _ = sessions.start("k", "p")
    b, _ = sessions.start("k", "p")
    c, _ = sessions.start("k", "p")
    assert sessions.find(a) is not None  # a is now the most recently used
    d, _ = sessions.start("k", "p")
    assert len(sessions) == 3
    assert sessions.find(b) is None
    assert all(sessions.find(t) is not None for t in (a, c, d))
