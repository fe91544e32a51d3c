"""A consumer the broker forgot without a basic.cancel (RabbitMQ 3.10, a quorum queue deleted
after its leader moved: seen in the chaos soak) is found by its idle probe and consumes again."""

from __future__ import annotations

import asyncio

import pytest

from rabbitflow import App
from rabbitflow.runtime import subscription as subscription_module
from rabbitflow.testing import MemoryBroker

from ..helpers import wait_for


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


async def test_a_ghost_consumer_is_found_after_another_app_declared_the_queue_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chaos soak's case: the queue deleted without a basic.cancel to either consumer; the
    first to probe declares it again, so the other's probe finds a queue with a consumer — not
    its own. It subscribes afresh, and both consume again."""
    monkeypatch.setattr(subscription_module, "IDLE_PROBE", 0.05)
    broker = MemoryBroker()
    apps = [App("ghosts", broker=broker), App("ghosts", broker=broker)]
    got: list[list[int]] = [[], []]
    for app, mine in zip(apps, got, strict=True):

        @app.consumer("work", prefetch=1)
        async def handle(body: dict[str, int], mine: list[int] = mine) -> None:
            mine.append(body["n"])
            await asyncio.sleep(0.01)

    async with apps[0], apps[1]:
        assert broker.lose_consumers("work", delete=True) == 2
        await asyncio.sleep(0.5)
        assert len(broker.queues["work"].consumers) == 2
        for n in range(20):
            await apps[0].publish({"n": n}, routing_key="work")
        await wait_for(lambda: len(got[0]) + len(got[1]) == 20)
    assert got[0]
    assert got[1]


@pytest.mark.looptime
async def test_a_forgotten_consumer_is_probed_an_idle_probe_after_its_last_message() -> None:
    """The probe comes IDLE_PROBE (30 s) after the consumer last settled, give or take a few
    seconds, not up to twice that: busy until just past a 30 s mark, it had to wait out the
    whole next window before (up to 60 s deaf to a queue the broker deleted silently)."""
    broker = MemoryBroker()
    app = App("forgotten", broker=broker)
    got: list[int] = []

    @app.consumer("work")
    async def handle(body: dict[str, int]) -> None:
        got.append(body["n"])

    loop = asyncio.get_running_loop()
    async with app:
        start = loop.time()
        for n in range(12):  # one message every 3 s, the last at 33 s
            await asyncio.sleep(start + 3 * n - loop.time())
            await app.publish({"n": n}, routing_key="work")
            await wait_for(lambda n=n: len(got) == n + 1)
        assert broker.lose_consumers("work", delete=True) == 1
        await asyncio.sleep(start + 33 + subscription_module.IDLE_PROBE + 7 - loop.time())
        (consumer,) = app.health()["consumers"]
        assert consumer["resubscribed"] == 1
        assert consumer["subscribed"]
