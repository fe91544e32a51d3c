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

Routing: the deliveries of rabbitflow's own consumers do not go through aiormq at all. The
receiver parses what one read of the socket brought, and a basic.deliver whose consumer tag is
routed (`Receiver.route`) becomes a `Delivery` handed to its route (which starts the consumer's
task) as soon as its header and body are parsed; everything else goes to aiormq, in order. Per
message that saves aiormq's channel queue (three hops), its channel reader, a `DeliveredMessage`,
a `TaskWrapper` and its future store (the consume scenario: ~3x less client CPU per message).

The hook: aiormq builds its `FrameReceiver` by module-level name in `Connection.connect`; `install`
replaces that name with a factory that builds a `Receiver` only inside `receiving()` (rabbitflow's
own connect), so every other aiormq connection of the process keeps aiormq's own receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterator
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
from rabbitflow.transport.base import Delivery

__all__ = ["Header", "Receiver", "Route", "content_header", "install", "method", "properties", "receiving"]

_FRAME_HEAD = Struct(">BHI")
_HEADER_HEAD = Struct(">HHQH")
_SIZE_FLAGS = Struct(">QH")
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
_HEARTBEAT = Heartbeat()
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
    header.properties, header.undecodable = properties(payload, flags)
    return header


# flag word -> (attribute, kind) of each property it says is there, in wire order
_PRESENT: dict[int, tuple[tuple[str, int], ...]] = {}


def properties(payload: bytes, flags: int) -> tuple[Basic.Properties, str | None]:
    """The properties of a content-header payload whose first flag word is `flags`, and what of
    them could not be decoded (None when everything could)."""
    problems: list[str] | None = None
    properties = _NEW(_Properties)
    properties.content_type = properties.content_encoding = properties.headers = None
    properties.delivery_mode = properties.priority = properties.correlation_id = None
    properties.reply_to = properties.expiration = properties.message_id = None
    properties.timestamp = properties.message_type = properties.user_id = properties.app_id = None
    properties.cluster_id = ""
    if not flags & 0xFFFE:
        return properties, None
    present = _PRESENT.get(flags)
    if present is None:
        present = tuple((name, kind) for name, flag, kind in _PROPERTIES if flags & flag)
        if len(_PRESENT) < 4096:
            _PRESENT[flags] = present
    i = 14
    more = flags & 1
    while more and i + 2 <= len(payload):  # continued flag words: no basic property uses one
        more = payload[i + 1] & 1
        i += 2
    try:
        for name, kind in present:
            if kind == 0:
                j = i + 1 + payload[i]
                if j > len(payload):
                    raise Undecodable(f"{name}: runs past the end of the frame")
                try:
                    setattr(properties, name, payload[i + 1 : j].decode())
                except UnicodeDecodeError:
                    problems = problems or []
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
                    problems = problems or []
                    problems.append(str(exc))
                i = j
            else:
                try:
                    properties.timestamp = timestamp(_U64.unpack_from(payload, i)[0], name)
                except Undecodable as exc:
                    problems = problems or []
                    problems.append(str(exc))
                i += 8
    except (IndexError, error):
        problems = problems or []
        problems.append("the properties run past the end of the frame")
    except Undecodable as exc:
        problems = problems or []
        problems.append(str(exc))
    return properties, "; ".join(problems)[:1000] if problems else None


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


# What one read of the socket asks for: the deliveries a prefetch window of small messages makes
# come in one or a few reads, and each read's frames are parsed in one pass.
_READ_SIZE = 256 * 1024

Route = Callable[[Delivery], None]
"""Takes a delivery of one of rabbitflow's consumers, in the connection's reader (it must not
block: it starts the consumer's task, or hands a reply over)."""


