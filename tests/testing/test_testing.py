"""The test client: an App on the in-memory broker, on a virtual clock."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from rabbitflow import App, ConfigError, Message, Reject
from rabbitflow.testing import TestClient

from ..helpers import wait_for


async def test_retried_after_60s_and_parked_after_3_attempts_in_virtual_time() -> None:
    app = App("orders", url="memory://")
    calls: list[tuple[int, float]] = []
    client = TestClient(app)

    @app.consumer("orders.created", retries=2, delay=60)
    async def handle(order: dict[str, Any], message: Message) -> None:
        calls.append((message.attempt, client.now))
        raise ConnectionError("inventory down")

    async with client:
        await client.publish({"id": 1}, routing_key="orders.created", headers={"tenant": "acme"})
        await client.drain()
        parked = client.parked("orders.created")

    assert calls == [(1, 0.0), (2, 60.0), (3, 120.0)]
    assert len(parked) == 1
    assert parked[0].reason == "exhausted"
    assert parked[0].attempts == 3
    assert parked[0].body == {"id": 1}
    assert parked[0].headers["tenant"] == "acme"
    assert parked[0].exception == "builtins.ConnectionError"
    assert [f.attempt for f in client.failures] == [1, 2, 3]


async def test_thousand_messages_failing_twice_with_60s_delays_take_no_real_time() -> None:
    app = App("bulk", url="memory://")
    attempts: dict[int, list[float]] = {}
    client = TestClient(app)

    @app.consumer("bulk.in", retries=3, delay=60)
    async def handle(body: dict[str, int], message: Message) -> None:
        attempts.setdefault(body["n"], []).append(client.now)
        if message.attempt <= 2:
            raise RuntimeError("not yet")

    started = time.perf_counter()
    async with client:
        for n in range(1000):
            await client.publish({"n": n}, routing_key="bulk.in")
        await client.drain()
        parked = client.parked("bulk.in")
        waiting = client.queued("bulk.in")
    wall = time.perf_counter() - started

    assert sorted(attempts) == list(range(1000))
    assert all(stamps == [0.0, 60.0, 120.0] for stamps in attempts.values())
    assert parked == []
    assert waiting == []
    assert len(client.failures) == 2000
    assert wall < 5, f"1,000 messages x 2 delayed retries took {wall:.2f}s of real time"


async def test_sent_lists_what_the_app_published() -> None:
    app = App("shop", url="memory://")

    @app.consumer("shop.orders", exchange="shop", routing_key="order.created")
    async def handle(order: dict[str, Any]) -> None:
        await app.publish({"id": order["id"], "ok": True}, exchange="shop", routing_key="order.confirmed")

    @app.consumer("shop.confirmed", exchange="shop", routing_key="order.confirmed")
    async def confirmed(event: dict[str, Any]) -> None: ...

    async with TestClient(app) as client:
        await client.publish({"id": 9}, exchange="shop", routing_key="order.created")
        await client.drain()
        sent = client.sent()

    assert [(s.exchange, s.routing_key, s.body) for s in sent] == [
        ("shop", "order.confirmed", {"id": 9, "ok": True})
    ]


async def test_raise_errors_surfaces_the_handler_exception() -> None:
    app = App("strict", url="memory://")

    @app.consumer("strict.q", retries=1, delay=5)
    async def handle(body: Any) -> None:
        raise KeyError("sku-17")

    async with TestClient(app, raise_errors=True) as client:
        await client.publish({}, routing_key="strict.q")
        with pytest.raises(KeyError, match="sku-17"):
            await client.drain()


async def test_reject_and_decode_errors_park_without_retries() -> None:
    app = App("rej", url="memory://")
    calls = 0

    @app.consumer("rej.q", retries=3, delay=10)
    async def handle(body: dict[str, Any]) -> None:
        nonlocal calls
        calls += 1
        raise Reject("bad input")

    async with TestClient(app) as client:
        await client.publish({"a": 1}, routing_key="rej.q")
        await client.publish(b"{broken", routing_key="rej.q", content_type="application/json")
        await client.drain()
        reasons = sorted(p.reason for p in client.parked("rej.q"))

    assert calls == 1
    assert reasons == ["decode-error", "rejected"]
    assert client.now == 0.0  # nothing waited


def test_client_refuses_an_app_on_a_real_broker() -> None:
    app = App("real", url="amqp://guest:guest@localhost/")
    with pytest.raises(ConfigError, match="url='memory://'"):
        TestClient(app)


async def test_acks_behind_a_held_delivery_go_out_on_the_memory_broker() -> None:
    """The settlement rule without a broker: a held delivery holds back no other ack."""
    from rabbitflow.testing import MemoryBroker

    broker = MemoryBroker(realtime=True)  # drain() would wait for the held handler forever
    app = App("held", url="memory://", broker=broker, prefetch=8)
    release = asyncio.Event()
    done: list[int] = []

    @app.consumer("held.q", queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        if body["n"] == 0:
            await release.wait()
        done.append(body["n"])

    async with TestClient(app, broker=broker) as client:
        for n in range(40):
            await client.publish({"n": n}, routing_key="held.q")
        await wait_for(lambda: len(done) == 39 and broker.queues["held.q"].unacked_count == 1)
        assert sorted(done) == list(range(1, 40))
        health = app.health()["consumers"][0]
        assert (health["in_flight"], health["running"]) == (1, 1)
        release.set()
        await wait_for(lambda: broker.queues["held.q"].unacked_count == 0)
    assert sorted(done) == list(range(40))


async def test_acks_of_two_flushes_never_overtake_each_other_on_the_memory_broker() -> None:
    """Flush one acks 1-2 (multiple) and 5, 6 one by one; flush two, on the next loop turn, acks
    3, 4 and 7 (a multiple ack up to 7): sent in order, no tag is unknown when its ack arrives."""
    from pamqp.commands import Basic

    from rabbitflow.runtime.settlement import Settlement
    from rabbitflow.testing import MemoryBroker

    broker = MemoryBroker(realtime=True)
    channel = await (await broker.connect()).channel()
    await channel.declare_queue("q")
    for _ in range(7):
        await channel.publish(b"x", exchange="", routing_key="q", properties=Basic.Properties())
    settlement = Settlement(channel, prefetch=100)
    tags: list[int] = []

    async def on_delivery(delivery: Any) -> None:
        settlement.received(delivery.delivery_tag)
        tags.append(delivery.delivery_tag)

    await channel.consume("q", on_delivery, prefetch=100)
    await wait_for(lambda: len(tags) == 7)
    for tag in (1, 2, 5, 6):
        settlement.ack(tag)
    asyncio.get_running_loop().call_later(0, lambda: [settlement.ack(t) for t in (3, 4, 7)])
    await wait_for(lambda: settlement.held == 0)
    await settlement.flush()
    assert channel.is_open
    assert broker.queues["q"].unacked_count == 0


async def test_a_stop_does_not_wait_forever_for_a_handler_that_ignores_its_cancellation() -> None:
    from rabbitflow.testing import MemoryBroker

    app = App("stubborn", url="memory://", broker=MemoryBroker(realtime=True), graceful_timeout=0.5)
    started = asyncio.Event()

    @app.consumer("stubborn.q", queue_type="classic")
    async def handle(body: Any) -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(3600)  # "cleanup" that ignores the shutdown

    await app.start()
    await app.publish({"n": 1}, routing_key="stubborn.q")
    await started.wait()
    begun = time.monotonic()
    await asyncio.wait_for(app.stop(), 10)
    assert time.monotonic() - begun < 3  # graceful 0.5 s + a second for the cancelled
    assert app.state == "closed"


async def test_publish_to_a_fanout_exchange_needs_no_routing_key() -> None:
    app = App("fan", url="memory://")
    got: dict[str, list[Any]] = {"billing": [], "audit": []}

    @app.consumer("fan.billing", exchange="fan.events", exchange_type="fanout")
    async def billing(body: dict[str, int]) -> None:
        got["billing"].append(body)

    @app.consumer("fan.audit", exchange="fan.events", exchange_type="fanout", routing_key="ignored")
    async def audit(body: dict[str, int]) -> None:
        got["audit"].append(body)

    async with TestClient(app, raise_errors=True) as client:
        await client.publish({"n": 1}, exchange="fan.events")
        await client.drain()
    assert got == {"billing": [{"n": 1}], "audit": [{"n": 1}]}
