"""The operator's HTTP port: /metrics (Prometheus), /healthz (alive), /readyz (serving Check).

Served from its own thread by the standard library's WSGI server, so a scrape
takes neither a gRPC worker nor the event loop.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from authz_server.envoy.health import Health


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not worth a log line
        pass


def _app(registry: CollectorRegistry, health: Health) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            served: Iterable[bytes] = metrics(environ, start_response)
            return served
        body: dict[str, object]
        if path == "/healthz":
            status, body = "200 OK", {"status": "alive"}
        elif path == "/readyz":
            ready = health.ready  # false while draining: Check still answers, but send nothing new
            status = "200 OK" if ready else "503 Service Unavailable"
            body = {"status": "ready" if ready else "not ready", "reason": health.reason}
        else:
            status, body = "404 Not Found", {"error": "not_found", "paths": ["/metrics", "/healthz", "/readyz"]}
        payload = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))])
        return [payload]

    return app


class OperatorHttp:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        self._server = make_server(host, port, _app(registry, health), server_class=_Server, handler_class=_QuietHandler)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="operator-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and release the port; also for a server never started (a refused start)."""
        if self._thread.ident is not None:  # shutdown() waits for serve_forever, which must have started
            self._server.shutdown()
        self._server.server_close()
