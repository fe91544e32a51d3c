"""Ordered partitions: per-key order, spread over replicas, in-place retries, on 3.10 and in memory."""

from __future__ import annotations

import asyncio
import collections
import signal
import subprocess
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rabbitflow import (
    App,
    ConfigError,
    Depends,
    Message,
    Middleware,
    Reject,
    RequestFailed,
    logs,
    names,
    partition,
)
from rabbitflow.middleware import Fate, Outcome
from rabbitflow.runtime import partitions as partitions_module
from rabbitflow.runtime.partitions import PartitionGroup, assign
from rabbitflow.testing import TestClient

from ..helpers import Admin, unique, wait_for
from .partition_ledger import check_ledger, spawn

# -- pure parts ---------------------------------------------------------------------------------


def test_the_documented_hash_rule_is_crc32_modulo_n() -> None:
    # What a foreign producer implements: str(zlib.crc32(key.encode("utf-8")) % N).
    for key in ("order-17", "é", "", "x" * 300):
        assert partition(key, 8) == str(zlib.crc32(key.encode()) % 8)
    assert partition(17, 8) == partition("17", 8)
    assert partition(b"order-17", 8) == partition("order-17", 8)


def test_assignment_is_even_deterministic_and_moves_little() -> None:
    members = ["a", "b", "c", "d"]
    owners = assign(members, 8)
    assert sorted(collections.Counter(owners.values()).values()) == [2, 2, 2, 2]
    assert assign(reversed(members), 8) == owners  # every replica computes the same
    assert sorted(collections.Counter(assign(["a", "b", "c"], 8).values()).values()) == [2, 3, 3]
    # A fifth replica joining 20 partitions over 4: a share of 4 moves to it, little else moves.
    before, after = assign(members, 20), assign([*members, "e"], 20)
    moved = [p for p in before if before[p] != after[p]]
    assert sum(after[p] == "e" for p in after) == 4
    assert len(moved) <= 8


@pytest.mark.parametrize(
    ("options", "complaint"),
    [
        ({"partitions": 0}, "partitions=0"),
        ({"partitions": True}, "partitions=True"),
        ({"partitions": 4, "exchange": "e", "routing_key": "k"}, "routing keys are the partition numbers"),
        ({"partitions": 4, "exchange": "e", "exchange_type": "topic"}, "exchange is direct"),
        ({"partition_key": lambda b: b}, "needs partitions=N"),
        ({"partitions": 4, "partition_key": "id"}, "a function of the body"),
    ],
)
def test_bad_partition_options_fail_at_import(options: dict[str, Any], complaint: str) -> None:
    app = App("svc", url="memory://")
    with pytest.raises(ConfigError, match=complaint):

        @app.consumer("orders.events", **options)
        async def handle(body: Any) -> None: ...


def test_plan_has_single_active_partition_queues_and_no_retry_queues() -> None:
    app = App("svc", url="memory://")

    @app.consumer("orders.events", partitions=3, retries=2, delay=[1, 5])
    async def handle(body: Any) -> None: ...

    plan = app.plan.to_dict()
    queues = {q["name"]: q for q in plan["queues"]}
    assert sorted(queues) == [
        "orders.events.p0",
        "orders.events.p1",
        "orders.events.p2",
        "orders.events.parked",
    ]
    assert all(
        queues[f"orders.events.p{i}"]["arguments"]["x-single-active-consumer"] is True for i in range(3)
    )
    assert queues["orders.events.p0"]["arguments"]["x-dead-letter-routing-key"] == "orders.events.parked"
    routes = {(b["exchange"], b["routing_key"], b["queue"]) for b in plan["bindings"]}
    assert {("orders.events", str(i), f"orders.events.p{i}") for i in range(3)} <= routes
    exchanges = {e["name"]: e["type"] for e in plan["exchanges"]}
    assert exchanges["orders.events"] == "direct"
    assert exchanges["orders.events.members"] == "fanout"
    assert [(c["queue"], c["retries"], c["delays"]) for c in plan["consumers"]] == [
        ("orders.events", 2, [1, 5])
    ]


