"""Parked messages: reading them, and sending them back once the bug is fixed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from rabbitflow import App, ConfigError, Message
from rabbitflow.parking.message import Filter
from rabbitflow.testing import MemoryBroker
from rabbitflow.transport.base import Properties

from ..helpers import Admin, unique, wait_for


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


# -- looking any number of times ---------------------------------------------------------------


def parked_copy(n: int, **extra: Any) -> tuple[bytes, dict[str, Any]]:
    """A message as rabbitflow parks it: the body and the x-rf-* headers of its failure."""
    headers = {
        "x-rf-reason": "exhausted",
        "x-rf-attempts": 3,
        "x-rf-exception": "builtins.ValueError",
        "x-rf-error": f"bad order {n}",
        "x-rf-first-failure": f"2026-01-01T10:00:0{n}.000Z",
        "x-rf-last-failure": f"2026-01-01T10:01:0{n}.000Z",
        **extra,
    }
    return f'{{"n": {n}}}'.encode(), headers


async def test_looking_fifty_times_at_a_quorum_parking_queue_with_a_small_delivery_limit_drops_nothing(
    make_app: Callable[..., App], admin: Admin
) -> None:
    """RabbitMQ 3.10 counts a basic.get returned by closing the channel as a delivery (so do
    reject, nack and recover): with x-delivery-limit 5 and no dead-letter exchange, the sixth look
    of the old peek dropped every parked message. A look must never return one."""
    app = make_app()
    queue = unique("looked")

    @app.consumer(queue)  # quorum
    async def handle(body: Any) -> None: ...

    parked = f"{queue}.parked"
    admin.queues.add(parked)
    await admin.channel.queue_declare(
        parked, durable=True, arguments={"x-queue-type": "quorum", "x-delivery-limit": 5}
    )
    for n in range(3):
        body, headers = parked_copy(n)
        await admin.publish(body, routing_key=parked, message_id=f"m-{n}", headers=headers, delivery_mode=2)

    ids = ["m-0", "m-1", "m-2"]
    for look in range(50):
        if look % 2:
            assert [m.message_id for m in await app.parked(queue)] == ids, f"look {look}"
        else:
            listing = await app.admin().list_parked(queue)
            assert [m.message_id for m in listing.messages] == ids, f"look {look}"
            assert listing.total == 3
    assert await admin.count(parked) == 3
    kept = await admin.drain(parked)
    assert [m.header.properties.message_id for m in kept] == ids
    assert kept[0].body == b'{"n": 0}'
    assert kept[0].header.properties.headers["x-rf-error"] == "bad order 0"  # unchanged


@pytest.mark.parametrize(("version", "limit"), [("4.0", None), ("4.3", None), ("4.3", 5)])
async def test_looking_fifty_times_on_rabbitmq_4_drops_nothing(version: str, limit: int | None) -> None:
    """4.0+ give a quorum queue without x-delivery-limit a limit of 20 and drop a message over it
    when no dead-letter exchange is set (a parking queue declared before rabbitflow set its own
    limit); 4.3 still counts a return by channel close."""
    app = App(unique("svc"), url="memory://", broker=MemoryBroker(version=version))
    queue = unique("looked")

    @app.consumer(queue)
    async def handle(body: Any) -> None: ...

    arguments: dict[str, Any] = {"x-queue-type": "quorum"}
    if limit is not None:
        arguments["x-delivery-limit"] = limit
    async with app.admin().connection() as transport:
        channel = await transport.channel()
        await channel.declare_queue(f"{queue}.parked", arguments=arguments)
        for n in range(4):
            body, headers = parked_copy(n)
            await channel.publish(
                body,
                exchange="",
                routing_key=f"{queue}.parked",
                properties=Properties(message_id=f"m-{n}", headers=headers, delivery_mode=2),
            )
    ids = [f"m-{n}" for n in range(4)]
    for look in range(50):
        listing = await app.admin().list_parked(queue, limit=2)
        assert listing.total == 4, f"{version}: look {look} lost a message"
        assert [m.message_id for m in listing.messages] == ids[:2]
    assert [m.message_id for m in await app.parked(queue)] == ids


async def test_a_filtered_replay_leaves_the_others_parked_in_their_order(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("mixed")
    handled: list[int] = []
    broken = True

    @app.consumer(queue, retries=0)
    async def handle(body: dict[str, int]) -> None:
        if broken:
            raise (KeyError if body["n"] % 2 else ValueError)(f"bug {body['n']}")
        handled.append(body["n"])

    async with app:
        for n in range(6):
            await app.publish({"n": n}, routing_key=queue, message_id=f"m-{n}")
        await wait_for(lambda: app.health()["consumers"][0]["settled"] == 6)
        await asyncio.sleep(0.2)
        listing = await app.admin().list_parked(queue)
        assert [(g.exception, g.count) for g in listing.groups] == [
            ("builtins.KeyError", 3),
            ("builtins.ValueError", 3),
        ]
        broken = False
        dry = await app.admin().replay_parked(queue, filter=Filter(exception="KeyError"), dry_run=True)
        assert (dry.done, dry.skipped) == (3, 3)
        await asyncio.sleep(0.2)
        assert handled == []  # a dry run sends nothing
        outcome = await app.admin().replay_parked(queue, filter=Filter(exception="KeyError"))
        assert (outcome.found, outcome.done, outcome.skipped) == (6, 3, 3)
        await wait_for(lambda: sorted(handled) == [1, 3, 5])
        left = await app.admin().list_parked(queue)
        assert [m.message_id for m in left.messages] == ["m-0", "m-2", "m-4"]
        assert {m.error for m in left.messages} == {"bug 0", "bug 2", "bug 4"}  # still what it was


async def test_a_filtered_purge_removes_only_the_matching_ones(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("purged")

    @app.consumer(queue, queue_type="classic")
    async def handle(body: Any) -> None: ...

    await app.declare()
    for n in range(5):
        reason = "rejected" if n in (1, 3) else "exhausted"
        body, headers = parked_copy(n, **{"x-rf-reason": reason})
        await admin.publish(body, routing_key=f"{queue}.parked", message_id=f"m-{n}", headers=headers)
    outcome = await app.admin().purge_parked(queue, filter=Filter(reason="rejected"))
    assert (outcome.done, outcome.skipped) == (2, 3)
    kept = await admin.drain(f"{queue}.parked")
    assert [m.header.properties.message_id for m in kept] == ["m-0", "m-2", "m-4"]
    assert [m.body for m in kept] == [b'{"n": 0}', b'{"n": 2}', b'{"n": 4}']


async def test_an_attempts_header_that_is_no_number_does_not_stop_a_look(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("odd")

    @app.consumer(queue)
    async def handle(body: Any) -> None: ...

    await app.declare()
    body, headers = parked_copy(1, **{"x-rf-attempts": "three"})
    await admin.publish(body, routing_key=f"{queue}.parked", message_id="odd", headers=headers)
    [message] = await app.parked(queue)
    assert (message.message_id, message.attempts, message.error) == ("odd", 0, "bad order 1")


def test_a_filter_with_an_unknown_reason_says_which_there_are() -> None:
    with pytest.raises(ConfigError, match="use one of exhausted, rejected"):
        Filter(reason="exausted")
