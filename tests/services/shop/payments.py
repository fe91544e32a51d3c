"""Payments: a plain JSON body on a queue of its own."""

from __future__ import annotations

from typing import Any

from rabbitflow import Router

from ...helpers import unique

QUEUE = unique("shop.payments")
router = Router()
handled: list[dict[str, Any]] = []


@router.consumer(QUEUE, retries=0)
async def on_payment(payment: dict[str, Any]) -> None:
    handled.append(payment)
