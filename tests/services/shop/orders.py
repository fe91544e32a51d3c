"""Orders: a dataclass body, bound to the shop's topic exchange."""

from __future__ import annotations

from dataclasses import dataclass

from rabbitflow import Message, Router

from ...helpers import unique

EXCHANGE = unique("shop")
QUEUE = unique("shop.orders")
router = Router()
handled: list[tuple[Order, str]] = []


@dataclass
class Line:
    sku: str
    qty: int


@dataclass
class Order:
    id: str
    lines: list[Line]


@router.consumer(QUEUE, exchange=EXCHANGE, exchange_type="topic", routing_key="order.*", retries=1, delay=1)
async def on_order(order: Order, message: Message) -> None:
    handled.append((order, message.routing_key))
