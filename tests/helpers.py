"""Helpers for tests that look at the broker behind rabbitflow's back."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from typing import Any

import aiormq

from rabbitflow import App
from rabbitflow.urls import parse_urls

BROKER_URL = os.environ.get("RABBITFLOW_TEST_URL", "amqp://guest:guest@127.0.0.1:5672/")
_BROKER = parse_urls(BROKER_URL)[0]
BROKER_HOST, BROKER_PORT = _BROKER.host, _BROKER.port
BROKER_NODE = str(_BROKER)  # as `app.health()["node"]` shows it: the password masked


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `predicate()` holds (tests only; the library itself never polls)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - tests wait on state they do not own
            await asyncio.sleep(0.01)


class Admin:
    """A raw aiormq channel for looking at the broker behind rabbitflow's back."""

    def __init__(self, channel: aiormq.abc.AbstractChannel) -> None:
        self.channel = channel
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()

    async def get(self, queue: str) -> aiormq.abc.DeliveredMessage | None:
        message = await self.channel.basic_get(queue, no_ack=True)
        return None if message.delivery.__class__.__name__ == "GetEmpty" else message

    async def drain(self, queue: str) -> list[aiormq.abc.DeliveredMessage]:
        out = []
        while (message := await self.get(queue)) is not None:
            out.append(message)
        return out

    async def count(self, queue: str) -> int:
        ok = await self.channel.queue_declare(queue, passive=True)
        return int(ok.message_count or 0)

    async def publish(self, body: bytes, *, exchange: str = "", routing_key: str, **props: Any) -> None:
        await self.channel.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=aiormq.spec.Basic.Properties(**props),
        )

    def forget_app(self, app: App) -> None:
        self.queues.update(q.name for q in app.plan.queues)
        self.exchanges.update(e.name for e in app.plan.exchanges if e.name)