class Receiver(internals.FrameReceiver):
    """aiormq's frame receiver, with rabbitflow's decoders, reading what the socket has in one
    go rather than a frame at a time.

    The deliveries of rabbitflow's own consumers (`route`) go from here straight to the consumer:
    basic.deliver, its content header and body frames are assembled into a `Delivery` as they
    are parsed, without aiormq's channel queue, its channel reader, a `DeliveredMessage` and the
    extra task aiormq wraps around each consumer callback. Every other frame is handed to aiormq
    as before, in order. A read that only brought routed deliveries hands aiormq a heartbeat, so
    that its clock of the last frame seen goes on (it closes a connection it thinks silent)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self._rest = b""  # the start of a frame the last read cut
        self._pending: deque[tuple[int, int, Any]] = deque()  # parsed frames for aiormq
        self._routes: dict[int, dict[str, Route]] = {}  # channel -> consumer tag -> route
        # channel -> the routed delivery being assembled: [route, tag, redelivered, exchange,
        # routing key, header or None, body chunks, body bytes still to come]
        self._content: dict[int, list[Any]] = {}

    # -- routes ------------------------------------------------------------------------------

    def route(self, channel: int, routes: dict[str, Route]) -> None:
        """Deliveries on `channel` whose consumer tag is in `routes` (a dict its owner keeps up to
        date) go to that route; others to aiormq."""
        self._routes[channel] = routes

    def unroute(self, channel: int, routes: dict[str, Route]) -> None:
        if self._routes.get(channel) is routes:  # not a later channel that got the same number
            del self._routes[channel]
            self._content.pop(channel, None)

    # -- reading -----------------------------------------------------------------------------

    async def get_frame(self) -> Any:
        pending = self._pending
        while not pending:
            await self._read()
        return pending.popleft()

    async def _read(self) -> None:
        reader = self.reader
        rest = self._rest
        if not rest and reader.at_eof():
            del self.reader
            raise StopAsyncIteration
        try:
            chunk = await reader.read(_READ_SIZE)
        except OSError as e:  # ConnectionError and the rest, as aiormq words them
            raise AMQPConnectionError(f"Server connection error: {e!r}") from e
        if not chunk:
            expected = _FRAME_HEAD.unpack_from(rest)[2] + 8 if len(rest) >= 7 else 7
            raise AMQPConnectionError(
                "Server connection unexpectedly closed. "
                f"Read {len(rest)} bytes but {expected} bytes expected",
            )
        data = rest + chunk if rest else chunk
        if not self.started:
            if data.startswith(b"AMQP"):
                raise ProtocolSyntaxError("Unexpected AMQP protocol header")
            self.started = True
        self._rest = data[self._parse(data) :]

    def _parse(self, data: bytes) -> int:
        """Parse the whole frames of `data`: routed deliveries go to their route, the rest to
        `_pending`; returns where the first incomplete frame starts."""
        pending = self._pending
        routes = self._routes
        content = self._content
        unpack = _FRAME_HEAD.unpack_from
        size_of_data = len(data)
        routed = False
        i = 0
        while size_of_data - i >= 8:
            kind, channel, size = unpack(data, i)
            start = i + 7
            end = start + size
            if end >= size_of_data:
                break
            if data[end] != 0xCE:
                raise InvalidFrameError("Last byte error")
            i = end + 1
            if routes:
                if kind == 1:
                    if data[start : start + 4] == _DELIVER and channel in routes:
                        after = self._deliver(data, start, end, channel)
                        if after >= 0:
                            routed = True
                            i = after
                            continue
                    elif channel in content:  # a method where content should go on
                        del content[channel]
                elif kind == 2 or kind == 3:
                    assembling = content.get(channel)
                    if assembling is not None:
                        routed = True
                        self._more(assembling, channel, kind, data[start:end])
                        continue
            payload = data[start:end]
            frame: Any = None
            try:
                if kind == 3:
                    frame = ContentBody(payload)
                elif kind == 2:
                    frame = content_header(payload)
                elif kind == 1:
                    frame = method(payload)
                elif kind == 8:
                    frame = _HEARTBEAT
            except (IndexError, error, UnicodeDecodeError):
                frame = None  # pamqp's decoder says what is wrong with it
            if frame is None:
                try:
                    pending.append(pamqp.frame.unmarshal(data[start - 7 : end + 1]))
                except PAMQPException as e:
                    raise InvalidFrameError(str(e)) from e
                continue
            pending.append((size + 8, channel, frame))
        if routed and not pending:
            pending.append((0, 0, _HEARTBEAT))
        return i

    def _deliver(self, data: bytes, start: int, end: int, channel: int) -> int:
        """A basic.deliver on a routed channel: hand it to its consumer's route, or start
        assembling it; returns where parsing goes on (-1: not a routed consumer's, aiormq's)."""
        try:
            i = start + 5 + data[start + 4]
            route = self._routes[channel].get(data[start + 5 : i].decode())
            if route is None:
                return -1
            tag = _U64.unpack_from(data, i)[0]
            redelivered = bool(data[i + 8] & 1)
            i += 9
            e = i + 1 + data[i]
            exchange = data[i + 1 : e].decode()
            k = e + 1 + data[e]
            routing_key = data[e + 1 : k].decode()
            if k > end:
                return -1
        except (IndexError, error, UnicodeDecodeError):
            return -1  # pamqp's decoder says what is wrong with it
        # The common case: its content header and its one body frame follow, whole.
        i = end + 1
        available = len(data)
        if available - i < 22:  # less than the smallest content header frame
            self._content[channel] = [route, tag, redelivered, exchange, routing_key, None, [], 0]
            return i
        kind, number, size = _FRAME_HEAD.unpack_from(data, i)
        j: int = i + 7 + size
        if kind != 2 or number != channel or j >= available or data[j] != 0xCE:
            self._content[channel] = [route, tag, redelivered, exchange, routing_key, None, [], 0]
            return i
        payload = data[i + 7 : j]
        try:
            body_size, flags = _SIZE_FLAGS.unpack_from(payload, 4)
        except error as e:
            raise InvalidFrameError(f"undecodable content header: {e}") from e
        properties_, undecodable = properties(payload, flags)
        i = j + 1
        body = b""
        if body_size:
            kind, number, size = _FRAME_HEAD.unpack_from(data, i) if available - i >= 8 else (0, 0, 0)
            j = i + 7 + size
            if kind != 3 or number != channel or size != body_size or j >= available or data[j] != 0xCE:
                header = content_header(payload)
                self._content[channel] = [
                    route,
                    tag,
                    redelivered,
                    exchange,
                    routing_key,
                    header,
                    [],
                    body_size,
                ]
                return i  # its body frames are assembled as they come
            body = data[i + 7 : j]
            i = j + 1
        route(Delivery(body, properties_, tag, redelivered, exchange, routing_key, payload, undecodable))
        return i

    def _more(self, assembling: list[Any], channel: int, kind: int, payload: bytes) -> None:
        """A content header or body frame of the routed delivery `assembling`; hands the delivery
        to its route once its body is complete."""
        if kind == 2:
            if assembling[5] is not None:
                raise InvalidFrameError("a second content header for one delivery")
            try:
                header = content_header(payload)
            except (IndexError, error) as e:
                raise InvalidFrameError(f"undecodable content header: {e}") from e
            assembling[5] = header
            assembling[7] = header.body_size
            if header.body_size:
                return
            body = b""
        else:
            if assembling[5] is None:
                raise InvalidFrameError("a content body before its header")
            chunks = assembling[6]
            chunks.append(payload)
            assembling[7] -= len(payload)
            if assembling[7] > 0:
                return
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        del self._content[channel]
        route, tag, redelivered, exchange, routing_key, header = assembling[:6]
        route(
            Delivery(
                body,
                header.properties,
                tag,
                redelivered,
                exchange,
                routing_key,
                header.payload,
                header.undecodable,
            )
        )


# Inside `receiving()`: the list the connection's Receiver is put in (at most one).
_RECEIVING: ContextVar[list[Receiver] | None] = ContextVar("rabbitflow_receiving", default=None)


def _receiver(reader: asyncio.StreamReader) -> internals.FrameReceiver:
    made = _RECEIVING.get()
    if made is not None and not made:
        # Once: aiormq's own tasks (and the user's handlers) started from this connection's
        # context make their connections with aiormq's receiver.
        receiver = Receiver(reader)
        made.append(receiver)
        return receiver
    return internals.aiormq_receiver(reader)  # type: ignore[no-any-return]


def install() -> bool:
    """Let `receiving()` connections use `Receiver`; False when this aiormq builds its receiver
    some other way, or the patches are off (then pamqp decodes, as before)."""
    return internals.swap_frame_receiver(_receiver)


@contextlib.contextmanager
def receiving() -> Iterator[list[Receiver]]:
    """The connection opened inside decodes its frames with a `Receiver`, which is put in the
    list this yields (which stays empty when the patches are off)."""
    made: list[Receiver] = []
    token = _RECEIVING.set(made if install() else None)
    try:
        yield made
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
