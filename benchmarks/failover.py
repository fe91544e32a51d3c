"""Failover on the local 3-node cluster: the time from SIGKILL of the node a consumer is connected
to until it handles messages again, with a producer publishing throughout. Prints one JSON line.

    python benchmarks/failover.py           # needs `scripts/cluster.sh start`

Peers have no counterpart: aio-pika's connect_robust (and FastStream on top of it) reconnects to
the one URL it was given, so with that node dead it never resumes (aio-pika #141).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import aiormq

from rabbitflow import App

ROOT = Path(__file__).resolve().parent.parent
PORTS = {1: 5673, 2: 5674, 3: 5675}
URLS = {n: f"amqp://guest:guest@127.0.0.1:{port}/" for n, port in PORTS.items()}


def cluster(*args: str) -> str:
    script = str(ROOT / "scripts" / "cluster.sh")
    return subprocess.run([script, *args], check=True, capture_output=True, text=True).stdout


async def measure() -> dict[str, float]:
    suffix = secrets.token_hex(3)
    queue = f"bench.failover.{suffix}"
    consumer = App(f"bench-fo-c-{suffix}", url=[URLS[1], URLS[2], URLS[3]], prefetch=256, heartbeat=2)
    producer = App(f"bench-fo-p-{suffix}", url=[URLS[2], URLS[3], URLS[1]], heartbeat=2)
    handled: Counter[int] = Counter()
    warm, resumed, complete = asyncio.Event(), asyncio.Event(), asyncio.Event()
    resume_at = 0.0
    sent = 0
    target = -1  # set once the producer stopped

    @consumer.consumer(queue, queue_type="quorum")
    async def handle(body: dict[str, int]) -> None:
        nonlocal resume_at
        handled[body["n"]] += 1
        if consumer.reconnects and not resumed.is_set():
            resume_at = time.monotonic()
            resumed.set()
        if len(handled) >= 500:
            warm.set()
        if len(handled) == target:
            complete.set()

    async def produce(stop: asyncio.Event) -> None:
        nonlocal sent
        while not stop.is_set():
            await asyncio.gather(
                *(producer.publish({"n": sent + i}, routing_key=queue, timeout=60) for i in range(10))
            )
            sent += 10
            await asyncio.sleep(0.01)

    victim = 0
    try:
        async with consumer, producer:
            stop = asyncio.Event()
            feeding = asyncio.create_task(produce(stop))
            await asyncio.wait_for(warm.wait(), 60)
            node = consumer.health()["node"]
            victim = next(n for n, port in PORTS.items() if f":{port}/" in node)
            pid = int(await asyncio.to_thread(cluster, "pid", str(victim)))
            killed_at = time.monotonic()  # the clock starts at the kill, not at the script's start-up
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(resumed.wait(), 60)
            await asyncio.sleep(1)
            stop.set()
            await feeding
            target = sent
            if len(handled) >= target:
                complete.set()
            await asyncio.wait_for(complete.wait(), 60)
    finally:
        if victim:
            await asyncio.to_thread(cluster, "start-node", str(victim))
        connection = await aiormq.connect(URLS[1])
        channel = await connection.channel()
        for name in (q.name for q in consumer.plan.queues):
            await channel.queue_delete(name)
        await channel.exchange_delete(f"{consumer.name}.dlx")
        await connection.close()
    return {
        "seconds": resume_at - killed_at,
        "messages": float(sent),
        "lost": float(sent - len(handled)),
        "duplicates": float(sum(handled.values()) - len(handled)),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure())))
