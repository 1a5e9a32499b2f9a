"""A bounded reader of protobuf's wire format: the top-level fields of one message, unparsed.

Envoy's messages carry client-shaped data: its MCP filter copies `params.name` and
`params._meta` into dynamic metadata at whatever depth the request body has, so a
CheckRequest or an access-log entry can nest deeper than upb will parse (100 levels:
about 30 levels of JSON), or be larger than anything the sidecar needs to read. Such a
message must cost only itself, never a stream or another request's record. So the
access log splits each message into its entries here, and both the access log and Check
cut out the metadata they cannot read and parse the rest.

This reads one level at a time: a field's value is a slice of the input, found by its
length, never descended into unless the caller asks, so no input can make it recurse.
Every read is bounded by the slice it is given; a malformed input raises `WireError`
(and nothing else), at the first field that does not fit.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator

VARINT, FIXED64, LEN, FIXED32 = 0, 1, 2, 5  # the wire types proto3 messages use (no groups)
_MAX_FIELD_NUMBER = (1 << 29) - 1


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


class Field:
    """One top-level field: its number and wire type, where it starts (its key) and where its value
    starts and ends in the buffer. A LEN field's value is `data[start:end]`."""

    __slots__ = ("number", "kind", "key_start", "start", "end")

    def __init__(self, number: int, kind: int, key_start: int, start: int, end: int) -> None:
        self.number, self.kind, self.key_start, self.start, self.end = number, kind, key_start, start, end


def read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it; it must end before `end`."""
    result = shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes")


def fields(data: bytes, start: int = 0, end: int | None = None) -> Iterator[Field]:
    """Each top-level field of the message in `data[start:end]`, in wire order."""
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        key_start = pos
        key, pos = read_varint(data, pos, end)
        number, kind = key >> 3, key & 7
        if number == 0 or number > _MAX_FIELD_NUMBER:
            raise WireError(f"field number {number}")
        if kind == LEN:
            length, pos = read_varint(data, pos, end)
            value_end = pos + length
        elif kind == VARINT:
            value_end = read_varint(data, pos, end)[1]
        elif kind == FIXED64:
            value_end = pos + 8
        elif kind == FIXED32:
            value_end = pos + 4
        else:  # groups (3, 4) are not used by these messages; 6 and 7 do not exist
            raise WireError(f"wire type {kind}")
        if value_end > end:
            raise WireError(f"field {number} runs past the end of its message")
        yield Field(number, kind, key_start, pos, value_end)
        pos = value_end


def values(
    data: bytes, number: int, start: int = 0, end: int | None = None, found: list[bytes] | None = None
) -> list[bytes]:
    """The value of every length-delimited field `number` of the message in `data[start:end]`, in
    order (a repeated message field's elements, unparsed), appended to `found`; other fields are
    skipped. On a WireError, `found` keeps the values before the break."""
    end = len(data) if end is None else end
    key = number << 3 | LEN
    one_byte_key = key < 0x80
    found = [] if found is None else found
    pos = start
    while pos < end:
        if one_byte_key and data[pos] == key:  # the usual case, without a Field per element
            length, pos = read_varint(data, pos + 1, end)
            value_end = pos + length
            if value_end > end:
                raise WireError(f"field {number} runs past the end of its message")
            found.append(data[pos:value_end])
            pos = value_end
            continue
        field = next(fields(data, pos, end))
        if field.number == number and field.kind == LEN:
            found.append(data[field.start : field.end])
        pos = field.end
    return found


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(number: int, value: bytes) -> bytes:
    """A LEN field, encoded: key, length, value."""
    return encode_varint(number << 3 | LEN) + encode_varint(len(value)) + value


def without(data: bytes, drop: Collection[int], start: int = 0, end: int | None = None) -> bytes:
    """The message in `data[start:end]` without its fields numbered in `drop` (every occurrence)."""
    kept = [data[f.key_start : f.end] for f in fields(data, start, end) if f.number not in drop]
    return b"".join(kept)


def string(data: bytes, field: Field) -> bytes:
    """The raw bytes of a LEN field (a string's UTF-8, or a message)."""
    if field.kind != LEN:
        raise WireError(f"field {field.number} is not length-delimited")
    return data[field.start : field.end]
