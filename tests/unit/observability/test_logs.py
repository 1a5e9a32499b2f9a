"""observability/logs.py: JSON lines with no key-shaped string in message, arguments, extras or
exception, and a sampler that caps lines per reason."""

from __future__ import annotations

import json
import logging
import sys

from authz_server.observability.logs import JsonFormatter, Sampler

from ..fakes import assert_no_key, real_key, redacted


def _format(record: logging.LogRecord) -> str:
    line = JsonFormatter().format(record)
    json.loads(line)  # still one JSON object
    return line


def test_a_log_line_is_redacted_in_message_args_extras_and_exception() -> None:
    key_id, key = real_key()
    try:
        raise ValueError(f"bad value {key}")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "presented %s", (key,), exc_info)
    record.key_id = key  # an extra field: the wrong thing passed as a key id
    record.path = f"/mcp/github/{key}"
    record.nested = {"values": [key]}
    line = _format(record)
    assert_no_key(line, key)
    doc = json.loads(line)
    assert doc["msg"] == f"presented {redacted(key_id)}"
    assert doc["key_id"] == redacted(key_id)
    assert doc["path"] == f"/mcp/github/{redacted(key_id)}"
    assert doc["nested"] == {"values": [redacted(key_id)]}
    assert f"ValueError: bad value {redacted(key_id)}" in doc["exc"]


def test_a_log_line_with_an_escaped_character_next_to_a_key_is_redacted() -> None:
    key_id, key = real_key()
    record = logging.LogRecord("t", logging.INFO, __file__, 1, f'"quoted"\n{key}\té', None, None)
    doc = json.loads(_format(record))
    assert doc["msg"] == f'"quoted"\n{redacted(key_id)}\té'


def test_log_sampler_caps_lines_per_reason_and_reports_what_it_left_out() -> None:
    now = [0.0]
    sampler = Sampler(per_second=3, clock=lambda: now[0])
    assert [sampler.admit("key_checksum") for _ in range(5)] == [0, 0, 0, None, None]
    assert sampler.admit("key_unknown") == 0  # each reason has its own budget
    now[0] = 1.5
    assert sampler.admit("key_checksum") == 2  # the next line says how many were not logged
    assert sampler.admit("key_checksum") == 0
