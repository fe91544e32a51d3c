"""Baseline: a plain aiormq loop, no framework.

consume: basic_consume with a callback that orjson-decodes the body, awaits a
no-op handler and then ``await channel.basic_ack(tag)`` for every message.

mixed: the same loop (each delivery runs in aiormq's own callback task), with
``benchlib.mixed_handler`` as the handler: 1 message in 500 awaits
``asyncio.sleep(0.1)``; each message is acked on its own after its handler.

The ``aiormq_batched`` contender (see aiormq_batched.py) reuses this file with
``BATCHED = True``: it acks every 64th delivery tag with ``multiple=True`` (and
the remainder at the end).  That is not something a framework that acks each
message after its handler can do; it is reported as the client ceiling.

publish: ``basic_publish`` on a confirm channel, windows of ``--window``
publishes in flight awaited together with asyncio.gather.

retry: the delayed-retry pattern written by hand, with the guarantees rabbitflow
keeps: a ``{queue}.retry`` queue (TTL 50 ms, dead-lettering back to ``{queue}``
through the default exchange); a failed delivery is copied there persistent and
mandatory with an attempt header on a confirm channel, and acked only after the
broker confirmed the copy. ``--mode fail_once`` fails every first attempt,
``--mode all_ok`` none. No parking, no forged-header check, no ladder: the
least a hand-rolled loop does.
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

ACK_EVERY = 64
RETRY_TTL_MS = 50


async def handler(body: Any) -> None:
    """The user's handler: does no work."""


async def _consume(
    args: argparse.Namespace, batched: bool, rss: bool, mixed: bool = False, latency: bool = False
) -> dict[str, Any]:
    import aiormq
    import orjson

    sampler = benchlib.RssSampler() if rss else None
    counter = benchlib.Counter(args.n, on_warm=sampler.mark_warm if sampler else None)
    loads = orjson.loads
    n = args.n
    lat = benchlib.Latencies(n) if latency else None
    handle = lat.handler if lat else benchlib.mixed_handler if mixed else handler
    if sampler:
        sampler.start()

    t0 = benchlib.start_clock()
    conn = await aiormq.connect(args.url)
    ch = await conn.channel()
    await ch.basic_qos(prefetch_count=args.prefetch)

    if batched:
        handled = 0

        async def on_message(msg: aiormq.abc.DeliveredMessage) -> None:
            nonlocal handled
            await handle(loads(msg.body))
            handled += 1  # no await between the handler and this line
            c = handled
            if c % ACK_EVERY == 0 or c == n:
                await ch.basic_ack(msg.delivery_tag, multiple=True)
            counter.hit()

    else:

        async def on_message(msg: aiormq.abc.DeliveredMessage) -> None:
            await handle(loads(msg.body))
            await ch.basic_ack(msg.delivery_tag)
            counter.hit()

    ok = await ch.basic_consume(args.queue, on_message)
    t_end = await counter.done
    result = benchlib.timing_result(n, t0, t_end, counter)

    await ch.basic_cancel(ok.consumer_tag)
    await conn.close()
    if sampler:
        result.update(await sampler.stop())
    if lat:
        result.update(lat.summary())
    return result


async def _publish(args: argparse.Namespace) -> dict[str, Any]:
    import aiormq
    import orjson

    docs = benchlib.make_messages(args.n)
    props = aiormq.spec.Basic.Properties(content_type=benchlib.CONTENT_TYPE, delivery_mode=2)
    conn = await aiormq.connect(args.url)
    ch = await conn.channel(publisher_confirms=True)
    dumps = orjson.dumps
    q = args.queue
    w = args.window

    t0 = benchlib.start_clock()
    for start in range(0, len(docs), w):
        confirms = await asyncio.gather(
            *(ch.basic_publish(dumps(d), routing_key=q, properties=props) for d in docs[start : start + w])
        )
        for c in confirms:
            if not isinstance(c, aiormq.spec.Basic.Ack):
                raise RuntimeError(f"publish not acked: {c!r}")
    t_end = benchlib.stop_clock()

    await conn.close()
    return benchlib.timing_result(args.n, t0, t_end)


