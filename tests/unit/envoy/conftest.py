"""Fixtures of the envoy/ tests; the fakes they use are in ../fakes.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..fakes import Served


@pytest.fixture
def served() -> Iterator[list[Served]]:
    """Every Served a test appends is stopped at teardown."""
    started: list[Served] = []
    yield started
    for s in started:
        s.stop()