# -- the in-memory broker -----------------------------------------------------------------------


async def test_memory_broker_gives_a_single_active_queue_to_one_consumer_at_a_time() -> None:
    from rabbitflow.testing import MemoryBroker
    from rabbitflow.urls import parse_urls

    broker = MemoryBroker()
    endpoint = parse_urls("memory://")[0]
    conn = await broker.connect(endpoint, timeout=1, heartbeat=0, name="t")
    a, b = await conn.channel(), await conn.channel()
    await a.declare_queue("q", arguments={"x-queue-type": "quorum", "x-single-active-consumer": True})
    got: list[tuple[str, bytes]] = []

    async def on_a(d: Any) -> None:
        got.append(("A", d.body))  # holds it, unacked

    async def on_b(d: Any) -> None:
        got.append(("B", d.body))
        await b.ack(d.delivery_tag)

    await a.consume("q", on_a, prefetch=1)
    await b.consume("q", on_b, prefetch=1)
    for i in range(3):
        await a.publish(
            str(i).encode(), exchange="", routing_key="q", properties=partitions_module.Properties()
        )
    await broker.drain(advance_clock=False)
    assert got == [("A", b"0")]  # B waits though A is full
    await a.close()  # A goes holding 0: it comes back first, to B
    await broker.drain(advance_clock=False)
    assert got == [("A", b"0"), ("B", b"0"), ("B", b"1"), ("B", b"2")]
    await conn.close()


async def test_memory_partitioned_consumer_keeps_each_keys_order_and_retries_in_place() -> None:
    app = App("svc", url="memory://")
    seen: dict[str, list[int]] = collections.defaultdict(list)
    failures = collections.Counter[tuple[str, int]]()

    @app.consumer("events", partitions=4, retries=2, delay=0.01, partition_key=lambda e: e["key"])
    async def handle(event: dict[str, Any], message: Message) -> None:
        key, seq = event["key"], event["seq"]
        if seq == 3 and failures[(key, seq)] < 2:  # fails twice, then works: retried in place
            failures[(key, seq)] += 1
            raise RuntimeError("flaky")
        if key == "k1" and seq == 5:
            raise RuntimeError("poison")  # parked after 3 attempts; k1 goes on with 6
        seen[key].append(seq)

    async with TestClient(app) as client:
        for seq in range(10):
            for key in ("k0", "k1", "k2"):
                await app.publish({"key": key, "seq": seq}, exchange="events")  # partition_key routes it
        await wait_for(lambda: sum(map(len, seen.values())) == 29, timeout=10)
        parked = client.parked("events")
    assert seen["k0"] == list(range(10))
    assert seen["k2"] == list(range(10))
    assert seen["k1"] == [s for s in range(10) if s != 5]  # in order around the parked one
    assert [p.reason for p in parked] == ["exhausted"]
    assert parked[0].attempts == 3


# -- the real RabbitMQ 3.10 ---------------------------------------------------------------------


def _replicas(
    broker_url: str, service: str, queue: str, n: int, handle: Callable[..., Any], **opts: Any
) -> list[App]:
    apps = []
    for _ in range(n):
        app = App(service, url=broker_url, graceful_timeout=5)
        app.consumer(queue, partitions=opts.get("partitions", 8), **opts.get("consumer", {}))(handle)
        apps.append(app)
    return apps


def _groups(app: App) -> list[PartitionGroup]:
    runtime = app._runtime
    assert runtime is not None
    assert runtime.session is not None
    return runtime.session.partitioned


def _held(apps: list[App]) -> list[list[int]]:
    return [sorted(_groups(a)[0].held) for a in apps]