async def _retry(args: argparse.Namespace) -> dict[str, Any]:
    import aiormq
    import orjson

    if args.mode not in ("fail_once", "all_ok"):
        raise SystemExit(f"retry needs --mode fail_once|all_ok, got {args.mode!r}")
    fail_once = args.mode == "fail_once"
    counter = benchlib.Counter(args.n)
    loads = orjson.loads
    queue, retry_queue = args.queue, f"{args.queue}.retry"
    Properties, Ack = aiormq.spec.Basic.Properties, aiormq.spec.Basic.Ack

    t0 = benchlib.start_clock()
    conn = await aiormq.connect(args.url)
    ch = await conn.channel()
    pub = await conn.channel(publisher_confirms=True)
    await ch.queue_declare(
        retry_queue,
        durable=True,
        arguments={
            **benchlib.queue_arguments(args.queue_type),
            # as rabbitflow's quorum retry queues: dead-lettering back is at-least-once
            **(
                {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
                if args.queue_type == "quorum"
                else {}
            ),
            "x-message-ttl": RETRY_TTL_MS,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
        },
    )
    await ch.basic_qos(prefetch_count=args.prefetch)

    async def on_message(msg: aiormq.abc.DeliveredMessage) -> None:
        body = loads(msg.body)
        props = msg.header.properties
        headers = props.headers or {}
        attempt = headers.get("x-attempt", 1)
        if fail_once and attempt == 1:
            copy = Properties(
                content_type=props.content_type,
                delivery_mode=2,
                message_id=props.message_id,
                headers={**headers, "x-attempt": attempt + 1},
            )
            confirm = await pub.basic_publish(
                msg.body, exchange="", routing_key=retry_queue, properties=copy, mandatory=True
            )
            if not isinstance(confirm, Ack):
                raise RuntimeError(f"retry copy not confirmed: {confirm!r}")
            await ch.basic_ack(msg.delivery_tag)
            return
        await handler(body)
        await ch.basic_ack(msg.delivery_tag)
        counter.hit()

    ok = await ch.basic_consume(queue, on_message)
    t_end = await counter.done
    result = benchlib.timing_result(args.n, t0, t_end, counter)

    await ch.basic_cancel(ok.consumer_tag)
    await ch.queue_delete(retry_queue)
    await conn.close()
    return result


def main(name: str, batched: bool) -> None:
    async def consume(args: argparse.Namespace) -> dict[str, Any]:
        return await _consume(args, batched=batched, rss=False)

    async def rss(args: argparse.Namespace) -> dict[str, Any]:
        return await _consume(args, batched=batched, rss=True)

    scenarios: dict[str, benchlib.ScenarioFn] = {"consume": consume, "rss": rss}
    if not batched:  # batched would ack a sleeping handler's tag with multiple=True

        async def mixed(args: argparse.Namespace) -> dict[str, Any]:
            return await _consume(args, batched=False, rss=False, mixed=True)

        async def latency(args: argparse.Namespace) -> dict[str, Any]:
            return await _consume(args, batched=False, rss=False, latency=True)

        scenarios["mixed"] = mixed
        scenarios["latency"] = latency
        scenarios["publish"] = _publish
        scenarios["retry"] = _retry
    benchlib.contender_main(
        name,
        scenarios,
        import_module=None if batched else "aiormq",
        notes=(
            f"ack every {ACK_EVERY}th tag with multiple=True (client ceiling)"
            if batched
            else "basic_ack per message after the handler; retry: the same delayed retry by hand "
            f"(a {RETRY_TTL_MS} ms TTL queue, persistent mandatory copy, ack after its confirm)"
        ),
        extra=None if batched else {"cleanup": {"queues": ["{queue}", "{queue}.retry"]}},
    )


if __name__ == "__main__":
    main("aiormq_raw", batched=False)
