"""`exactly_once=True` on a partitioned consumer: the inbox's transaction is per attempt, so an
attempt retried in place runs in a new one, and a duplicate is acked without a call."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from rabbitflow import App, Message, Middleware, partition
from rabbitflow.middleware import Fate, Outcome
from rabbitflow.sql import Outbox, Transaction
from rabbitflow.testing import TestClient

from ..helpers import wait_for

meta = MetaData()
entries = Table("entries", meta, Column("id", Integer, primary_key=True), Column("key", String(20)))


class Fates(Middleware):
    def __init__(self) -> None:
        self.seen: list[tuple[str | None, int, str, Fate]] = []

    def settled(self, message: Message, outcome: Outcome) -> None:
        self.seen.append((message.message_id, message.attempt, message.queue, outcome.fate))


async def test_a_partitioned_consumer_handles_each_message_once(sqlite_engine: AsyncEngine) -> None:
    outbox = Outbox(sqlite_engine)
    await outbox.create_tables()
    async with sqlite_engine.begin() as connection:
        await connection.run_sync(meta.create_all)
    fates = Fates()
    app = App("ledger", url="memory://", outbox=outbox, middleware=[fates])
    calls: list[tuple[str, int]] = []

    @app.consumer("ledger.entries", partitions=2, retries=1, delay=0.01, exactly_once=True)
    async def enter(entry: dict[str, Any], tx: Transaction, message: Message) -> None:
        calls.append((entry["key"], message.attempt))
        await tx.session.execute(insert(entries).values(key=entry["key"]))
        if message.attempt == 1:
            raise RuntimeError("rolled back, then retried in place")

    async with TestClient(app):
        for _ in range(2):  # the second is a duplicate: the same message id
            await app.publish(
                {"key": "a"}, exchange="ledger.entries", routing_key=partition("a", 2), message_id="e-a"
            )
        await wait_for(lambda: len(fates.seen) == 3, timeout=10)
    async with sqlite_engine.connect() as connection:
        rows = await connection.scalar(select(func.count()).select_from(entries))
    assert calls == [("a", 1), ("a", 2)]
    assert rows == 1  # the first attempt's row was rolled back with its inbox record
    assert fates.seen == [
        ("e-a", 1, "ledger.entries", Fate.RETRIED),
        ("e-a", 2, "ledger.entries", Fate.HANDLED),
        ("e-a", 1, "ledger.entries", Fate.DUPLICATE),
    ]
