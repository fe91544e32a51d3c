"""A consumer the broker forgot without a basic.cancel (RabbitMQ 3.10, a quorum queue deleted
after its leader moved: seen in the chaos soak) is found by its idle probe and consumes again."""

from __future__ import annotations

import asyncio

import pytest

from rabbitflow import App
from rabbitflow import subscription as subscription_module
from rabbitflow.testing import MemoryBroker

from .helpers import wait_for


@pytest.mark.parametrize("deleted", [False, True], ids=["consumer-lost", "queue-deleted"])
async def test_a_consumer_the_broker_forgot_consumes_again(
    deleted: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subscription_module, "IDLE_PROBE", 0.05)
    broker = MemoryBroker()
    app = App("forgotten", broker=broker)
    got: list[int] = []

    @app.consumer("work")
    async def handle(body: dict[str, int]) -> None:
        got.append(body["n"])

    async with app:
        await app.publish({"n": 1}, routing_key="work")
        await wait_for(lambda: got == [1])
        assert broker.lose_consumers("work", delete=deleted) == 1
        await asyncio.sleep(0.3)  # a few idle probes
        (consumer,) = app.health()["consumers"]
        assert consumer["resubscribed"] == 1
        assert consumer["subscribed"]
        await app.publish({"n": 2}, routing_key="work")
        await wait_for(lambda: got == [1, 2])


async def test_an_idle_consumer_that_is_still_there_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subscription_module, "IDLE_PROBE", 0.05)
    app = App("idle", url="memory://")

    @app.consumer("work")
    async def handle(body: object) -> None: ...

    async with app:
        await asyncio.sleep(0.3)
        (consumer,) = app.health()["consumers"]
        assert consumer["resubscribed"] == 0
        assert consumer["subscribed"]
