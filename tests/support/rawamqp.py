"""Content headers as bytes, written and read by the tests' own code (not rabbitflow's), to publish
what no Python client would encode (all AMQP field types, hostile bytes) and to see exactly what
a copy carries: each property's and each header's bytes, type octet included."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from typing import Any

import aiormq
from pamqp.base import Frame
from pamqp.commands import Basic, Connection
from pamqp.commands import Channel as ChannelMethods
from pamqp.frame import marshal, unmarshal

from ..helpers import BROKER_HOST, BROKER_PORT

# Basic properties in wire order: (name, flag, kind) with kinds s shortstr, o octet, t table, T u64.
PROPERTIES = (
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
    ("type", 0x0020, "s"),
    ("user_id", 0x0010, "s"),
    ("app_id", 0x0008, "s"),
)
_FIXED = {
    "t": 1,
    "b": 1,
    "B": 1,
    "s": 2,
    "u": 2,
    "I": 4,
    "i": 4,
    "l": 8,
    "L": 8,
    "f": 4,
    "d": 8,
    "D": 5,
    "T": 8,
    "V": 0,
}


def shortstr(raw: bytes) -> bytes:
    return bytes((len(raw),)) + raw


def longstr(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def table(entries: Mapping[bytes, bytes]) -> bytes:
    """A field table from already encoded entries: name bytes -> type octet and value bytes."""
    return longstr(b"".join(shortstr(key) + value for key, value in entries.items()))


def properties(values: Mapping[str, bytes]) -> bytes:
    """Property flags and list from each present property's encoded bytes (a table's with its
    length, a shortstr's with its length octet)."""
    flags = 0
    parts = []
    for name, flag, _ in PROPERTIES:
        if name in values:
            flags |= flag
            parts.append(values[name])
    return struct.pack(">H", flags) + b"".join(parts)


def read_properties(payload: bytes) -> dict[str, bytes]:
    """Each present property of a content-header payload, as its bytes."""
    (flags,) = struct.unpack_from(">H", payload, 12)
    i, out = 14, {}
    for name, flag, kind in PROPERTIES:
        if not flags & flag:
            continue
        if kind == "s":
            end = i + 1 + payload[i]
        elif kind == "o":
            end = i + 1
        elif kind == "T":
            end = i + 8
        else:
            end = i + 4 + struct.unpack_from(">I", payload, i)[0]
        out[name], i = payload[i:end], end
    return out


def read_table(raw: bytes) -> dict[bytes, bytes]:
    """Each entry of an encoded table: name bytes -> type octet and value bytes."""
    end, i, out = 4 + struct.unpack_from(">I", raw, 0)[0], 4, {}
    while i < end:
        key = raw[i + 1 : i + 1 + raw[i]]
        i += 1 + raw[i]
        kind = chr(raw[i])
        size = _FIXED[kind] if kind in _FIXED else 4 + struct.unpack_from(">I", raw, i + 1)[0]
        out[key], i = raw[i : i + 1 + size], i + 1 + size
    return out


class RawProperties(Basic.Properties):
    """Properties that aiormq sends as the given bytes (flags and property list) when it marshals
    a content header: what a producer that encodes by hand would publish."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self.raw = raw

    def marshal(self) -> bytes:
        return self.raw


async def publish_raw(
    channel: aiormq.abc.AbstractChannel, body: bytes, raw: bytes, *, exchange: str = "", routing_key: str
) -> None:
    """Publish with these property bytes, confirmed (aiormq gives the object a message id for its
    own bookkeeping; the bytes sent are `raw`)."""
    await channel.basic_publish(
        body, exchange=exchange, routing_key=routing_key, properties=RawProperties(raw)
    )


async def get_all(queue: str) -> list[tuple[bytes, bytes]]:
    """Every message of `queue` as (content-header payload, body), taken with basic.get over a
    socket of the tests' own: neither aiormq nor rabbitflow decodes anything of it."""
    reader, writer = await asyncio.open_connection(BROKER_HOST, BROKER_PORT)

    async def frame() -> tuple[int, bytes, Any]:
        head = await reader.readexactly(7)
        kind, _, size = struct.unpack(">BHI", head)
        rest = await reader.readexactly(size + 1)
        method = unmarshal(head + rest)[2] if kind == 1 else None
        return kind, rest[:-1], method

    def send(method: Frame, channel: int = 0) -> None:
        writer.write(marshal(method, channel))

    try:
        writer.write(b"AMQP\x00\x00\x09\x01")
        await frame()  # connection.start
        send(Connection.StartOk(client_properties={}, mechanism="PLAIN", response="\0guest\0guest"))
        tune = (await frame())[2]
        send(Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0))
        send(Connection.Open(virtual_host="/"))
        await frame()
        send(ChannelMethods.Open(), 1)
        await frame()
        out = []
        while True:
            send(Basic.Get(queue=queue, no_ack=True), 1)
            _, _, method = await frame()
            if isinstance(method, Basic.GetEmpty):
                return out
            _, header, _ = await frame()
            (size,) = struct.unpack_from(">Q", header, 4)
            body = b""
            while len(body) < size:
                body += (await frame())[1]
            out.append((header, body))
    finally:
        writer.close()
        await writer.wait_closed()


def entries_of(header: bytes) -> dict[str, Any]:
    """A content header's properties and header entries as bytes: {"headers": {name: bytes},
    property: bytes}."""
    props: dict[str, Any] = dict(read_properties(header))
    if "headers" in props:
        props["headers"] = read_table(props["headers"])
    return props
