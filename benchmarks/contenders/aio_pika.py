"""Idiomatic aio-pika.

consume: ``connect_robust`` -> channel with ``set_qos(prefetch)`` ->
``declare_queue`` (same arguments as the runner's) -> ``queue.consume(cb)``
where cb does ``async with message.process():`` around orjson-decode + the
no-op handler (ack on exit, reject on exception).

mixed: the same, with ``benchlib.mixed_handler`` as the handler (1 message in
500 awaits ``asyncio.sleep(0.1)``); each delivery runs in its own task.

publish: ``channel.default_exchange.publish(Message(...))`` on a confirm
channel (aio-pika's default), windows of publishes awaited with gather.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import asyncio  # noqa: E402
from typing import Any  # noqa: E402

import benchlib  # noqa: E402


async def handler(body: Any) -> None:
    """The user's handler: does no work."""


async def _consume(
    args: argparse.Namespace, rss: bool, mixed: bool = False, latency: bool = False
) -> dict[str, Any]:
    import aio_pika
    import orjson

    sampler = benchlib.RssSampler() if rss else None
    counter = benchlib.Counter(args.n, on_warm=sampler.mark_warm if sampler else None)
    loads = orjson.loads
    lat = benchlib.Latencies(args.n) if latency else None
    handle = lat.handler if lat else benchlib.mixed_handler if mixed else handler
    if sampler:
        sampler.start()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            await handle(loads(message.body))
        counter.hit()

    t0 = benchlib.start_clock()
    conn = await aio_pika.connect_robust(args.url)
    ch = await conn.channel()
    await ch.set_qos(prefetch_count=args.prefetch)
    queue = await ch.declare_queue(
        args.queue, durable=True, arguments=benchlib.queue_arguments(args.queue_type)
    )
    tag = await queue.consume(on_message)
    t_end = await counter.done
    result = benchlib.timing_result(args.n, t0, t_end, counter)

    await queue.cancel(tag)
    await conn.close()
    if sampler:
        result.update(await sampler.stop())
    if lat:
        result.update(lat.summary())
    return result


async def consume(args: argparse.Namespace) -> dict[str, Any]:
    return await _consume(args, rss=False)


async def rss(args: argparse.Namespace) -> dict[str, Any]:
    return await _consume(args, rss=True)


async def mixed(args: argparse.Namespace) -> dict[str, Any]:
    return await _consume(args, rss=False, mixed=True)


async def latency(args: argparse.Namespace) -> dict[str, Any]:
    return await _consume(args, rss=False, latency=True)


async def publish(args: argparse.Namespace) -> dict[str, Any]:
    import aio_pika
    import orjson

    docs = benchlib.make_messages(args.n)
    conn = await aio_pika.connect_robust(args.url)
    ch = await conn.channel()  # publisher_confirms=True is aio-pika's default
    exchange = ch.default_exchange
    dumps = orjson.dumps
    q = args.queue
    w = args.window

    def message(doc: dict[str, Any]) -> aio_pika.Message:
        return aio_pika.Message(
            dumps(doc),
            content_type=benchlib.CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    t0 = benchlib.start_clock()
    for start in range(0, len(docs), w):
        await asyncio.gather(*(exchange.publish(message(d), routing_key=q) for d in docs[start : start + w]))
    t_end = benchlib.stop_clock()

    await conn.close()
    return benchlib.timing_result(args.n, t0, t_end)


if __name__ == "__main__":
    benchlib.contender_main(
        "aio_pika",
        {"consume": consume, "latency": latency, "mixed": mixed, "publish": publish, "rss": rss},
        import_module="aio_pika",
        notes="connect_robust; async with message.process() (ack after handler)",
    )
