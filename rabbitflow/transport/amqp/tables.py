"""AMQP field tables as they arrived: decoded to pamqp's values, and kept entry by entry as bytes.

A handler sees the values pamqp would give it (`decode_table`). A retry or parked copy carries
each of the producer's headers as the bytes it arrived with (`entries`, then `Encoded` values
that `wire` writes verbatim): pamqp picks an encoding by value range, so a decoded int32 would go
out as an int8, a double 0.1 as a float, a millisecond timestamp divided by 1000.

What cannot be decoded (a key that is not UTF-8, a timestamp past the year 9999, an unknown type
octet, a length past the end) raises `Undecodable` naming it, never pamqp's errors that end the
connection.
"""

from __future__ import annotations

import datetime
import decimal
from struct import Struct, error
from typing import Any

__all__ = [
    "Encoded",
    "Timestamp",
    "Undecodable",
    "decode_table",
    "edit_properties",
    "entries",
    "header_table",
    "property_block",
    "property_parts",
    "timestamp",
    "without_entries",
]

_U32 = Struct(">I")
_I32 = Struct(">i")
_U64 = Struct(">Q")
_I8 = Struct(">b")
_U16 = Struct(">H")
_FIXED: dict[int, tuple[int, Struct | None]] = {
    ord("t"): (1, Struct(">B")),
    ord("b"): (1, _I8),
    ord("B"): (1, Struct(">B")),
    ord("s"): (2, Struct(">h")),
    ord("u"): (2, Struct(">H")),
    ord("I"): (4, _I32),
    ord("i"): (4, _U32),
    ord("l"): (8, Struct(">q")),
    ord("L"): (8, Struct(">q")),  # pamqp reads L signed too
    ord("f"): (4, Struct(">f")),
    ord("d"): (8, Struct(">d")),
    ord("D"): (5, None),
    ord("T"): (8, None),
    ord("V"): (0, None),
    0: (0, None),  # not in the spec, seen in the wild; pamqp reads it as void
}
_SIZED = frozenset(b"SxFA")  # a uint32 length, then that many bytes


class Undecodable(ValueError):
    """A property or header the client cannot decode; says which and why."""


