#!/usr/bin/env python
"""The outbox beside plain `app.publish`: commit-to-delivery latency and throughput.

    python benchmarks/outbox.py [--samples 500] [--n 5000] [--writers 32]

Needs the broker (RABBITFLOW_TEST_URL) and the project's PostgreSQL (scripts/postgres.sh;
RABBITFLOW_TEST_PG_URL). Each message goes to a classic queue on which a raw aiormq consumer
(no-ack) notes when it arrived:

* latency, one message at a time: `app.publish` from the call to the delivery; the outbox from the
  moment the transaction's commit returned to the delivery (relay woken by the local commit), and
  again with the commit made on another engine (the relay woken by PostgreSQL's NOTIFY alone);
* throughput: N messages from `--writers` concurrent tasks, one message per `app.publish` or per
  transaction, until the last one arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import aiormq
import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from rabbitflow import App
from rabbitflow.sql import Outbox

BROKER_URL = os.environ.get("RABBITFLOW_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")
PG_URL = os.environ.get("RABBITFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5433/postgres")


class Arrivals:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.done = asyncio.Event()
        self.expect = 0

    async def on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        now = time.perf_counter()
        key = message.body.decode()
        self.times[key] = now
        future = self.waiting.pop(key, None)
        if future is not None and not future.done():
            future.set_result(now)
        if self.expect and len(self.times) >= self.expect:
            self.done.set()

    def wait(self, key: str) -> asyncio.Future[float]:
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if key in self.times:
            future.set_result(self.times[key])
        else:
            self.waiting[key] = future
        return future


def summary(name: str, ms: list[float]) -> str:
    ms = sorted(ms)
    p = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))]  # noqa: E731
    return f"| {name} | {statistics.median(ms):.2f} | {p(0.99):.2f} | {ms[-1]:.2f} |"


async def latency(arrivals: Arrivals, samples: int, send: Callable[[str], Awaitable[float]]) -> list[float]:
    out = []
    for _ in range(samples):
        key = uuid.uuid4().hex
        arrived = arrivals.wait(key)
        started = await send(key)
        out.append((await arrived - started) * 1000)
    return out


async def throughput(
    arrivals: Arrivals, n: int, writers: int, send: Callable[[str], Awaitable[None]]
) -> float:
    arrivals.times.clear()
    arrivals.done.clear()
    arrivals.expect = n
    keys = [uuid.uuid4().hex for _ in range(n)]
    queue: asyncio.Queue[str] = asyncio.Queue()
    for key in keys:
        queue.put_nowait(key)

    async def writer() -> None:
        while not queue.empty():
            await send(queue.get_nowait())

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    await asyncio.wait_for(arrivals.done.wait(), 120)
    arrivals.expect = 0
    return n / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    name = f"rf_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = PG_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1) + f"/{name}"
    engine = create_async_engine(url, pool_size=args.writers + 5)
    other = create_async_engine(url)
    queue = f"bench-outbox-{uuid.uuid4().hex[:8]}"
    connection = await aiormq.connect(BROKER_URL)
    channel = await connection.channel()
    await channel.queue_declare(queue, auto_delete=False, durable=True)
    arrivals = Arrivals()
    await channel.basic_consume(queue, arrivals.on_message, no_ack=True)
    app = App(f"bench-{uuid.uuid4().hex[:6]}", url=BROKER_URL)
    outbox = Outbox(engine, poll=5.0)
    remote = Outbox(other)
    await outbox.create_tables()
    async with engine.begin() as c:
        await c.execute(text("CREATE TABLE work (id serial PRIMARY KEY, key text)"))
    try:
        async with app, outbox.relaying(app):

            async def publish(key: str) -> float:
                started = time.perf_counter()
                await app.publish(key, routing_key=queue)
                return started

            async def commit(key: str, box: Outbox = outbox) -> float:
                async with box.transaction() as tx:
                    tx.publish(key, routing_key=queue)
                return time.perf_counter()

            async def commit_remote(key: str) -> float:
                return await commit(key, remote)

            await latency(arrivals, 50, publish)  # warm-up
            await latency(arrivals, 50, commit)
            rows = [
                summary("app.publish (call → delivery)", await latency(arrivals, args.samples, publish)),
                summary(
                    "outbox, local wake (commit → delivery)", await latency(arrivals, args.samples, commit)
                ),
                summary(
                    "outbox, NOTIFY wake (commit → delivery)",
                    await latency(arrivals, args.samples, commit_remote),
                ),
            ]

            async def publish_only(key: str) -> None:
                await app.publish(key, routing_key=queue)

            async def commit_only(key: str) -> None:
                await commit(key)

            async def by_hand(key: str) -> None:
                async with engine.begin() as c:  # the service's row, then a publish after commit
                    await c.execute(text("INSERT INTO work (key) VALUES (:k)"), {"k": key})
                await app.publish(key, routing_key=queue)

            async def commit_with_row(key: str) -> None:
                async with outbox.transaction() as tx:
                    await tx.session.execute(text("INSERT INTO work (key) VALUES (:k)"), {"k": key})
                    tx.publish(key, routing_key=queue)

            plain = await throughput(arrivals, args.n, args.writers, publish_only)
            boxed = await throughput(arrivals, args.n, args.writers, commit_only)
            hand = await throughput(arrivals, args.n, args.writers, by_hand)
            boxed_row = await throughput(arrivals, args.n, args.writers, commit_with_row)
    finally:
        await channel.queue_delete(queue)
        await connection.close()
        await engine.dispose()
        await other.dispose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(f"latency, {args.samples} messages one at a time (ms):\n")
    print("| path | p50 | p99 | max |\n|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nthroughput, {args.n} messages from {args.writers} concurrent writers (messages/s):\n")
    print("| path | messages/s |\n|---|---|")
    print(f"| app.publish | {plain:.0f} |")
    print(f"| outbox (one transaction per message) | {boxed:.0f} |")
    print(f"| by hand: a transaction with one row, then app.publish | {hand:.0f} |")
    print(f"| outbox: a transaction with one row and one message | {boxed_row:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--writers", type=int, default=32)
    asyncio.run(main(parser.parse_args()))
