"""Fixtures for end-to-end tests: factories that start processes and always stop them.

- ``start_example(**kw) -> ExampleServer``: `harness.run_example_server` (``signing_secret=``,
  ``expect_tokens=``...).
- ``example_server``: one example server with default options.
- ``start_envoy(authz_port=..., upstream_port=..., servers=[...], mutate=None) -> EnvoyProcess``:
  `harness.run_envoy` on the shipped ``envoy/envoy.yaml``.

Everything started through these is stopped at teardown, in reverse order, failure included.
Logs are in the test's ``tmp_path``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from .harness import EnvoyProcess, ExampleServer, run_envoy, run_example_server


@pytest.fixture
def process_stack() -> Iterator[ExitStack]:
    """An ExitStack closed at teardown; push process context managers onto it."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def start_example(tmp_path: Path, process_stack: ExitStack) -> Callable[..., ExampleServer]:
    """Factory: start an example MCP server (kwargs of `run_example_server`)."""

    def start(**kwargs: Any) -> ExampleServer:
        return process_stack.enter_context(run_example_server(tmp_path, **kwargs))

    return start


@pytest.fixture
def example_server(start_example: Callable[..., ExampleServer]) -> ExampleServer:
    """An example MCP server without signature or token checks."""
    return start_example()


@pytest.fixture
def start_envoy(tmp_path: Path, process_stack: ExitStack) -> Callable[..., EnvoyProcess]:
    """Factory: start Envoy on the shipped config (kwargs of `run_envoy`)."""

    def start(**kwargs: Any) -> EnvoyProcess:
        return process_stack.enter_context(run_envoy(tmp_path, **kwargs))

    return start
