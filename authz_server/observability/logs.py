"""Structured JSON logs on stderr: one object a line, with the `extra` fields of each call.

Callers pass ids (request id, key id, server), never header values or secrets. Should a
key-shaped string reach a line anyway (in a message, an extra field or an exception's text),
the formatter cuts it to its key id.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

from authz_server.errors import redact

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # One pass over the finished line covers every field. A key is letters and digits only,
        # so JSON escaping never splits one.
        return redact(json.dumps(out, default=str))


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiosqlite").setLevel(logging.WARNING)


class Sampler:
    """At most `per_second` log lines per kind (a denial reason, say) each second.

    A flood of bad keys must not turn into a flood of log lines: each costs more
    than the denial itself. What was left out is counted and reported in one line
    when the next line of that kind is written. Metrics and the audit trail still
    count every event.
    """

    def __init__(self, per_second: int = 10, clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = per_second
        self._clock = clock
        self._windows: dict[str, list[float]] = {}  # kind -> [window start, lines written, lines left out]
        self._lock = threading.Lock()

    def admit(self, kind: str) -> int | None:
        """None: do not log this one. Otherwise log it, and the number of earlier ones left out."""
        now = self._clock()
        with self._lock:
            window = self._windows.get(kind)
            if window is None or now - window[0] >= 1.0:
                skipped = int(window[2]) if window is not None else 0
                self._windows[kind] = [now, 1, 0]
                return skipped
            if window[1] < self._limit:
                window[1] += 1
                return 0
            window[2] += 1
            return None