async def test_replicas_share_the_partitions_and_rebalance_when_one_leaves_or_dies(
    broker_url: str, admin: Admin, tmp_path: Path
) -> None:
    service, queue = unique("svc"), unique("part")
    handled: list[int] = []

    async def handle(body: Any) -> None:
        handled.append(body["seq"])

    apps = _replicas(broker_url, service, queue, 3, handle)
    admin.forget_app(apps[0])
    await asyncio.gather(*(app.start() for app in apps))
    worker = _spawn(broker_url, service, queue, tmp_path / "ledger")  # the fourth replica, a process
    try:
        assert worker.stdout is not None
        assert (await asyncio.to_thread(worker.stdout.readline)).strip() == "ready"
        # 8 partitions over 4 replicas: 2 each (the worker holds the 2 the three here do not).
        await wait_for(lambda: sorted(map(len, _held(apps))) == [2, 2, 2], timeout=10)
        assert len({p for held in _held(apps) for p in held}) == 6
        shares = [app.health()["partitioned"] for app in apps]  # health() tells each replica's share
        assert all(share[0]["healthy"] and share[0]["replicas"] == 4 for share in shares)
        assert sorted(p for share in shares for p in share[0]["held"]) == sorted(
            p for held in _held(apps) for p in held
        )
        # A graceful leave (it says goodbye): its partitions move at once.
        started = time.monotonic()
        await apps[2].stop()
        # 8 over 3 replicas: 3, 3 and 2, whichever gets the 2.
        await wait_for(lambda: sorted(map(len, _held(apps[:2]))) in ([2, 3], [3, 3]), timeout=10)
        leave = time.monotonic() - started
        # A replica SIGKILLed: the others notice its silence within MISSED heartbeats.
        started = time.monotonic()
        worker.send_signal(signal.SIGKILL)
        await wait_for(lambda: sorted(map(len, _held(apps[:2]))) == [4, 4], timeout=15)
        death = time.monotonic() - started
        print(f"rebalance after a leave {leave:.2f}s, after a SIGKILL {death:.2f}s")
        assert leave < 2.0
        assert death < partitions_module.HEARTBEAT * (partitions_module.MISSED + 2)
        # Everything flows to the two left, and nothing is handled twice.
        for seq in range(40):
            await apps[0].publish({"seq": seq}, exchange=queue, key=f"k{seq}")
        await wait_for(lambda: len(handled) == 40)
        await asyncio.sleep(0.2)
        assert sorted(handled) == list(range(40))
    finally:
        if worker.poll() is None:
            worker.kill()
        await asyncio.to_thread(worker.wait, 10)
        assert worker.stdout is not None
        worker.stdout.close()
        await asyncio.gather(*(app.stop() for app in apps[:2]))


def _spawn(
    broker_url: str, service: str, queue: str, ledger: Path, pause: float = 0.001
) -> subprocess.Popen[str]:
    return spawn(broker_url, service, queue, ledger, pause)


async def test_ledger_per_key_order_through_sigkills(broker_url: str, admin: Admin, tmp_path: Path) -> None:
    """200 keys x 50 events while 3 of 4 worker processes are SIGKILLed and replaced: every key's
    events handled in order, without a gap, one at a time."""
    service, queue, keys, events = unique("svc"), unique("ledger"), 200, 50
    ledger = tmp_path / "ledger"
    ledger.touch()
    planner = App(service, url=broker_url)
    planner.consumer(queue, partitions=8)(_noop)
    admin.forget_app(planner)

    def spawn() -> subprocess.Popen[str]:
        return _spawn(broker_url, service, queue, ledger)

    workers = [spawn() for _ in range(4)]
    killed: set[int] = set()
    started = time.monotonic()
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert (await asyncio.to_thread(worker.stdout.readline)).strip() == "ready"
        producer = App(unique("producer"), url=broker_url)
        async with producer:

            async def publish_all() -> None:
                for seq in range(events):
                    await asyncio.gather(
                        *(
                            producer.publish(
                                {"key": f"k{k}", "seq": seq},
                                exchange=queue,
                                routing_key=partition(f"k{k}", 8),
                            )
                            for k in range(keys)
                        )
                    )

            publishing = asyncio.ensure_future(publish_all())
            for round_ in range(3):  # kill one worker mid-stream, start a new one
                await asyncio.sleep(1.5)
                victim = workers[round_]
                victim.send_signal(signal.SIGKILL)
                killed.add(victim.pid)
                workers.append(spawn())
            await publishing

            def done() -> bool:
                handled = {
                    (line.split()[1], line.split()[2])
                    for line in ledger.read_text().splitlines()
                    if line[0] == "E"
                }
                return len(handled) == keys * events

            await wait_for(done, timeout=45)
        lines = ledger.read_text().splitlines()
        tally = check_ledger(lines, killed)
        elapsed = time.monotonic() - started
        print(
            f"ledger: {tally.handled} events in order, {tally.redeliveries} redeliveries, "
            f"{len(killed)} SIGKILLs, {elapsed:.1f}s"
        )
        assert tally.handled == keys * events
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            try:
                await asyncio.to_thread(worker.wait, 10)
            except subprocess.TimeoutExpired:
                worker.kill()
            assert worker.stdout is not None
            worker.stdout.close()


