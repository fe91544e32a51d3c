"""An order service: consumes orders, confirms them, retries a flaky dependency, parks bad input.

Run it:   rabbitflow run examples/orders.py:app            (a broker on localhost:5672)
          rabbitflow run examples/orders.py:app --url memory://   (no broker at all)
Inspect:  rabbitflow topology examples/orders.py:app --format mermaid
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from rabbitflow import App, Message, Reject

log = logging.getLogger("orders")


@dataclass
class Order:
    id: int
    item: str
    quantity: int


@contextlib.asynccontextmanager
async def shop(app: App) -> AsyncIterator[None]:
    """Publish an order every half second while the service runs (a stand-in for a web shop)."""

    async def customers() -> None:
        for n in itertools.count(1):
            quantity = random.choice([1, 2, 3, 0])  # 0 is invalid: parked with the reason
            await app.publish(
                {"id": n, "item": random.choice(["tea", "cake", "scones"]), "quantity": quantity},
                exchange="orders",
                routing_key="order.created",
            )
            await asyncio.sleep(0.5)

    task = asyncio.create_task(customers())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def create_app(url: str | None = None, *, demo_traffic: bool = True) -> App:
    """The service; tests make their own with url="memory://" and no demo traffic."""
    app = App("orders", url=url, lifespan=shop if demo_traffic else None)

    @app.consumer(
        "orders.created", exchange="orders", routing_key="order.created", retries=3, delay=[1, 5, 30]
    )
    async def on_created(order: Order, message: Message) -> None:
        if order.quantity <= 0:
            raise Reject(f"order {order.id}: quantity must be positive")
        if message.attempt == 1 and order.id % 4 == 0:
            raise ConnectionError("inventory service did not answer")  # retried after 1 s
        log.info(
            "order %d: %d x %s reserved (attempt %d)", order.id, order.quantity, order.item, message.attempt
        )
        await app.publish(
            {"id": order.id, "status": "confirmed"}, exchange="orders", routing_key="order.confirmed"
        )

    @app.consumer("orders.confirmed", exchange="orders", routing_key="order.confirmed")
    async def on_confirmed(event: dict[str, object]) -> None:
        log.info("order %s confirmed", event["id"])

    return app


app = create_app()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    app.run()
