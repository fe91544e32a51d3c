"""Operator work on a plan and a connection of its own (`App.admin()`), as the CLI does it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from rabbitflow import App, ConfigError, Reject

from .helpers import Admin, unique, wait_for


async def test_purge_removes_what_is_parked_and_nothing_else(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("purge")
    seen: list[int] = []

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        seen.append(body["n"])
        if body["n"] < 3:
            raise Reject("bad")

    async with app:
        for n in range(5):
            await app.publish({"n": n}, routing_key=queue)
        await wait_for(lambda: len(seen) == 5)
        await wait_for(
            lambda: len(app.health()["consumers"]) == 1 and app.health()["consumers"][0]["in_flight"] == 0
        )
    assert await admin.count(f"{queue}.parked") == 3
    assert [m.reason for m in await app.parked(f"{queue}.parked")] == ["rejected"] * 3  # either name works
    assert (await app.admin().purge_parked(queue)).done == 3
    assert await admin.count(f"{queue}.parked") == 0


async def test_purge_of_a_queue_without_a_consumer_says_which_queues_there_are(
    make_app: Callable[..., App],
) -> None:
    app = make_app()

    @app.consumer(unique("known"))
    async def handle(body: Any) -> None: ...

    with pytest.raises(ConfigError, match="has no consumer"):
        await app.admin().purge_parked("not-mine")


async def test_delete_refuses_queues_that_hold_messages_unless_forced(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue, exchange = unique("del"), unique("shared")

    @app.consumer(queue, exchange=exchange, queue_type="classic", retries=1, delay=5)
    async def handle(body: Any) -> None: ...

    await app.declare()
    admin.exchanges.add(exchange)
    await admin.publish(b"{}", routing_key=queue)
    with pytest.raises(ConfigError, match=rf"{queue} \(1\)"):
        await app.admin().delete()
    assert await admin.count(queue) == 1  # nothing was deleted
    deleted = await app.admin().delete(force=True)
    assert set(deleted) == {queue, f"{queue}.parked", f"{queue}.retry.5s", f"{app.name}.dlx"}
    await admin.channel.exchange_declare(exchange, exchange_type="direct", passive=True)  # shared: kept
    for name in (queue, f"{queue}.parked"):
        probe = await admin.channel.connection.channel()
        with pytest.raises(Exception, match="NOT_FOUND"):
            await probe.queue_declare(name, passive=True)
