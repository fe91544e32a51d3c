"""Shipping: a text body on a classic queue with its own prefetch."""

from __future__ import annotations

from rabbitflow import Router

from ...helpers import unique

QUEUE = unique("shop.shipping")
router = Router()
handled: list[str] = []


@router.consumer(QUEUE, queue_type="classic", prefetch=4, retries=2, delay=[1, 2])
async def on_shipment(label: str) -> None:
    handled.append(label)
