"""Idiomatic FastStream (RabbitBroker).

consume: ``@broker.subscriber(RabbitQueue(q, queue_type=...))`` on
``async def handle(body: dict) -> None`` (FastStream decodes JSON with orjson
when it is installed, and validates the ``dict`` annotation through
fast-depends/pydantic).  Default ack policy (``AckPolicy.REJECT_ON_ERROR``: ack
after the handler returns, reject on an unhandled exception).  Prefetch via
``default_channel=Channel(prefetch_count=...)``.  The count is taken inside the
handler (there is no hook after FastStream's ack); ``broker.stop()`` waits for
in-flight handlers (graceful_timeout) so the runner's "queue is empty" check
covers the acks.

Per-message logging: FastStream's default logger writes two INFO lines per
message ("Received"/"Processed").  By default this contender passes
``logger=None`` (what a throughput-minded deployment does, and what rabbitflow
is compared against); set ``BENCH_FASTSTREAM_LOGGING=1`` to keep FastStream's
default logger (the runner sends contender stderr to a pipe it discards).

mixed: the same subscriber, awaiting ``benchlib.mixed_handler(body)`` (1
message in 500 awaits ``asyncio.sleep(0.1)``); FastStream consumes through
aio-pika's callback, one task per delivery, so 256 handlers run at once.

publish: ``await broker.publish(doc, queue=q, persist=True)`` with the
default channel's publisher confirms, windows awaited with gather.
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

KEEP_LOGGING = os.environ.get("BENCH_FASTSTREAM_LOGGING") == "1"


def _import() -> None:
    try:
        import faststream.rabbit  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"faststream contender: cannot import faststream.rabbit ({exc!r}); "
            "pip install -r benchmarks/requirements.txt"
        ) from None


def _broker(args: argparse.Namespace) -> Any:
    _import()
    from faststream.rabbit import Channel, RabbitBroker

    kwargs: dict[str, Any] = {
        "default_channel": Channel(prefetch_count=args.prefetch),
        "graceful_timeout": 60.0,  # stop() waits for running handlers (+ their acks)
    }
    if not KEEP_LOGGING:
        kwargs["logger"] = None
    return RabbitBroker(args.url, **kwargs)


async def _consume(
    args: argparse.Namespace, rss: bool, mixed: bool = False, latency: bool = False
) -> dict[str, Any]:
    _import()
    from faststream.rabbit import QueueType, RabbitQueue

    sampler = benchlib.RssSampler() if rss else None
    counter = benchlib.Counter(args.n, on_warm=sampler.mark_warm if sampler else None)
    broker = _broker(args)
    qtype = QueueType.QUORUM if args.queue_type == "quorum" else QueueType.CLASSIC

    sub = broker.subscriber(RabbitQueue(args.queue, queue_type=qtype, durable=True))
    lat = benchlib.Latencies(args.n) if latency else None
    if lat:
        record = lat.handler

        @sub
        async def handle_latency(body: dict) -> None:  # type: ignore[type-arg]
            await record(body)
            counter.hit()

    elif mixed:
        work = benchlib.mixed_handler

        @sub
        async def handle_mixed(body: dict) -> None:  # type: ignore[type-arg]
            await work(body)
            counter.hit()

    else:

        @sub
        async def handle(body: dict) -> None:  # type: ignore[type-arg]
            counter.hit()

    if sampler:
        sampler.start()
    t0 = benchlib.start_clock()
    await broker.start()  # connects, declares, starts consuming
    t_end = await counter.done
    result = benchlib.timing_result(args.n, t0, t_end, counter)

    await broker.stop()
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
    docs = benchlib.make_messages(args.n)
    broker = _broker(args)
    await broker.connect()
    q = args.queue
    w = args.window

    t0 = benchlib.start_clock()
    for start in range(0, len(docs), w):
        await asyncio.gather(*(broker.publish(d, queue=q, persist=True) for d in docs[start : start + w]))
    t_end = benchlib.stop_clock()

    await broker.stop()
    return benchlib.timing_result(args.n, t0, t_end)


if __name__ == "__main__":
    benchlib.contender_main(
        "faststream",
        {"consume": consume, "latency": latency, "mixed": mixed, "publish": publish, "rss": rss},
        import_module="faststream.rabbit",
        notes=(
            "RabbitBroker subscriber, default ack policy (REJECT_ON_ERROR: ack after handler); "
            + ("FastStream default per-message logging ON" if KEEP_LOGGING else "logger=None")
        ),
    )
