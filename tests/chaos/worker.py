"""One app of the chaos run, in a process of its own (so its RSS is its own).

    python tests/chaos/worker.py consumer|producer CONFIG_JSON

It talks to the runner over stdin/stdout, one JSON object a line:

- runner → worker: {"cmd": "health", "id": k} | {"cmd": "pause"} | {"cmd": "resume"}
  | {"cmd": "finish"} (producer: stop starting publishes, wait for the ones in flight)
  | {"cmd": "stop"}
- worker → runner: {"t": "ready"}; {"t": "reply", "id": k, "health": ..., "rss_kb": ...};
  consumer: {"t": "calls", "calls": [[n, attempt, ok, time], ...]} (batched, every handler call),
  {"t": "ordered", "calls": [[key, seq, attempt, ok, started, ended], ...]} (the partitioned consumer's);
  producer: {"t": "confirmed", "items": [[n, time], ...]}, {"t": "ordered-confirmed", "items":
  [[key, seq], ...]}, {"t": "errors", ...}, {"t": "finished"}.

Besides the work queue, the service has a partitioned consumer (`ordered`, docs/partitions.md): the
producer publishes a sequence per key to it, each event after the previous one was confirmed.

Handlers misbehave by the fate in the body (`fates.py`); the logger "rabbitflow" writes to the
log file named in the config, at INFO.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fates import (
    CANCEL_ONCE,
    FAIL_ALWAYS,
    FAIL_ONCE,
    MISSING_EXCHANGE,
    SLOW,
    TIMEOUT_ONCE,
    fate_of,
)

from rabbitflow import App, ChannelClosed, Message, partition


def rss_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Out:
    """Lines to the runner; handler calls batched so 300 messages a second stay cheap."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []
        self.confirmed: list[list[Any]] = []
        self.ordered: list[list[Any]] = []
        self.ordered_confirmed: list[list[Any]] = []

    def send(self, obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
        sys.stdout.flush()

    def flush(self) -> None:
        if self.calls:
            calls, self.calls = self.calls, []
            self.send({"t": "calls", "calls": calls})
        if self.confirmed:
            confirmed, self.confirmed = self.confirmed, []
            self.send({"t": "confirmed", "items": confirmed})
        if self.ordered:
            ordered, self.ordered = self.ordered, []
            self.send({"t": "ordered", "calls": ordered})
        if self.ordered_confirmed:
            items, self.ordered_confirmed = self.ordered_confirmed, []
            self.send({"t": "ordered-confirmed", "items": items})

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.flush()


def build_consumer(config: dict[str, Any], out: Out) -> App:
    app = App(
        config["service"],
        url=config["urls"],
        prefetch=config["prefetch"],
        heartbeat=config["heartbeat"],
        handler_timeout=config["handler_timeout"],
        graceful_timeout=10,
    )
    missing = config["missing_exchange"]
    slow = config["slow_seconds"]

    @app.consumer(
        config["queue"],
        retries=config["retries"],
        delay=config["delays"],
        queue_type="quorum",
    )
    async def handle(body: dict[str, Any], message: Message) -> None:
        n = body["n"]
        fate = fate_of(body)
        attempt = message.attempt
        ok = 0
        try:
            if fate == FAIL_ALWAYS:
                raise RuntimeError(f"message {n} always fails")
            if fate == FAIL_ONCE and attempt == 1:
                raise RuntimeError(f"message {n} fails once")
            if fate == CANCEL_ONCE and attempt == 1:
                raise asyncio.CancelledError()
            if fate == TIMEOUT_ONCE and attempt == 1:
                await asyncio.sleep(600)  # handler_timeout cancels it
            if fate == SLOW:
                await asyncio.sleep(slow)
            if fate == MISSING_EXCHANGE:
                try:
                    await app.publish({"n": n}, exchange=missing, routing_key="nowhere", timeout=5)
                except ChannelClosed:
                    pass
                else:
                    raise AssertionError(f"a publish to the missing exchange {missing!r} was confirmed")
            ok = 1
        finally:
            out.calls.append([n, attempt, ok, time.time()])

    @app.consumer(
        config["ordered"],
        partitions=config["partitions"],
        retries=config["retries"],
        delay=config["delays"],
        queue_type="quorum",
    )
    async def ordered(event: dict[str, Any], message: Message) -> None:
        started = time.time()
        ok = 0
        try:
            if fate_of(event) == FAIL_ONCE and message.attempt == 1:
                raise RuntimeError(f"event {event['key']}#{event['seq']} fails once (retried in place)")
            ok = 1
        finally:
            out.ordered.append([event["key"], event["seq"], message.attempt, ok, started, time.time()])

    return app


class Producer:
    def __init__(self, config: dict[str, Any], out: Out) -> None:
        self.app = App(
            config["service"] + "-producer",
            url=config["urls"],
            heartbeat=config["heartbeat"],
        )
        self.config = config
        self.out = out
        self.next_n = 0
        self.window = asyncio.Semaphore(config["window"])
        self.running: set[asyncio.Task[None]] = set()
        self.go = asyncio.Event()
        self.go.set()
        self.finishing = False
        self.errors: Counter[str] = Counter()
        self.sequences: list[asyncio.Task[None]] = []

    async def publish(self, n: int) -> None:
        body = {"n": n, "fate": self.config["fates"][n % len(self.config["fates"])]}
        try:
            while True:
                try:
                    await self.app.publish(
                        body, routing_key=self.config["queue"], message_id=f"m{n}", timeout=30
                    )
                    self.out.confirmed.append([n, time.time()])
                    return
                except Exception as exc:  # PublishTimeout, Unroutable while the queue is deleted
                    self.errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.5)
        finally:
            self.window.release()

    async def sequence(self, key: str) -> None:
        """One key's events to the partitioned consumer, each after the previous one was
        confirmed (sent again until it is: a duplicate possible, never a reordering)."""
        config = self.config
        route = partition(key, config["partitions"])
        every = len(config["ordered_keys"]) / config["ordered_rate"]
        seq = 0
        while not self.finishing:
            await self.go.wait()
            fate = FAIL_ONCE if (seq * 31 + len(key)) % 97 == 0 else "ok"  # ~1%: a retry in place
            body = {"key": key, "seq": seq, "fate": fate}
            while True:
                try:
                    await self.app.publish(body, exchange=config["ordered"], routing_key=route, timeout=30)
                    break
                except Exception as exc:
                    self.errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.5)
            self.out.ordered_confirmed.append([key, seq])
            seq += 1
            await asyncio.sleep(every)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.sequences = [loop.create_task(self.sequence(key)) for key in self.config["ordered_keys"]]
        rate = self.config["rate"]
        total = self.config["messages"]
        started = loop.time()
        sent_before = 0
        while not self.finishing and self.next_n < total:
            if not self.go.is_set():
                await self.go.wait()
                started, sent_before = loop.time(), self.next_n  # no burst after a pause
                continue
            due = sent_before + int((loop.time() - started) * rate)
            while self.next_n < min(due, total) and not self.finishing and self.go.is_set():
                await self.window.acquire()
                task = loop.create_task(self.publish(self.next_n))
                self.running.add(task)
                task.add_done_callback(self.running.discard)
                self.next_n += 1
            await asyncio.sleep(0.02)

    async def finish(self) -> None:
        self.finishing = True
        self.go.set()
        pending = set(self.running) | set(self.sequences)
        if pending:
            await asyncio.wait(pending, timeout=120)
        self.out.flush()
        self.out.send({"t": "finished", "sent": self.next_n, "errors": dict(self.errors)})


