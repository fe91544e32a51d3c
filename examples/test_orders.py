"""How to test a rabbitflow service without a broker: the order service of orders.py.

Run with `pytest examples/` — milliseconds, although the retry ladder waits 1 s, 5 s and 30 s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from orders import create_app

from rabbitflow.testing import TestClient


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    async with TestClient(create_app("memory://", demo_traffic=False)) as client:
        yield client


async def test_an_order_is_confirmed(client: TestClient) -> None:
    await client.publish(
        {"id": 1, "item": "tea", "quantity": 2}, exchange="orders", routing_key="order.created"
    )
    await client.drain()
    assert [s.body for s in client.sent(routing_key="order.confirmed")] == [{"id": 1, "status": "confirmed"}]


async def test_a_flaky_inventory_is_retried_after_one_second(client: TestClient) -> None:
    await client.publish(
        {"id": 4, "item": "cake", "quantity": 1}, exchange="orders", routing_key="order.created"
    )
    await client.drain()
    confirmed = client.sent(routing_key="order.confirmed")
    assert [s.body["id"] for s in confirmed] == [4]
    assert confirmed[0].time == 1.0  # virtual seconds: the first retry waits 1 s
    assert [(f.queue, f.attempt) for f in client.failures] == [("orders.created", 1)]


async def test_a_bad_quantity_is_parked_with_the_reason(client: TestClient) -> None:
    await client.publish(
        {"id": 2, "item": "tea", "quantity": 0}, exchange="orders", routing_key="order.created"
    )
    await client.drain()
    [parked] = client.parked("orders.created")
    assert parked.reason == "rejected"
    assert parked.error == "order 2: quantity must be positive"
    assert client.sent(routing_key="order.confirmed") == []
