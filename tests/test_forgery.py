"""What an outside producer with write access to the service's queues can forge, on the real
broker: attempt headers and death records can only shorten a message's retries, never give it
more than retries + 1 handler calls (docs/topology.md, "What a producer can forge")."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from rabbitflow import App, Message, names

from .helpers import Admin, unique, wait_for

RETRIES = 2
DELAY = 0.2


def death(queue: str, reason: str = "expired") -> list[dict[str, Any]]:
    """An x-death header as RabbitMQ writes it, for `queue`."""
    return [{"count": 1, "reason": reason, "queue": queue, "exchange": "", "routing-keys": [queue]}]


# (where the producer publishes, the headers it forges, the attempts the handler then sees)
CASES: dict[str, tuple[str, dict[str, Any], list[int]]] = {
    "attempt 99 into the retry queue": ("retry", {"x-rf-attempt": 99}, [3]),
    "attempt 2**62 into the retry queue": ("retry", {"x-rf-attempt": 2**62}, [3]),
    "attempt 2 into the retry queue": ("retry", {"x-rf-attempt": 2}, [2, 3]),
    "x-death and attempt 99 into the queue": ("queue", {"x-death": "RETRY", "x-rf-attempt": 99}, [3]),
    "x-last-death-* and attempt 2 into the queue": (
        "queue",
        {"x-last-death-queue": "RETRY", "x-last-death-reason": "expired", "x-rf-attempt": 2},
        [2, 3],
    ),
    "attempt 99 into the queue, no death": ("queue", {"x-rf-attempt": 99}, [1, 2, 3]),
    "attempt 99 through the exchange": ("exchange", {"x-rf-attempt": 99}, [1, 2, 3]),
    "x-death and attempt 99 through the exchange": (
        "exchange",
        {"x-death": "RETRY", "x-rf-attempt": 99},
        [1, 2, 3],
    ),
    "attempt 0 into the retry queue": ("retry", {"x-rf-attempt": 0}, [1, 2, 3]),
    "attempt -5 into the retry queue": ("retry", {"x-rf-attempt": -5}, [1, 2, 3]),
    "attempt '3' into the retry queue": ("retry", {"x-rf-attempt": "3"}, [1, 2, 3]),
    "attempt 2.0 into the retry queue": ("retry", {"x-rf-attempt": 2.0}, [1, 2, 3]),
    "attempt True into the retry queue": ("retry", {"x-rf-attempt": True}, [1, 2, 3]),
    "x-death of another queue's retry queue": (
        "queue",
        {"x-death": "OTHER", "x-rf-attempt": 99},
        [1, 2, 3],
    ),
    "x-death with reason rejected": ("queue", {"x-death": "REJECTED", "x-rf-attempt": 99}, [1, 2, 3]),
    "x-death that is no list": ("queue", {"x-death": "nonsense", "x-rf-attempt": 99}, [1, 2, 3]),
    "x-delivery-count 1000": ("queue", {"x-delivery-count": 1000}, [1, 2, 3]),
    "park headers": ("queue", {"x-rf-reason": "exhausted", "x-rf-attempts": 99}, [1, 2, 3]),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_forged_headers_never_give_more_than_retries_plus_one_calls(
    make_app: Callable[..., App], admin: Admin, case: str
) -> None:
    where, forged, expected = CASES[case]
    app = make_app()
    queue, exchange = unique("forged"), unique("shop")
    retry_queue = names.retry_queue(queue, DELAY)
    attempts: list[int] = []

    @app.consumer(queue, exchange=exchange, routing_key="order", retries=RETRIES, delay=DELAY)
    async def handle(body: Any, message: Message) -> None:
        attempts.append(message.attempt)
        raise RuntimeError("always fails")

    records = {
        "RETRY": death(retry_queue),
        "OTHER": death(names.retry_queue(unique("other"), DELAY)),
        "REJECTED": death(retry_queue, "rejected"),
    }
    headers = {k: records.get(v, v) if k == "x-death" else v for k, v in forged.items()}
    if headers.get("x-last-death-queue") == "RETRY":
        headers["x-last-death-queue"] = retry_queue
    target = {"retry": ("", retry_queue), "queue": ("", queue), "exchange": (exchange, "order")}[where]

    async with app:
        await admin.publish(
            b'{"id": 1}',
            exchange=target[0],
            routing_key=target[1],
            content_type="application/json",
            message_id="forged",
            headers=headers,
        )
        await wait_for(lambda: len(attempts) == len(expected))
        async with asyncio.timeout(10):
            while await admin.count(f"{queue}.parked") < 1:  # noqa: ASYNC110 - the broker's state
                await asyncio.sleep(0.05)
        await asyncio.sleep(3 * DELAY)  # time enough for any further attempt to arrive
        parked = await admin.drain(f"{queue}.parked")

    assert attempts == expected
    assert len(attempts) <= RETRIES + 1
    assert len(parked) == 1
    parked_headers = parked[0].header.properties.headers
    assert parked_headers["x-rf-reason"] == "exhausted"
    assert parked_headers["x-rf-attempts"] == expected[-1]
    assert parked_headers["x-rf-queue"] == queue


async def test_a_forged_origin_cannot_steer_a_replay_to_another_queue(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue, victim_exchange, victim = unique("forged"), unique("billing"), unique("victim")
    await admin.channel.exchange_declare(victim_exchange, exchange_type="direct")
    await admin.channel.queue_declare(victim)
    await admin.channel.queue_bind(victim, victim_exchange, routing_key="charge")
    admin.queues.add(victim)
    admin.exchanges.add(victim_exchange)

    @app.consumer(queue, retries=1, delay=DELAY)
    async def handle(body: Any) -> None:
        raise RuntimeError("parks it")

    async with app:
        # A producer allowed to write to `queue` only: a death record, an attempt past the last,
        # and the origin it wants a replay to go to.
        await admin.publish(
            b'{"amount": 1000000}',
            routing_key=queue,
            content_type="application/json",
            headers={
                "x-death": death(names.retry_queue(queue, DELAY)),
                "x-rf-attempt": 2,
                "x-rf-original-exchange": victim_exchange,
                "x-rf-original-routing-key": "charge",
            },
        )
        async with asyncio.timeout(10):
            while await admin.count(f"{queue}.parked") < 1:  # noqa: ASYNC110 - the broker's state
                await asyncio.sleep(0.05)
        assert await app.replay(queue) == 1
        await asyncio.sleep(0.5)
        assert await admin.count(victim) == 0
