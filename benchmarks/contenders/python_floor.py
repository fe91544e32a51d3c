"""The Python floor: the least an asyncio client does for the consume scenario, no library.

A hand-written AMQP 0-9-1 consumer on asyncio streams: pamqp marshals the handshake, and from
then on the frames are cut out of each read with `struct`, each body is orjson-decoded and handed
to a no-op handler (called inline: no task, no future), and every message gets its own basic.ack,
the acks of one read leaving in one write. It keeps none of a framework's promises (no handler
concurrency, no settlement rule, no failover, no hostile-input handling): it measures what the
interpreter and the event loop cost per message on this machine, so that the distance between
rabbitflow and the C client splits into what Python costs and what rabbitflow adds
(docs/benchmarks.md, "The ceiling").
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import struct  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import unquote, urlsplit  # noqa: E402

import benchlib  # noqa: E402

_FRAME = struct.Struct(">BHI")
_METHOD = struct.Struct(">HH")
_TAG = struct.Struct(">Q")
_SIZE = struct.Struct(">Q")
_ACK = struct.Struct(">BHIHHQBB")
DELIVER = (60, 60)


def handler(body: Any) -> None:
    """The user's handler: does no work."""


async def _handshake(
    url: str, queue: str, prefetch: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    from pamqp import commands, frame, header

    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname or "localhost", parts.port or 5672)
    writer.write(header.ProtocolHeader().marshal())
    buffer = b""

    async def expect(kind: type) -> Any:
        nonlocal buffer
        while True:
            consumed, _, value = frame.unmarshal(buffer) if len(buffer) >= 8 else (0, 0, None)
            if value is not None:
                buffer = buffer[consumed:]
                if isinstance(value, kind):
                    return value
                continue
            buffer += await reader.read(65536)

    await expect(commands.Connection.Start)
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    writer.write(
        frame.marshal(
            commands.Connection.StartOk(
                client_properties={"product": "python_floor"},
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
                locale="en_US",
            ),
            0,
        )
    )
    tune = await expect(commands.Connection.Tune)
    writer.write(frame.marshal(commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0), 0))
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    writer.write(frame.marshal(commands.Connection.Open(vhost), 0))
    await expect(commands.Connection.OpenOk)
    writer.write(frame.marshal(commands.Channel.Open(), 1))
    await expect(commands.Channel.OpenOk)
    writer.write(frame.marshal(commands.Basic.Qos(prefetch_count=prefetch), 1))
    await expect(commands.Basic.QosOk)
    writer.write(frame.marshal(commands.Basic.Consume(queue=queue), 1))
    await expect(commands.Basic.ConsumeOk)
    return reader, writer, buffer  # the first deliveries may have come with consume-ok


async def _consume(args: argparse.Namespace) -> dict[str, Any]:
    import orjson

    loads = orjson.loads
    counter = benchlib.Counter(args.n)
    t0 = benchlib.start_clock()
    reader, writer, first = await _handshake(benchlib.AMQP_URL, args.queue, args.prefetch)
    pack_ack, unpack_from = _ACK.pack, _FRAME.unpack_from
    buffer = bytearray(first)
    tag = 0
    size = 0  # the body size of the delivery being read; 0 between deliveries
    body = bytearray()
    handled = 0
    read_first = not buffer
    while handled < args.n:
        if read_first:
            chunk = await reader.read(262144)
            if not chunk:
                raise RuntimeError("the broker closed the connection")
            buffer += chunk
        read_first = True
        acks = []
        offset, end = 0, len(buffer)
        while end - offset >= 8:
            kind, _, length = unpack_from(buffer, offset)
            if end - offset < length + 8:
                break
            start = offset + 7
            if kind == 1:
                if _METHOD.unpack_from(buffer, start) == DELIVER:
                    at = start + 4
                    at += 1 + buffer[at]  # consumer tag
                    tag = _TAG.unpack_from(buffer, at)[0]
            elif kind == 2:
                size = _SIZE.unpack_from(buffer, start + 4)[0]
                body = bytearray()
                if size == 0:
                    handler(b"")
            elif kind == 3:
                body += buffer[start : start + length]
                if len(body) >= size:
                    handler(loads(body))
                    acks.append(pack_ack(1, 1, 13, 60, 80, tag, 0, 0xCE))
                    handled += 1
                    counter.hit()
            offset += length + 8
        del buffer[:offset]
        if acks:
            writer.write(b"".join(acks))
    t_end = await counter.done
    result = benchlib.timing_result(args.n, t0, t_end, counter)
    # A closing handshake, not a dropped socket: the broker applies every ack before close-ok (a
    # quorum queue settles acks through its log; a connection cut short returns the late ones).
    from pamqp import commands, frame

    writer.write(
        frame.marshal(
            commands.Connection.Close(reply_code=200, reply_text="done", class_id=0, method_id=0), 0
        )
    )
    await writer.drain()
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        async with asyncio.timeout(10):
            while await reader.read(65536):
                pass  # until the broker closes after close-ok
    writer.close()
    return result


def main() -> None:
    benchlib.contender_main(
        "python_floor",
        {"consume": _consume},
        import_module="orjson",
        notes="no library: asyncio streams, struct-cut frames, an inline no-op handler, "
        "basic.ack per message (the acks of one read in one write); keeps no framework promise",
    )


if __name__ == "__main__":
    main()
