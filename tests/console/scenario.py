"""A service with a parking lot worth looking at, on the real broker, its console served on a
free port: what the browser test drives and what `python -m tests.console.screenshots` draws.

The service `shop-…` consumes `….orders.created` from the exchange `….orders` (routing key
`order.created`) and `….orders.shipped`. A sibling queue `….audit`, bound to the same exchange
with the same key, is not the service's: it gets a copy of every order, and must never get a
replayed one. While `Shop.failing` is set, bad orders raise ValueError (parked: exhausted);
an order marked `reject` is rejected, and a body that is not JSON cannot be decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiormq

from rabbitflow import App, Message, Reject
from rabbitflow.console import Rates, console_app
from rabbitflow.http import HttpServer, serve

BROKER_URL = os.environ.get("RABBITFLOW_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")
TOKEN = "console-test-token-" + uuid.uuid4().hex[:8]
ROUTING_KEY = "order.created"
HOSTILE_BODY = {"id": 666, "note": "<script>alert('body')</script>", "kind": "bad"}
HOSTILE_HEADER = ("<img src=x onerror=alert('header')>", "<b>not bold</b>")


@dataclass
class Shop:
    app: App
    server: HttpServer
    orders: str  # the consumer's queue that parks
    shipped: str  # a healthy consumer's queue
    exchange: str
    sibling: str  # bound to `exchange` like `orders`, not consumed
    failing: bool = True
    handled: list[str] = field(default_factory=list)  # message ids handled by `orders`
    bad_ids: list[str] = field(default_factory=list)  # the orders that fail with ValueError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/console"

    async def sibling_count(self) -> int:
        return await _count(self.sibling)


async def _count(queue: str) -> int:
    connection = await aiormq.connect(BROKER_URL)
    try:
        channel = await connection.channel()
        return int((await channel.queue_declare(queue, passive=True)).message_count or 0)
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def shop(*, traffic: float = 0.0) -> AsyncIterator[Shop]:
    """The running service with 3 orders parked as ValueError (one of them hostile), 1 rejected
    and 1 undecodable; `traffic` seconds of healthy messages for the charts first."""
    name = f"shop-{uuid.uuid4().hex[:8]}"
    rates = Rates()
    app = App(name, url=BROKER_URL, middleware=[rates], graceful_timeout=5)
    exchange, orders, shipped = f"{name}.orders", f"{name}.orders.created", f"{name}.orders.shipped"
    sibling = f"{name}.audit"
    state: dict[str, Shop] = {}

    @app.consumer(orders, exchange=exchange, routing_key=ROUTING_KEY, retries=0, queue_type="classic")
    async def on_created(order: dict[str, Any], message: Message) -> None:
        if order.get("reject"):
            raise Reject("order for a closed account")
        if state["shop"].failing and order.get("kind") == "bad":
            raise ValueError(f"price must be positive, got {order.get('price', -1)} for order {order['id']}")
        state["shop"].handled.append(message.message_id or "")

    @app.consumer(shipped, queue_type="classic")
    async def on_shipped(order: dict[str, Any]) -> None:
        await asyncio.sleep(0.01)

    console = console_app(app, token=TOKEN, enable_actions=True)
    server = await serve(app, 0, console=console)
    the_shop = state["shop"] = Shop(app, server, orders, shipped, exchange, sibling)
    connection = await aiormq.connect(BROKER_URL)
    channel = await connection.channel()
    try:
        async with app:
            await channel.queue_declare(sibling, durable=True)
            await channel.queue_bind(sibling, exchange, routing_key=ROUTING_KEY)
            await _publish(app, the_shop, channel, traffic)
            async with asyncio.timeout(20):
                while await _count(f"{orders}.parked") < 5:  # noqa: ASYNC110 - waiting on the broker
                    await asyncio.sleep(0.1)
            yield the_shop
    finally:
        await server.close()
        with contextlib.suppress(Exception):
            await channel.queue_delete(sibling)
        await connection.close()
        await app.admin().delete(force=True)
        with contextlib.suppress(Exception):
            await _delete_exchange(exchange)


async def _publish(app: App, shop: Shop, channel: aiormq.abc.AbstractChannel, traffic: float) -> None:
    end = asyncio.get_running_loop().time() + traffic
    n = 0
    while asyncio.get_running_loop().time() < end:
        n += 1
        await app.publish({"id": n}, routing_key=shop.shipped)
        if n % 7 == 0:
            await app.publish({"id": n, "kind": "good"}, exchange=shop.exchange, routing_key=ROUTING_KEY)
        await asyncio.sleep(0.02 + 0.03 * (n % 40) / 40)
    for i, price in enumerate((-5, 0)):
        message_id = f"order-{100 + i}"
        shop.bad_ids.append(message_id)
        await app.publish(
            {"id": 100 + i, "price": price, "kind": "bad"},
            exchange=shop.exchange,
            routing_key=ROUTING_KEY,
            message_id=message_id,
        )
    shop.bad_ids.append("order-666")
    await app.publish(
        HOSTILE_BODY,
        exchange=shop.exchange,
        routing_key=ROUTING_KEY,
        message_id="order-666",
        headers=dict([HOSTILE_HEADER]),
    )
    await app.publish(
        {"id": 200, "reject": True}, exchange=shop.exchange, routing_key=ROUTING_KEY, message_id="order-200"
    )
    await channel.basic_publish(
        b"{not json",
        exchange=shop.exchange,
        routing_key=ROUTING_KEY,
        properties=aiormq.spec.Basic.Properties(content_type="application/json", message_id="order-300"),
    )


async def _delete_exchange(name: str) -> None:
    connection = await aiormq.connect(BROKER_URL)
    try:
        channel = await connection.channel()
        await channel.exchange_delete(name)
    finally:
        await connection.close()
