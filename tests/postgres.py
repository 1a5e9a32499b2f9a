"""The PostgreSQL the tests use: 127.0.0.1:5432, database `test` (or $MCP_AUTHZ_TEST_POSTGRES).

`reachable_url(what)` returns a URL that answers, or skips the caller with the reason,
naming `what` is then left untested: a missing PostgreSQL is never a failure.
"""

from __future__ import annotations

import asyncio
import os
import threading

import asyncpg
import pytest

PG_CANDIDATES = (
    "postgresql://127.0.0.1:5432/test",
    "postgresql://postgres@127.0.0.1:5432/test",
)


async def _probe(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=3)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close()


def _probe_in_thread(url: str) -> None:
    """Probe on a loop of its own, also when called from inside a running loop."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(_probe(url))
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def reachable_url(what: str) -> str:
    """A PostgreSQL URL that answers, or a skip naming why none did and what goes untested."""
    candidates = [os.environ["MCP_AUTHZ_TEST_POSTGRES"]] if os.environ.get("MCP_AUTHZ_TEST_POSTGRES") else PG_CANDIDATES
    reasons = []
    for url in candidates:
        try:
            _probe_in_thread(url)
            return url
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            reasons.append(f"{url}: {type(exc).__name__}: {exc}")
    pytest.skip(f"PostgreSQL is not reachable, so {what} {'is' if what.endswith('store') else 'are'} not tested "
                f"({'; '.join(reasons)})")  # fmt: skip
