"""Ordered partitions: the steady rate of R replicas of a partitioned consumer whose handler awaits
5 ms, against one replica (docs/partitions.md, "Measured").

    python benchmarks/partitions.py [--replicas 1,2,4] [--messages 1500] [--partitions 16]
                                    [--concurrency 4] [--processes]

Each replica handles at most `--concurrency` messages at once (its share of the work: a pool of
database connections, say). The queues are filled first, then every replica starts at once; the
rate is measured between the 20th and the 90th percent of the messages handled (without the start,
when the first replica up holds every partition until it hears the others, and the tail). With
`--processes` each replica is a process of its own, as `rabbitflow run --workers` would run them;
otherwise they share this process's event loop. Nothing asserts on a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
import uuid
from typing import Any

from rabbitflow import App, partition

URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def replica(service: str, queue: str, partitions: int, concurrency: int, handle: Any) -> App:
    app = App(service, url=URL, graceful_timeout=5)
    app.consumer(queue, partitions=partitions, concurrency=concurrency)(handle)
    return app


async def fill(service: str, queue: str, partitions: int, messages: int) -> None:
    declare = replica(service, queue, partitions, 1, _noop)
    await declare.start()
    await declare.stop()
    async with App(f"{service}-producer", url=URL) as producer:
        for start in range(0, messages, 500):
            await asyncio.gather(
                *(
                    producer.publish({"i": i}, exchange=queue, routing_key=partition(f"k{i}", partitions))
                    for i in range(start, min(messages, start + 500))
                )
            )


async def _noop(body: Any) -> None: ...


async def in_process(
    service: str, queue: str, n: int, partitions: int, concurrency: int, messages: int
) -> float:
    ends: list[float] = []
    done = asyncio.Event()

    async def handle(body: Any) -> None:
        await asyncio.sleep(0.005)
        ends.append(time.monotonic())
        if len(ends) == messages:
            done.set()

    apps = [replica(service, queue, partitions, concurrency, handle) for _ in range(n)]
    await asyncio.gather(*(app.start() for app in apps))
    await asyncio.wait_for(done.wait(), 300)
    for app in apps:
        await app.stop()
    low, high = int(messages * 0.2), int(messages * 0.9)
    return (high - low) / (ends[high] - ends[low])


def _worker(service: str, queue: str, partitions: int, concurrency: int, stamps: Any, stop: Any) -> None:
    async def main() -> None:
        async def handle(body: Any) -> None:
            await asyncio.sleep(0.005)
            stamps.put(time.monotonic())

        app = replica(service, queue, partitions, concurrency, handle)
        async with app:
            await asyncio.to_thread(stop.wait)

    asyncio.run(main())


def in_processes(service: str, queue: str, n: int, partitions: int, concurrency: int, messages: int) -> float:
    stamps: Any = multiprocessing.Queue()
    stop = multiprocessing.Event()
    workers = [
        multiprocessing.Process(target=_worker, args=(service, queue, partitions, concurrency, stamps, stop))
        for _ in range(n)
    ]
    before = os.times()
    for w in workers:
        w.start()
    ends = sorted(stamps.get(timeout=300) for _ in range(messages))
    stop.set()
    for w in workers:
        w.join(30)
    after = os.times()
    cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    print(f"  replicas' CPU: {cpu / messages * 1e6:.0f} us per message, start and stop included", flush=True)
    low, high = int(messages * 0.2), int(messages * 0.9)
    return (high - low) / (ends[high] - ends[low])


async def cleanup(queue: str, partitions: int) -> None:
    import aiormq

    connection = await aiormq.connect(URL)
    channel = await connection.channel()
    for name in [f"{queue}.p{i}" for i in range(partitions)] + [f"{queue}.parked"]:
        await channel.queue_delete(name)
    for name in (queue, f"{queue}.members"):
        await channel.exchange_delete(name)
    await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--messages", type=int, default=1500, help="per replica")
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--processes", action="store_true")
    args = parser.parse_args()
    rates = {}
    for n in [int(x) for x in args.replicas.split(",")]:
        service, queue = f"bench-{uuid.uuid4().hex[:6]}", f"bench.part.{uuid.uuid4().hex[:6]}"
        messages = args.messages * n
        asyncio.run(fill(service, queue, args.partitions, messages))
        if args.processes:
            rate = in_processes(service, queue, n, args.partitions, args.concurrency, messages)
        else:
            rate = asyncio.run(in_process(service, queue, n, args.partitions, args.concurrency, messages))
        asyncio.run(cleanup(queue, args.partitions))
        rates[n] = rate
        print(f"{n} replica(s): {rate:,.0f} msg/s ({rate / rates[min(rates)]:.2f}x one)", flush=True)


if __name__ == "__main__":
    main()