async def _noop(body: Any) -> None: ...


def test_the_ledger_check_catches_disorder_gaps_and_overlaps() -> None:
    ok = ["S k 0 1 0", "E k 0 1 0", "S k 1 1 0", "X k 1 1 0", "S k 1 2 0", "E k 1 2 0"]
    assert check_ledger(ok, killed=set()).redeliveries == 1
    assert check_ledger([*ok, "S k 1 2 0", "E k 1 2 0"], killed=set()).handled == 2  # its ack lost
    with pytest.raises(AssertionError, match="gap or disorder"):
        check_ledger([*ok, "S k 3 2 0", "E k 3 2 0"], killed=set())
    with pytest.raises(AssertionError, match="gap or disorder"):
        check_ledger([*ok, "S k 0 2 0", "E k 0 2 0"], killed=set())
    with pytest.raises(AssertionError, match="two calls of k at once"):
        check_ledger(["S k 0 1 0", "S k 0 2 0"], killed=set())
    # A SIGKILLed worker's call never ends; its message goes to the next worker.
    assert check_ledger(["S k 0 1 0", "S k 0 2 0", "E k 0 2 0"], killed={1}).handled == 1


# -- the handler is called as a plain consumer's ------------------------------------------------


class Hooks(Middleware):
    """Every hook a partitioned consumer's deliveries reach, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def received(self, message: Message) -> None:
        self.events.append(("received", message.queue, message.message_id, message.attempt))

    async def attempt(self, message: Message, call_next: Callable[[], Awaitable[Any]]) -> Any:
        self.events.append(("attempt", message.message_id, message.attempt))
        return await call_next()

    def attempt_failed(self, queue: str, attempt: int, exception: BaseException) -> None:
        self.events.append(("failed", queue, attempt, str(exception)))

    def settled(self, message: Message, outcome: Outcome) -> None:
        self.events.append(
            (
                "settled",
                message.message_id,
                message.attempt,
                outcome.fate,
                outcome.delay,
                outcome.reason,
                message.queue,
            )
        )

    def fates(self, queue: str | None = None) -> list[tuple[Any, ...]]:
        return [e[1:4] for e in self.events if e[0] == "settled" and queue in (None, e[6])]


async def test_memory_partitioned_consumer_tells_middleware_each_attempt_in_place() -> None:
    hooks = Hooks()
    app = App("svc", url="memory://", middleware=[hooks])
    fields: list[dict[str, Any]] = []

    @app.consumer("events", partitions=4, retries=2, delay=0.01, partition_key=lambda e: e["key"])
    async def handle(event: dict[str, Any], message: Message) -> None:
        fields.append(logs.current())  # the log fields of a line the handler writes
        if event["kind"] == "flaky" and message.attempt == 1:
            raise RuntimeError("flaky")
        if event["kind"] == "poison":
            raise RuntimeError("poison")

    async with TestClient(app) as client:
        for kind in ("ok", "flaky", "poison", "after"):  # one key: one partition, in this order
            await app.publish({"key": "k", "kind": kind}, exchange="events", message_id=kind)
        await wait_for(lambda: len(hooks.fates()) == 7, timeout=10)
        calls = client.calls("events")  # the test client's own middleware sees them too
        parked = client.parked("events")
    assert hooks.fates() == [
        ("ok", 1, Fate.HANDLED),
        ("flaky", 1, Fate.RETRIED),
        ("flaky", 2, Fate.HANDLED),
        ("poison", 1, Fate.RETRIED),
        ("poison", 2, Fate.RETRIED),
        ("poison", 3, Fate.PARKED),
        ("after", 1, Fate.HANDLED),
    ]
    settled = [e for e in hooks.events if e[0] == "settled"]
    assert {e[4] for e in settled if e[3] is Fate.RETRIED} == {
        0.01
    }  # the wait before the next call, in place
    assert settled[5][5] == "exhausted"
    # Each attempt in place is a delivery of its own: received, the attempt chain, then its fate.
    assert [e[:4] for e in hooks.events[:3]] == [
        ("received", "events", "ok", 1),
        ("attempt", "ok", 1),
        ("settled", "ok", 1, Fate.HANDLED),
    ]
    assert [e for e in hooks.events if e[0] == "received"][1:3] == [
        ("received", "events", "flaky", 1),
        ("received", "events", "flaky", 2),
    ]
    assert [e[1:] for e in hooks.events if e[0] == "failed"] == [
        ("events", 1, "flaky"),
        ("events", 1, "poison"),
        ("events", 2, "poison"),
        ("events", 3, "poison"),
    ]
    assert [(c.message.message_id, c.attempt, c.ok) for c in calls][:3] == [
        ("ok", 1, True),
        ("flaky", 1, False),
        ("flaky", 2, True),
    ]
    assert [p.message_id for p in parked] == ["poison"]
    assert [(f["queue"], f["message_id"], f["attempt"]) for f in fields[:3]] == [
        ("events", "ok", 1),
        ("events", "flaky", 1),
        ("events", "flaky", 2),
    ]


async def test_memory_partitioned_consumer_takes_depends_app_and_sync_handlers() -> None:
    app = App("svc", url="memory://")
    opened: list[str] = []
    closed: list[str] = []
    handled: list[tuple[int, bool, str, bool]] = []

    def resource() -> Iterator[str]:
        opened.append("r")
        try:
            yield "resource"
        finally:
            closed.append("r")

    @app.consumer("jobs", partitions=2, retries=1, delay=0.01, partition_key=lambda j: j["key"])
    def blocking(job: dict[str, Any], message: Message, service: App, got: str = Depends(resource)) -> None:
        in_thread = threading.current_thread() is not threading.main_thread()
        if job["seq"] == 1 and message.attempt == 1:
            raise RuntimeError("flaky")
        handled.append((job["seq"], in_thread, got, service is app))

    async with TestClient(app):
        for seq in range(4):
            await app.publish({"key": "k", "seq": seq}, exchange="jobs")
        await wait_for(lambda: len(handled) == 4, timeout=10)
    assert handled == [(seq, True, "resource", True) for seq in range(4)]  # in order, in threads
    assert len(opened) == len(closed) == 5  # a dependency per attempt, ended with it


async def test_memory_partitioned_consumer_publishes_its_results_and_answers_requests() -> None:
    app = App("shop", url="memory://")
    results: list[tuple[Any, Any, str | None]] = []

    @app.consumer("orders", partitions=4, partition_key=lambda o: o["id"], publish_to="orders.totals")
    async def total(order: dict[str, Any]) -> dict[str, Any]:
        return {"id": order["id"], "total": sum(order["items"])}

    @app.consumer("orders.totals")
    async def collect(result: dict[str, Any], message: Message) -> None:
        results.append((result, message.headers.get("x-rf-origin-queue"), message.correlation_id))

    asked: list[str] = []

    @app.consumer("prices", partitions=4)
    async def price(item: str) -> int:
        asked.append(item)
        if item == "unknown":
            raise Reject("no such item")
        return len(item)

    async with TestClient(app) as client:
        await app.publish({"id": "o1", "items": [1, 2]}, exchange="orders", message_id="in-1")
        answer = await client.request(
            "apple", exchange="prices", routing_key=partition("apple", 4), response_type=int
        )
        with pytest.raises(RequestFailed, match="no such item"):  # at once, not at the timeout
            await client.request("unknown", exchange="prices", routing_key=partition("unknown", 4))
        # A request whose caller gave up (its deadline is past) is dropped, not handled.
        gone = {names.DEADLINE: int(time.time() * 1000) - 1}
        await app.publish("pear", exchange="prices", routing_key=partition("pear", 4), headers=gone)
        await wait_for(lambda: len(results) == 1, timeout=10)
        await client.drain()
        parked = client.parked("prices")
        waiting = [client.queued(f"prices.p{i}") for i in range(4)]
    assert answer == 5
    assert results == [({"id": "o1", "total": 3}, "orders", "in-1")]
    assert asked == ["apple", "unknown"]
    assert [p.body for p in parked] == ["unknown"]
    assert waiting == [[], [], [], []]


async def test_a_partitioned_consumer_on_rabbitmq_is_called_as_a_plain_one(
    broker_url: str, admin: Admin
) -> None:
    """Middleware, Depends and App parameters, a sync handler, publish_to and a request, on 3.10."""
    service, queue, out, prices = unique("svc"), unique("part"), unique("totals"), unique("prices")
    hooks = Hooks()
    app = App(service, url=broker_url, middleware=[hooks], graceful_timeout=5)
    results: list[tuple[Any, Any, str | None]] = []
    ends: list[str] = []
    threads: set[bool] = set()

    def resource() -> Iterator[str]:
        try:
            yield "resource"
        finally:
            ends.append("end")

    @app.consumer(
        queue, partitions=4, retries=1, delay=0.05, partition_key=lambda e: e["key"], publish_to=out
    )
    def handle(event: dict[str, Any], message: Message, service: App, got: str = Depends(resource)) -> Any:
        threads.add(threading.current_thread() is not threading.main_thread())
        if event["seq"] == 2 and message.attempt == 1:
            raise RuntimeError("flaky")
        return {**event, "attempt": message.attempt, "got": got, "app": service is app}

    @app.consumer(out)
    async def collect(result: dict[str, Any], message: Message) -> None:
        results.append((result, message.headers.get("x-rf-origin-queue"), message.correlation_id))

    @app.consumer(prices, partitions=2)
    async def price(item: str) -> int:
        return len(item)

    admin.forget_app(app)
    async with app:
        for seq in range(5):
            for key in ("k0", "k1", "k2"):
                await app.publish({"key": key, "seq": seq}, exchange=queue, message_id=f"{key}-{seq}")
        answer = await app.request(
            "apple", exchange=prices, routing_key=partition("apple", 2), timeout=10, response_type=int
        )
        await wait_for(lambda: len(results) == 15, timeout=20)
    assert answer == 5
    assert threads == {True}
    for key in ("k0", "k1", "k2"):
        mine = [r for r, _, _ in results if r["key"] == key]
        assert [r["seq"] for r in mine] == list(range(5))  # in order, the flaky one retried in place
        assert all(r["got"] == "resource" and r["app"] for r in mine)
        assert [r["attempt"] for r in mine] == [1, 1, 2, 1, 1]
    assert all(
        origin == queue and correlation == f"{r['key']}-{r['seq']}" for r, origin, correlation in results
    )
    fates = hooks.fates(queue)
    assert sorted(f for f in fates if f[2] is not Fate.HANDLED) == [
        (f"{k}-2", 1, Fate.RETRIED) for k in ("k0", "k1", "k2")
    ]
    assert len([f for f in fates if f[2] is Fate.HANDLED]) == 15
    assert [f[1:] for f in hooks.fates(prices)] == [(1, Fate.HANDLED)]  # the request, answered
    assert len(ends) == 18  # a dependency per attempt, ended with it
