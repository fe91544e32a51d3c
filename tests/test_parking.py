"""Parked messages: reading them, and sending them back once the bug is fixed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rabbitflow import App, Message

from .helpers import Admin, unique, wait_for


async def test_replay_sends_parked_messages_back_to_start_again(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    exchange, queue = unique("shop"), unique("orders")
    broken = True
    handled: list[tuple[int, int]] = []

    @app.consumer(queue, exchange=exchange, routing_key="order.created", retries=1, delay=0.1)
    async def handle(order: dict[str, int], message: Message) -> None:
        if broken:
            raise ValueError("bug in the handler")
        handled.append((order["id"], message.attempt))

    async with app:
        for n in range(3):
            await app.publish(
                {"id": n},
                exchange=exchange,
                routing_key="order.created",
                headers={"tenant": "acme"},
                message_id=f"order-{n}",
            )
        async with asyncio.timeout(10):
            while len(await app.parked(queue)) < 3:  # noqa: ASYNC110 - the broker state is not ours
                await asyncio.sleep(0.05)

        parked = await app.parked(queue)
        assert [p.message_id for p in parked] == ["order-0", "order-1", "order-2"]
        assert {(p.reason, p.attempts, p.error) for p in parked} == {("exhausted", 2, "bug in the handler")}
        assert await admin.count(f"{queue}.parked") == 3  # looking did not take them

        broken = False
        assert await app.replay(queue, limit=2) == 2
        await wait_for(lambda: len(handled) == 2)
        assert await app.replay(queue) == 1
        await wait_for(lambda: len(handled) == 3)

    assert sorted(handled) == [(0, 1), (1, 1), (2, 1)]  # a fresh start: attempt 1 again
    assert await admin.count(f"{queue}.parked") == 0


async def test_replay_of_an_empty_parking_queue_sends_nothing(make_app: Callable[..., App]) -> None:
    app = make_app()
    queue = unique("empty")

    @app.consumer(queue)
    async def handle(body: Any) -> None: ...

    async with app:
        assert await app.parked(queue) == []
        assert await app.replay(queue) == 0


async def test_replay_goes_to_the_queue_that_parked_it_never_to_its_siblings(
    make_app: Callable[..., App], admin: Admin
) -> None:
    """Two queues on one fanout exchange; one parks a message; the replay reaches that one only."""
    app = make_app()
    exchange, parks, sibling = unique("fan"), unique("parks"), unique("sibling")
    fixed = False
    parks_got: list[int] = []
    sibling_got: list[int] = []

    @app.consumer(parks, exchange=exchange, exchange_type="fanout", retries=0, queue_type="classic")
    async def on_parks(body: dict[str, int]) -> None:
        if not fixed:
            raise RuntimeError("bug")
        parks_got.append(body["n"])

    @app.consumer(sibling, exchange=exchange, exchange_type="fanout", queue_type="classic")
    async def on_sibling(body: dict[str, int]) -> None:
        sibling_got.append(body["n"])

    admin.exchanges.add(exchange)
    async with app:
        await app.publish({"n": 1}, exchange=exchange, routing_key="")
        await wait_for(lambda: sibling_got == [1])
        await wait_for(lambda: len(app.health()["consumers"]) == 2)
    assert await admin.count(f"{parks}.parked") == 1
    fixed = True
    async with app:
        assert await app.replay(parks) == 1
        await wait_for(lambda: parks_got == [1])
        await asyncio.sleep(0.3)
    assert sibling_got == [1]  # the sibling never saw it twice


async def test_replay_takes_only_what_was_parked_when_it_began(
    make_app: Callable[..., App], admin: Admin
) -> None:
    """A consumer that parks every replayed message again cannot keep a replay busy forever."""
    app = make_app()
    queue = unique("again")

    @app.consumer(queue, retries=0, queue_type="classic")
    async def handle(body: Any) -> None:
        raise RuntimeError("still broken")

    async with app:
        for n in range(5):
            await app.publish({"n": n}, routing_key=queue)
        await wait_for(lambda: app.health()["consumers"][0]["settled"] == 5)
        await asyncio.sleep(0.2)
        assert await app.replay(queue) == 5  # parked again at once, while the replay runs
        await wait_for(lambda: app.health()["consumers"][0]["settled"] == 10)
    await asyncio.sleep(0.2)
    assert await admin.count(f"{queue}.parked") == 5
