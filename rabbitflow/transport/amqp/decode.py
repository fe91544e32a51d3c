"""The frames rabbitflow's connections receive, decoded here rather than by pamqp.

Hot path: every delivery is three frames (basic.deliver, content header, body). pamqp decodes
a basic.deliver in ~20 us and a content header with two headers in ~30 us (measured on the
benchmark machine); the decoders here take a fraction of that (`tests/transport/test_wire.py` checks they
give pamqp's values). The consume scenario of `benchmarks/` measures the whole path.

Tolerance: pamqp raises on a content header it cannot decode (a content type that is not UTF-8,
a timestamp past the year 9999, a header name that is not UTF-8), inside aiormq's frame reader,
which ends the connection; the broker redelivers the message, and the connection drops again,
for ever. Here such a header becomes a `ContentHeader` whose `undecodable` says what failed, with
every property that could be read, and the message is parked by the consumer (rejected to its
parking queue, every byte intact). `Header.payload` keeps the frame's bytes for exact copies.

The hook: aiormq builds its `FrameReceiver` by module-level name in `Connection.connect`; `install`
replaces that name with a factory that builds a `Receiver` only inside `receiving()` (rabbitflow's
own connect), so every other aiormq connection of the process keeps aiormq's own receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from struct import Struct, error
from typing import Any

import pamqp.frame
from aiormq.exceptions import AMQPConnectionError, InvalidFrameError, ProtocolSyntaxError
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.exceptions import PAMQPException
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from rabbitflow.transport.amqp import internals
from rabbitflow.transport.amqp.tables import Undecodable, decode_table, timestamp

__all__ = ["Header", "Receiver", "content_header", "install", "method", "receiving"]

_FRAME_HEAD = Struct(">BHI")
_HEADER_HEAD = Struct(">HHQH")
_U32 = Struct(">I")
_U64 = Struct(">Q")
_DELIVER = b"\x00\x3c\x00\x3c"
_ACK = b"\x00\x3c\x00\x50"

# (attribute, flag bit, kind) in wire order; kinds: 0 shortstr, 1 octet, 2 table, 3 timestamp.
_KINDS = {"shortstr": 0, "octet": 1, "table": 2, "timestamp": 3}
_PROPERTIES = tuple(
    (name, Basic.Properties.flags[name], _KINDS[Basic.Properties.amqp_type(name)])
    for name in Basic.Properties.__slots__
)
_NEW = Basic.Properties.__new__
_Properties = Basic.Properties


class Header(ContentHeader):
    """A content header as received: pamqp's, plus the frame's bytes and what could not be
    decoded (None when everything could)."""

    payload: bytes
    undecodable: str | None


def content_header(payload: bytes) -> Header:
    """The content header of this frame payload; a property that cannot be decoded is left
    None and named in `undecodable`, the rest is read."""
    header = Header.__new__(Header)
    header.class_id, header.weight, header.body_size, flags = _HEADER_HEAD.unpack_from(payload, 0)
    header.payload = payload
    problems: list[str] = []
    properties = _NEW(_Properties)
    properties.content_type = properties.content_encoding = properties.headers = None
    properties.delivery_mode = properties.priority = properties.correlation_id = None
    properties.reply_to = properties.expiration = properties.message_id = None
    properties.timestamp = properties.message_type = properties.user_id = properties.app_id = None
    properties.cluster_id = ""
    i = 14
    more = flags & 1
    while more and i + 2 <= len(payload):  # continued flag words: no basic property uses one
        more = payload[i + 1] & 1
        i += 2
    try:
        for name, flag, kind in _PROPERTIES:
            if not flags & flag:
                continue
            if kind == 0:
                j = i + 1 + payload[i]
                if j > len(payload):
                    raise Undecodable(f"{name}: runs past the end of the frame")
                try:
                    setattr(properties, name, payload[i + 1 : j].decode())
                except UnicodeDecodeError:
                    problems.append(f"{name} {payload[i + 1 : j][:100]!r} is not UTF-8")
                i = j
            elif kind == 1:
                setattr(properties, name, payload[i])
                i += 1
            elif kind == 2:
                j = i + 4 + _U32.unpack_from(payload, i)[0]
                if j > len(payload):
                    raise Undecodable(f"{name}: runs past the end of the frame")
                try:
                    properties.headers = decode_table(payload, i + 4, j)
                except Undecodable as exc:
                    problems.append(str(exc))
                i = j
            else:
                try:
                    properties.timestamp = timestamp(_U64.unpack_from(payload, i)[0], name)
                except Undecodable as exc:
                    problems.append(str(exc))
                i += 8
    except (IndexError, error):
        problems.append("the properties run past the end of the frame")
    except Undecodable as exc:
        problems.append(str(exc))
    header.properties = properties
    header.undecodable = "; ".join(problems)[:1000] if problems else None
    return header


def _short(payload: bytes, i: int) -> tuple[str, int]:
    size = payload[i]
    return payload[i + 1 : i + 1 + size].decode(), i + 1 + size


def method(payload: bytes) -> Any:
    """basic.deliver and basic.ack, the method frames of every message, without pamqp's generic
    unmarshal; None for any other method (pamqp's then)."""
    index = payload[:4]
    if index == _DELIVER:
        deliver = Basic.Deliver.__new__(Basic.Deliver)
        deliver.consumer_tag, i = _short(payload, 4)
        deliver.delivery_tag = _U64.unpack_from(payload, i)[0]
        deliver.redelivered = bool(payload[i + 8] & 1)
        deliver.exchange, i = _short(payload, i + 9)
        deliver.routing_key, i = _short(payload, i)
        return deliver
    if index == _ACK:
        ack = Basic.Ack.__new__(Basic.Ack)
        ack.delivery_tag = _U64.unpack_from(payload, 4)[0]
        ack.multiple = bool(payload[12] & 1)
        return ack
    return None


class Receiver(internals.FrameReceiver):
    """aiormq's frame receiver, with rabbitflow's decoders for content headers, bodies, and the
    basic.deliver and basic.ack methods; every other frame is pamqp's."""

    async def get_frame(self) -> Any:
        reader = self.reader
        if reader.at_eof():
            del self.reader
            raise StopAsyncIteration
        async with self.lock:
            try:
                head = await reader.readexactly(7)
                if not self.started and head.startswith(b"AMQP"):
                    raise ProtocolSyntaxError("Unexpected AMQP protocol header")
                self.started = True
                kind, channel, size = _FRAME_HEAD.unpack(head)
                rest = await reader.readexactly(size + 1)
            except asyncio.IncompleteReadError as e:
                raise AMQPConnectionError(
                    "Server connection unexpectedly closed. "
                    f"Read {len(e.partial)} bytes but {e.expected} bytes expected",
                ) from e
            except OSError as e:  # ConnectionError and the rest, as aiormq words them
                raise AMQPConnectionError(f"Server connection error: {e!r}") from e
        if rest[-1] != 0xCE:
            raise InvalidFrameError("Last byte error")
        payload = rest[:-1]
        frame: Any = None
        try:
            if kind == 3:
                frame = ContentBody(payload)
            elif kind == 2:
                frame = content_header(payload)
            elif kind == 1:
                frame = method(payload)
            elif kind == 8:
                frame = Heartbeat()
        except (IndexError, error, UnicodeDecodeError):
            frame = None  # pamqp's decoder says what is wrong with it
        if frame is None:
            try:
                return pamqp.frame.unmarshal(head + rest)
            except PAMQPException as e:
                raise InvalidFrameError(str(e)) from e
        return size + 8, channel, frame


_RECEIVING: ContextVar[bool] = ContextVar("rabbitflow_receiving", default=False)


def _receiver(reader: asyncio.StreamReader) -> internals.FrameReceiver:
    if _RECEIVING.get():
        # Once: aiormq's own tasks (and the user's handlers) started from this connection's
        # context make their connections with aiormq's receiver.
        _RECEIVING.set(False)
        return Receiver(reader)
    return internals.aiormq_receiver(reader)  # type: ignore[no-any-return]


def install() -> bool:
    """Let `receiving()` connections use `Receiver`; False when this aiormq builds its receiver
    some other way, or the patches are off (then pamqp decodes, as before)."""
    return internals.swap_frame_receiver(_receiver)


@contextlib.contextmanager
def receiving() -> Iterator[None]:
    """Connections opened inside decode their frames with `Receiver`."""
    token = _RECEIVING.set(install())
    try:
        yield
    finally:
        _RECEIVING.reset(token)


class _ExpectedLoss(logging.Filter):
    """aiormq logs every lost connection with its traceback ("Cancelling cause reader exited
    abnormally", WARNING). A lost connection is a failover rabbitflow expects and reports in one
    line of its own ("connection to ... lost (...); failing over"); the traceback stays for
    anything else the reader dies of (a malformed frame)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "Cancelling cause reader exited abnormally" or not record.exc_info:
            return True
        lost = AMQPConnectionError | ConnectionError | asyncio.IncompleteReadError
        return not isinstance(record.exc_info[1], lost)


logging.getLogger("aiormq.connection").addFilter(_ExpectedLoss())