class Encoded:
    """A field value already encoded (type octet and value bytes), written as is."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Encoded) and other.data == self.data

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"Encoded({self.data!r})"


class Timestamp(datetime.datetime):
    """A timestamp that arrived in milliseconds (pamqp's reading of a value past 2**32): the
    datetime pamqp gives, and the original value, which `wire` writes back unchanged."""

    raw: int


def timestamp(value: int, what: str) -> datetime.datetime:
    """pamqp's datetime for an AMQP timestamp: seconds, or milliseconds past 2**32."""
    try:
        if value <= 0xFFFFFFFF:
            return datetime.datetime.fromtimestamp(value, tz=datetime.UTC)
        stamp = Timestamp.fromtimestamp(value / 1000.0, tz=datetime.UTC)
    except (ValueError, OverflowError, OSError):
        raise Undecodable(f"{what}: timestamp {value} is out of range, as seconds or milliseconds") from None
    stamp.raw = value
    return stamp


def decode_table(data: bytes, start: int, end: int, what: str = "headers") -> dict[str, Any]:
    """The table whose entries are `data[start:end]`, with pamqp's values."""
    table: dict[str, Any] = {}
    i = start
    key = ""
    try:
        while i < end:
            j = i + 1 + data[i]
            if j > end:
                raise Undecodable(f"{what}: a key runs past the end of its table")
            key = data[i + 1 : j].decode()
            kind = data[j]
            if kind == 0x53:  # S, the common case inline
                i = j + 5 + _U32.unpack_from(data, j + 1)[0]
                if i > end:
                    raise Undecodable(f"{what}[{key!r}]: value runs past the end of its table")
                raw = data[j + 5 : i]
                try:
                    table[key] = raw.decode()
                except UnicodeDecodeError:
                    table[key] = raw  # as pamqp: bytes
            elif kind == 0x62 and j + 2 <= end:  # b, how pamqp and rabbitflow write small ints
                table[key] = _I8.unpack_from(data, j + 1)[0]
                i = j + 2
            else:
                table[key], i = _value(data, j, end, f"{what}[{key!r}]")
    except UnicodeDecodeError:
        raw_key = data[i + 1 : i + 1 + data[i]]
        raise Undecodable(f"{what}: header name {raw_key[:100]!r} is not UTF-8") from None
    except (IndexError, error):
        raise Undecodable(f"{what}: truncated field table") from None
    if i != end:
        raise Undecodable(f"{what}: a value runs past the end of its table")
    return table


def _value(data: bytes, i: int, end: int, what: str) -> tuple[Any, int]:
    kind = data[i]
    i += 1
    if kind in _SIZED:
        size = _U32.unpack_from(data, i)[0]
        i += 4
        stop = i + size
        if stop > end:
            raise Undecodable(f"{what}: value runs past the end of its table")
        if kind == 0x53:  # S: str, or bytes when not UTF-8 (as pamqp)
            raw = data[i:stop]
            try:
                return raw.decode(), stop
            except UnicodeDecodeError:
                return raw, stop
        if kind == 0x46:  # F
            return decode_table(data, i, stop, what), stop
        if kind == 0x41:  # A
            items = []
            while i < stop:
                item, i = _value(data, i, stop, what)
                items.append(item)
            if i != stop:
                raise Undecodable(f"{what}: an array value runs past the end of its array")
            return items, stop
        return bytearray(data[i:stop]), stop  # x
    fixed = _FIXED.get(kind)
    if fixed is None:
        raise Undecodable(f"{what}: unknown field type {bytes((kind,))!r}")
    size, unpack = fixed
    if i + size > end:
        raise Undecodable(f"{what}: value runs past the end of its table")
    if unpack is not None:
        value = unpack.unpack_from(data, i)[0]
        return (bool(value) if kind == 0x74 else value), i + size
    if kind == 0x54:  # T
        return timestamp(_U64.unpack_from(data, i)[0], what), i + 8
    if kind == 0x44:  # D, read as pamqp does (an unsigned mantissa)
        scale, raw = data[i], _U32.unpack_from(data, i + 1)[0]
        return decimal.Decimal(raw) * (decimal.Decimal(10) ** -scale), i + 5
    return None, i  # V and \x00


def _skip(data: bytes, i: int) -> int:
    """Where the value at `i` (its type octet) ends."""
    kind = data[i]
    if kind in _SIZED:
        size: int = _U32.unpack_from(data, i + 1)[0]
        return i + 5 + size
    fixed = _FIXED.get(kind)
    if fixed is None:
        raise Undecodable(f"unknown field type {bytes((kind,))!r}")
    return i + 1 + fixed[0]


def entries(table: bytes) -> dict[str, Encoded]:
    """Each entry of an encoded table (its uint32 length included) as its value's bytes, by key."""
    out: dict[str, Encoded] = {}
    end = 4 + _U32.unpack_from(table, 0)[0]
    i = 4
    while i < end:
        size = table[i]
        key = table[i + 1 : i + 1 + size].decode()
        i += 1 + size
        stop = _skip(table, i)
        out[key] = Encoded(table[i:stop])
        i = stop
    return out


def header_table(payload: bytes) -> bytes | None:
    """The encoded headers table (its length included) of a content-header payload, or None."""
    flags = _U16.unpack_from(payload, 12)[0]
    if not flags & 0x2000 or flags & 1:
        return None
    i = 14
    for flag in (0x8000, 0x4000):  # content_type, content_encoding: the shortstrs before it
        if flags & flag:
            i += 1 + payload[i]
    return payload[i : i + 4 + _U32.unpack_from(payload, i)[0]]


# Basic properties in wire order, with their flag bit and kind (s shortstr, o octet, t table,
# T timestamp): enough to cut a property list into its parts without decoding any of them.
_WIRE = (
    ("content_type", 0x8000, "s"),
    ("content_encoding", 0x4000, "s"),
    ("headers", 0x2000, "t"),
    ("delivery_mode", 0x1000, "o"),
    ("priority", 0x0800, "o"),
    ("correlation_id", 0x0400, "s"),
    ("reply_to", 0x0200, "s"),
    ("expiration", 0x0100, "s"),
    ("message_id", 0x0080, "s"),
    ("timestamp", 0x0040, "T"),
    ("message_type", 0x0020, "s"),
    ("user_id", 0x0010, "s"),
    ("app_id", 0x0008, "s"),
    ("cluster_id", 0x0004, "s"),
)


def property_parts(payload: bytes) -> dict[str, bytes] | None:
    """Each present property of a content-header payload as its encoded bytes (a shortstr with
    its length octet, a table with its length), nothing decoded; None when the property list is
    not one that can be cut (a continued flag word, a length past the end)."""
    try:
        flags = _U16.unpack_from(payload, 12)[0]
    except error:
        return None
    if flags & 1:
        return None
    parts: dict[str, bytes] = {}
    i = 14
    for name, flag, kind in _WIRE:
        if not flags & flag:
            continue
        if i >= len(payload):
            return None
        if kind == "s":
            end = i + 1 + payload[i]
        elif kind == "o":
            end = i + 1
        elif kind == "T":
            end = i + 8
        else:
            if i + 4 > len(payload):
                return None
            end = i + 4 + _U32.unpack_from(payload, i)[0]
        if end > len(payload):
            return None
        parts[name], i = payload[i:end], end
    return parts if i == len(payload) else None


def property_block(parts: dict[str, bytes]) -> bytes:
    """The property flags and list of these encoded parts (`property_parts`' form)."""
    flags = 0
    out = [b""]
    for name, flag, _ in _WIRE:
        if name in parts:
            flags |= flag
            out.append(parts[name])
    out[0] = _U16.pack(flags)
    return b"".join(out)


def without_entries(encoded: bytes, names: frozenset[bytes]) -> bytes | None:
    """An encoded table (its length included) without the entries whose names, as bytes, are in
    `names`; every other entry as it was. None when the table cannot be walked (an unknown type
    octet, a length past the end): then nothing can be taken out of it."""
    try:
        end = 4 + _U32.unpack_from(encoded, 0)[0]
        if end != len(encoded):
            return None
        kept: list[bytes] = []
        i = 4
        while i < end:
            start = i
            key = encoded[i + 1 : i + 1 + encoded[i]]
            i = _skip(encoded, i + 1 + encoded[i])
            if i > end:
                return None
            if key not in names:
                kept.append(encoded[start:i])
    except (IndexError, error, Undecodable):
        return None
    body = b"".join(kept)
    return _U32.pack(len(body)) + body


def edit_properties(
    payload: bytes, *, drop_headers: frozenset[bytes], persistent: bool = False
) -> bytes | None:
    """The property flags and list of a content-header payload as they arrived, without the
    headers named in `drop_headers` (a table the edit left empty goes; one sent empty stays)
    and, when `persistent`, with delivery mode 2 and no expiration. None when the payload cannot
    be cut (see `property_parts`)."""
    parts = property_parts(payload)
    if parts is None:
        return None
    if "headers" in parts and drop_headers:
        table = without_entries(parts["headers"], drop_headers)
        if table is not None:
            if len(table) == 4 and len(parts["headers"]) > 4:
                del parts["headers"]  # emptied by the edit: as if the broker had never added it
            else:
                parts["headers"] = table  # an empty table the producer sent stays, byte for byte
    if persistent:
        parts["delivery_mode"] = b"\x02"
        parts.pop("expiration", None)
    return property_block(parts)
