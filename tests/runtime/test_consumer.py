"""Delayed retries through the broker and parking, on the real RabbitMQ."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from rabbitflow import App, Message, Reject, Retry
from rabbitflow.runtime import consumer

from ..helpers import Admin, unique, wait_for

QUEUE_TYPES = ["quorum", "classic"]


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_always_failing_handler_retries_then_parks(
    make_app: Callable[..., App], admin: Admin, queue_type: str
) -> None:
    app = make_app()
    queue = unique("fail")
    calls: list[tuple[float, int]] = []

    @app.consumer(queue, retries=3, delay=1, queue_type=queue_type)
    async def handle(body: Any, message: Message) -> None:
        calls.append((time.monotonic(), message.attempt))
        raise RuntimeError(f"cannot handle {body['id']}")

    async with app:
        await app.publish({"id": 42}, routing_key=queue, headers={"tenant": "acme"}, message_id="order-42")
        await wait_for(lambda: len(calls) == 4, timeout=15)
        parked = await _one(admin, f"{queue}.parked")

    assert [attempt for _, attempt in calls] == [1, 2, 3, 4]
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(calls)]
    assert all(0.9 <= gap <= 3.0 for gap in gaps), gaps
    headers = parked.header.properties.headers
    assert headers["x-rf-reason"] == "exhausted"
    assert headers["x-rf-attempts"] == 4
    assert headers["x-rf-exception"] == "builtins.RuntimeError"
    assert headers["x-rf-error"] == "cannot handle 42"
    assert "RuntimeError" in headers["x-rf-traceback"]
    assert headers["x-rf-queue"] == queue
    assert headers["x-rf-original-exchange"] == ""
    assert headers["x-rf-original-routing-key"] == queue
    assert headers["x-rf-first-failure"] < headers["x-rf-last-failure"]
    assert headers["tenant"] == "acme"
    assert "x-death" not in headers
    assert parked.body == b'{"id":42}'
    assert parked.header.properties.message_id == "order-42"
    assert parked.header.properties.content_type == "application/json"
    assert await admin.count(queue) == 0
    assert len(calls) == 4


async def test_ladder_gaps_follow_the_ladder(make_app: Callable[..., App]) -> None:
    app = make_app()
    queue = unique("ladder")
    stamps: list[float] = []

    @app.consumer(queue, retries=2, delay=[0.5, 2])
    async def handle(body: Any) -> None:
        stamps.append(time.monotonic())
        raise ValueError("again")

    async with app:
        await app.publish({}, routing_key=queue)
        await wait_for(lambda: len(stamps) == 3, timeout=10)

    first, second = stamps[1] - stamps[0], stamps[2] - stamps[1]
    assert 0.4 <= first <= 1.5, first
    assert 1.9 <= second <= 3.5, second
    assert {q.name for q in app.plan.queues} >= {f"{queue}.retry.500ms", f"{queue}.retry.2s"}


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_fail_twice_then_succeed_parks_nothing(
    make_app: Callable[..., App], admin: Admin, queue_type: str
) -> None:
    app = make_app()
    queue = unique("flaky")
    attempts: list[int] = []

    @app.consumer(queue, retries=3, delay=0.2, queue_type=queue_type)
    async def handle(body: Any, message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt < 3:
            raise ConnectionError("downstream busy")

    async with app:
        await app.publish({"x": 1}, routing_key=queue, message_id="same-id")
        await wait_for(lambda: len(attempts) == 3, timeout=10)
        await asyncio.sleep(0.5)

    assert attempts == [1, 2, 3]
    assert await admin.count(f"{queue}.parked") == 0
    assert await admin.count(queue) == 0


async def test_sibling_queue_on_fanout_sees_one_copy(make_app: Callable[..., App]) -> None:
    app = make_app()
    exchange = unique("fan")
    failing, sibling = unique("failing"), unique("sibling")
    failing_calls: list[int] = []
    sibling_calls: list[int] = []

    @app.consumer(failing, exchange=exchange, exchange_type="fanout", retries=2, delay=0.3)
    async def fails(body: Any, message: Message) -> None:
        failing_calls.append(message.attempt)
        raise RuntimeError("no")

    @app.consumer(sibling, exchange=exchange, exchange_type="fanout")
    async def fine(body: Any, message: Message) -> None:
        sibling_calls.append(message.attempt)

    async with app:
        await app.publish({"event": 1}, exchange=exchange, routing_key="")
        await wait_for(lambda: len(failing_calls) == 3, timeout=10)
        await asyncio.sleep(0.5)

    assert failing_calls == [1, 2, 3]
    assert sibling_calls == [1]


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_invalid_json_is_parked_without_calling_the_handler(
    make_app: Callable[..., App], admin: Admin, queue_type: str
) -> None:
    app = make_app()
    queue = unique("bad")
    called = False

    @app.consumer(queue, queue_type=queue_type)
    async def handle(body: Any) -> None:
        nonlocal called
        called = True

    async with app:
        await admin.publish(b"{not json", routing_key=queue, content_type="application/json")
        parked = await _one(admin, f"{queue}.parked")

    assert not called
    assert parked.body == b"{not json"
    assert parked.header.properties.headers["x-rf-reason"] == "decode-error"
    assert "invalid JSON" in parked.header.properties.headers["x-rf-error"]


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_a_bytes_handler_gets_any_body_as_it_came(
    make_app: Callable[..., App], admin: Admin, queue_type: str
) -> None:
    app = make_app()
    queue = unique("raw")
    got: list[bytes] = []

    @app.consumer(queue, queue_type=queue_type)
    async def handle(body: bytes) -> None:
        got.append(body)

    async with app:
        await admin.publish(b"{not json", routing_key=queue, content_type="application/json")
        await wait_for(lambda: got == [b"{not json"])
    assert await admin.count(f"{queue}.parked") == 0


async def test_reject_parks_at_once_with_its_reason(make_app: Callable[..., App], admin: Admin) -> None:
    app = make_app()
    queue = unique("rej")
    calls = 0

    @app.consumer(queue, retries=5, delay=0.1)
    async def handle(body: Any) -> None:
        nonlocal calls
        calls += 1
        raise Reject("quantity must be positive")

    async with app:
        await app.publish({"quantity": -1}, routing_key=queue)
        parked = await _one(admin, f"{queue}.parked")

    headers = parked.header.properties.headers
    assert calls == 1
    assert (headers["x-rf-reason"], headers["x-rf-attempts"]) == ("rejected", 1)
    assert headers["x-rf-error"] == "quantity must be positive"


async def test_not_retryable_exception_parks_at_once(make_app: Callable[..., App], admin: Admin) -> None:
    app = make_app()
    queue = unique("nr")

    calls = 0

    @app.consumer(queue, retries=3, delay=0.1, dont_retry=KeyError)
    async def handle(body: Any) -> None:
        nonlocal calls
        calls += 1
        raise KeyError("sku")

    async with app:
        await app.publish({}, routing_key=queue)
        parked = await _one(admin, f"{queue}.parked")
        await asyncio.sleep(0.3)  # a retry, had there been one, would have come back by now
    headers = parked.header.properties.headers
    assert headers["x-rf-reason"] == "not-retryable"
    assert (calls, headers["x-rf-attempts"], headers["x-rf-exception"]) == (1, 1, "builtins.KeyError")


async def test_retry_signal_with_an_unplanned_delay(make_app: Callable[..., App], admin: Admin) -> None:
    app = make_app()
    queue = unique("sig")
    stamps: list[float] = []

    @app.consumer(queue, retries=1, delay=30)
    async def handle(body: Any, message: Message) -> None:
        stamps.append(time.monotonic())
        if message.attempt == 1:
            raise Retry(delay=0.3)

    admin.queues.add(f"{queue}.retry.300ms")  # declared on first use: deleted even if this fails
    async with app:
        await app.publish({}, routing_key=queue)
        await wait_for(lambda: len(stamps) == 2, timeout=10)
    assert 0.25 <= stamps[1] - stamps[0] <= 2.0


async def test_a_retry_queue_the_broker_refuses_parks_the_message_and_consuming_goes_on(
    make_app: Callable[..., App], admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()
    queue = unique("refused")
    taken = f"{queue}.retry.300ms"
    # Another service's queue of that name with another TTL: RabbitMQ answers 406 to ours.
    admin.queues.add(taken)
    await admin.channel.queue_declare(taken, durable=True, arguments={"x-message-ttl": 999})
    seen: list[int] = []

    @app.consumer(queue, retries=1, delay=30)
    async def handle(body: Any) -> None:
        seen.append(body["n"])
        if body["n"] <= 2:
            raise Retry(delay=0.3)

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        first = await _one(admin, f"{queue}.parked")
        await app.publish({"n": 2}, routing_key=queue)  # refused again, without a second 406
        second = await _one(admin, f"{queue}.parked")
        await app.publish({"n": 3}, routing_key=queue)
        await wait_for(lambda: seen == [1, 2, 3])
    assert await admin.count(queue) == 0
    assert await admin.count(taken) == 0
    asked = [r for r in caplog.records if "cannot declare its retry queue" in r.getMessage()]
    assert len(asked) == 1  # the second refusal came from the session's memory
    for parked, n in ((first, 1), (second, 2)):
        headers = parked.header.properties.headers
        assert parked.body == f'{{"n":{n}}}'.encode()
        assert (headers["x-rf-reason"], headers["x-rf-attempts"]) == ("not-retryable", 1)
        assert headers["x-rf-exception"] == "rabbitflow.errors.TopologyConflict"
        assert f"queue '{taken}'" in headers["x-rf-error"]
        assert "'x-message-ttl'" in headers["x-rf-error"]


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no text for you")


async def test_an_exception_whose_str_fails_is_still_parked_with_its_type(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("unprintable")

    @app.consumer(queue, retries=0)
    async def handle(body: Any) -> None:
        raise Unprintable()

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        parked = await _one(admin, f"{queue}.parked")
    headers = parked.header.properties.headers
    assert headers["x-rf-reason"] == "exhausted"
    assert headers["x-rf-exception"].endswith("test_consumer.Unprintable")
    assert headers["x-rf-error"] == "<Unprintable: str() failed with RuntimeError>"


@dataclass
class Order:
    sku: str
    qty: int

    def __post_init__(self) -> None:
        if self.qty <= 0:
            raise ValueError(f"qty must be positive, got {self.qty}")


async def test_a_body_its_dataclass_refuses_is_parked_and_consuming_goes_on(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("validate")
    orders: list[Order] = []

    @app.consumer(queue)
    async def handle(order: Order) -> None:
        orders.append(order)

    async with app:
        await app.publish({"sku": "a", "qty": 0}, routing_key=queue)
        parked = await _one(admin, f"{queue}.parked")
        await app.publish({"sku": "b", "qty": 2}, routing_key=queue)
        await wait_for(lambda: len(orders) == 1)
    assert orders == [Order("b", 2)]
    headers = parked.header.properties.headers
    assert parked.body == b'{"sku":"a","qty":0}'
    assert headers["x-rf-reason"] == "decode-error"
    assert "qty must be positive, got 0" in headers["x-rf-error"]
    assert await admin.count(queue) == 0


async def test_an_internal_fault_rejects_the_delivery_to_its_parking_queue_and_consuming_goes_on(
    make_app: Callable[..., App],
    admin: Admin,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    app = make_app()
    queue = unique("fault")
    seen: list[int] = []
    real_decide = consumer.decide

    def decide_badly(policy: Any, attempt: int, exc: BaseException | None) -> Any:
        if isinstance(exc, KeyError):
            raise RuntimeError("a bug in rabbitflow")
        return real_decide(policy, attempt, exc)

    # Fault injection into rabbitflow's own failure path (not the broker's behaviour).
    monkeypatch.setattr(consumer, "decide", decide_badly)

    @app.consumer(queue, retries=1, delay=30)
    async def handle(body: Any) -> None:
        seen.append(body["n"])
        if body["n"] == 1:
            raise KeyError("boom")

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        parked = await _one(admin, f"{queue}.parked")
        await app.publish({"n": 2}, routing_key=queue)
        await wait_for(lambda: seen == [1, 2])
    assert await admin.count(queue) == 0
    assert parked.body == b'{"n":1}'
    death = parked.header.properties.headers["x-death"][0]
    assert (death["queue"], death["reason"]) == (queue, "rejected")
    assert any("internal error on delivery" in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.mark.parametrize(
    "headers",
    [
        {"x-rf-attempt": 99},
        {"x-rf-attempt": -5},
        {"x-rf-attempt": "lots"},
        {
            "x-rf-attempt": 99,
            "x-death": [{"queue": "elsewhere.retry.1s", "reason": "expired", "count": 1000}],
        },
    ],
)
async def test_forged_attempt_headers_neither_skip_retries_nor_loop(
    make_app: Callable[..., App], admin: Admin, headers: dict[str, Any]
) -> None:
    app = make_app()
    queue = unique("forged")
    attempts: list[int] = []

    @app.consumer(queue, retries=2, delay=0.1)
    async def handle(body: Any, message: Message) -> None:
        attempts.append(message.attempt)
        raise RuntimeError("always")

    async with app:
        await admin.publish(b"{}", routing_key=queue, content_type="application/json", headers=headers)
        parked = await _one(admin, f"{queue}.parked")
        await asyncio.sleep(0.3)

    assert attempts == [1, 2, 3]
    assert parked.header.properties.headers["x-rf-attempts"] == 3


async def test_two_services_on_one_exchange_keep_separate_retry_topologies(
    make_app: Callable[..., App],
) -> None:
    exchange = unique("shared")
    billing, shipping = make_app(), make_app()
    b_calls: list[int] = []
    s_calls: list[int] = []
    b_queue, s_queue = unique("billing"), unique("shipping")

    @billing.consumer(
        b_queue, exchange=exchange, exchange_type="topic", routing_key="order.*", retries=1, delay=0.2
    )
    async def bill(body: Any, message: Message) -> None:
        b_calls.append(message.attempt)
        if message.attempt == 1:
            raise RuntimeError("payment gateway down")

    @shipping.consumer(
        s_queue, exchange=exchange, exchange_type="topic", routing_key="order.#", retries=1, delay=0.2
    )
    async def ship(body: Any, message: Message) -> None:
        s_calls.append(message.attempt)

    assert billing.plan.exchanges[0].name != shipping.plan.exchanges[0].name
    async with billing, shipping:
        await billing.publish({"id": 1}, exchange=exchange, routing_key="order.created")
        await wait_for(lambda: len(b_calls) == 2, timeout=10)
        await asyncio.sleep(0.4)
    assert b_calls == [1, 2]
    assert s_calls == [1]


async def _one(admin: Admin, queue: str, timeout: float = 15) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            message = await admin.get(queue)
            if message is not None:
                return message
            await asyncio.sleep(0.05)


async def test_a_message_that_keeps_coming_back_is_parked_as_delivery_limit(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("poison")
    called = False

    @app.consumer(queue, retries=3, delay=0.1)  # quorum: the broker counts deliveries
    async def handle(body: Any) -> None:
        nonlocal called
        called = True

    await app.declare()
    await admin.publish(b'{"id": 7}', routing_key=queue, content_type="application/json")
    # Ten deliveries that never settle, as if ten workers had crashed on this message.
    for _ in range(10):
        message = await _one_unacked(admin, queue)
        await admin.channel.basic_reject(message.delivery.delivery_tag, requeue=True)

    async with app:
        parked = await _one(admin, f"{queue}.parked")
    headers = parked.header.properties.headers
    assert not called
    assert headers["x-rf-reason"] == "delivery-limit"
    assert "delivered 11 times" in headers["x-rf-error"]
    assert parked.body == b'{"id": 7}'


async def _one_unacked(admin: Admin, queue: str) -> Any:
    async with asyncio.timeout(10):
        while True:
            message = await admin.channel.basic_get(queue, no_ack=False)
            if message.delivery.__class__.__name__ == "GetOk":
                return message
            await asyncio.sleep(0.02)


async def test_stop_right_after_a_failure_leaves_exactly_one_copy(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("stopretry")
    failed = asyncio.Event()

    @app.consumer(queue, retries=2, delay=30, queue_type="classic")
    async def handle(body: Any) -> None:
        failed.set()
        raise RuntimeError("try later")

    await app.start()
    await app.publish({"id": 1}, routing_key=queue)
    await failed.wait()
    await app.stop()  # the copy's confirm may still be on its way: stop waits for it

    assert await admin.count(f"{queue}.retry.30s") == 1
    assert await admin.count(queue) == 0  # the original was acked, not requeued
