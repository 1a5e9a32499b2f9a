"""envoy/protowire.py: the top-level fields of a message, as upb reads them, without ever recursing; any
input that is not a well-formed message raises WireError and nothing else."""

from __future__ import annotations

import random

import pytest
from envoy.data.accesslog.v3.accesslog_pb2 import HTTPAccessLogEntry
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.auth.v3.external_auth_pb2 import CheckRequest
from google.protobuf.message import DecodeError

from authz_server.envoy import protowire
from authz_server.envoy.protowire import WireError


def _entry(request_id: str) -> HTTPAccessLogEntry:
    entry = HTTPAccessLogEntry()
    entry.request.request_id = request_id
    entry.response.response_code.value = 200
    entry.common_properties.sample_rate = 1.0  # a fixed64
    entry.protocol_version = HTTPAccessLogEntry.HTTP11  # a varint
    return entry


def test_fields_and_values_read_what_upb_reads() -> None:
    message = als_pb2.StreamAccessLogsMessage()
    message.identifier.log_name = "usage"
    message.http_logs.log_entry.extend([_entry("a"), _entry("b" * 300)])  # a one- and a two-byte length
    data = message.SerializeToString()
    top = list(protowire.fields(data))
    assert [(f.number, f.kind) for f in top] == [(1, protowire.LEN), (2, protowire.LEN)]
    assert data[top[0].start : top[0].end] == message.identifier.SerializeToString()
    entries = protowire.values(data, 1, top[1].start, top[1].end)
    assert entries == [e.SerializeToString() for e in message.http_logs.log_entry]
    entry = entries[0]
    kinds = {f.number: f.kind for f in protowire.fields(entry)}
    assert kinds[2] == protowire.VARINT  # protocol_version
    common = next(f for f in protowire.fields(entry) if f.number == 1)
    assert [(f.number, f.kind) for f in protowire.fields(entry, common.start, common.end)] == [(1, protowire.FIXED64)]


def test_without_drops_every_occurrence_and_keeps_the_rest_byte_for_byte() -> None:
    request = CheckRequest()
    request.attributes.request.http.path = "/mcp/x"
    request.attributes.metadata_context.filter_metadata["ns"].update({"a": 1})
    request.attributes.context_extensions["mcp_server"] = "x"
    attributes = request.attributes.SerializeToString()
    twice = attributes + protowire.length_delimited(11, request.attributes.metadata_context.SerializeToString())
    kept = protowire.without(twice, {11})
    parsed = type(request.attributes).FromString(kept)
    assert not parsed.HasField("metadata_context")
    assert (parsed.request.http.path, dict(parsed.context_extensions)) == ("/mcp/x", {"mcp_server": "x"})
    assert protowire.without(attributes, set()) == attributes


def test_length_delimited_and_encode_varint_round_trip() -> None:
    for value in (0, 1, 127, 128, 300, 2**21, 2**63):
        encoded = protowire.encode_varint(value)
        assert protowire.read_varint(encoded, 0, len(encoded)) == (value, len(encoded))
    field = protowire.length_delimited(2, b"x" * 200)
    (read,) = protowire.fields(field)
    assert (read.number, read.kind, field[read.start : read.end]) == (2, protowire.LEN, b"x" * 200)


@pytest.mark.parametrize(
    "data",
    [
        b"\x0a\x05abc",  # a length past the end
        b"\x0a",  # a key without its length
        b"\x08",  # a varint field without its value
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a varint longer than 10 bytes
        b"\x00\x00",  # field number 0
        b"\x0b\x0c",  # a group
        b"\x0e",  # wire type 6
        b"\x09\x00\x00",  # a fixed64 cut short
        b"\xf8\xff\xff\xff\x7f\x00",  # a field number past 2**29 - 1
    ],
)
def test_malformed_input_raises_wire_error(data: bytes) -> None:
    with pytest.raises(WireError):
        list(protowire.fields(data))
    with pytest.raises(WireError):
        protowire.values(data, 1)


def test_values_keeps_what_came_before_a_break() -> None:
    good = _entry("kept").SerializeToString()
    data = protowire.length_delimited(1, good) + b"\x0a\x7fshort"
    found: list[bytes] = []
    with pytest.raises(WireError):
        protowire.values(data, 1, found=found)
    assert found == [good]


def test_fuzz_random_truncated_and_deep_bytes_never_raise_anything_but_wire_error() -> None:
    """Random bytes, real messages cut at every length or with random bytes flipped, and nesting far past
    upb's limit: the reader either reads them or raises WireError, and finds the entries upb finds whenever
    both read them. ~20k inputs, about a second."""
    rng = random.Random(13)
    message = als_pb2.StreamAccessLogsMessage()
    message.identifier.log_name = "usage"
    message.http_logs.log_entry.extend(_entry(str(i) * i) for i in range(8))
    real = message.SerializeToString()
    deep = b""
    for _ in range(500):  # 500 messages deep: it only ever reads one level
        deep = protowire.length_delimited(1, deep)
    inputs = [rng.randbytes(rng.randrange(0, 64)) for _ in range(10_000)]
    inputs += [real[:cut] for cut in range(len(real))]
    for _ in range(10_000):
        flipped = bytearray(real)
        for _ in range(rng.randrange(1, 4)):
            flipped[rng.randrange(len(flipped))] = rng.randrange(256)
        inputs.append(bytes(flipped))
    inputs.append(deep)
    for data in inputs:
        try:
            top = list(protowire.fields(data))
        except WireError:
            continue
        try:
            parsed = als_pb2.StreamAccessLogsMessage.FromString(data)
        except DecodeError:
            continue
        entries: list[bytes] = []
        for field in top:
            if field.number == 2 and field.kind == protowire.LEN:
                try:
                    protowire.values(data, 1, field.start, field.end, entries)
                except WireError:
                    break
        else:
            assert len(entries) == len(parsed.http_logs.log_entry)