async def main() -> None:
    role, config = sys.argv[1], json.loads(sys.argv[2])
    handler = logging.FileHandler(config["log"])
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger("rabbitflow")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    out = Out()
    producer = None
    if role == "consumer":
        app = build_consumer(config, out)
    else:
        producer = Producer(config, out)
        app = producer.app

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    flusher = loop.create_task(out.run())
    async with app:
        out.send({"t": "ready", "pid": __import__("os").getpid()})
        feeding = loop.create_task(producer.run()) if producer is not None else None
        while line := await reader.readline():
            command = json.loads(line)
            cmd = command["cmd"]
            if cmd == "health":
                out.send({"t": "reply", "id": command["id"], "health": app.health(), "rss_kb": rss_kb()})
            elif cmd == "pause" and producer is not None:
                producer.go.clear()
            elif cmd == "resume" and producer is not None:
                producer.go.set()
            elif cmd == "finish" and producer is not None:
                producer.finishing = True
                if feeding is not None:
                    await feeding
                await producer.finish()
            elif cmd == "stop":
                break
        if producer is not None:
            for task in producer.sequences:
                task.cancel()
        if feeding is not None:
            feeding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeding
    flusher.cancel()
    out.flush()
    out.send({"t": "stopped", "rss_kb": rss_kb()})


if __name__ == "__main__":
    asyncio.run(main())
