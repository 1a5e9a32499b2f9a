"""Fixtures of the admin/ tests; the worlds they build are in ../fakes.py."""

from __future__ import annotations

import pytest

from ..fakes import AdminWorld, SelfServiceWorld, admin_world, self_service_world


@pytest.fixture
async def world() -> AdminWorld:
    """An initialised store and its AdminService, as the local operator (`OP`) holds it."""
    return await admin_world()


@pytest.fixture
async def w() -> SelfServiceWorld:
    """Servers of every mode, alice, bob and mia acting for themselves, and an upstream (FakeProbe)."""
    return await self_service_world()
