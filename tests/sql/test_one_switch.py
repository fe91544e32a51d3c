"""`App(outbox=...)` and `@app.consumer(..., exactly_once=True)`: the outbox as one switch."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from rabbitflow import App, ConfigError, Message, Middleware, Router
from rabbitflow.middleware import Fate, Outcome
from rabbitflow.sql import Outbox, Transaction
from rabbitflow.testing import TestClient

from ..helpers import Admin, unique, wait_for

user = MetaData()
invoices = Table("invoices", user, Column("id", Integer, primary_key=True), Column("payment", String(50)))


@dataclass
class Payment:
    id: str
    amount: int


class Fates(Middleware):
    def __init__(self) -> None:
        self.seen: list[tuple[str | None, Fate]] = []

    def settled(self, message: Message, outcome: Outcome) -> None:
        self.seen.append((message.message_id, outcome.fate))


async def prepared(engine: AsyncEngine) -> Outbox:
    outbox = Outbox(engine)
    await outbox.create_tables()
    async with engine.begin() as connection:
        await connection.run_sync(user.create_all)
    return outbox


async def rows(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(invoices)) or 0)


def billing(outbox: Outbox, queue: str, fates: Fates, *, url: str = "memory://") -> tuple[App, list[str]]:
    app = App(unique("billing"), url=url, outbox=outbox, middleware=[fates])
    calls: list[str] = []

    @app.consumer(queue, retries=1, delay=0.05, queue_type="classic", exactly_once=True)
    async def on_payment(payment: Payment, tx: Transaction, message: Message) -> None:
        calls.append(payment.id)
        await tx.session.execute(insert(invoices).values(payment=payment.id))
        tx.publish({"invoice": payment.id}, routing_key=f"{queue}.invoices", mandatory=False)

    return app, calls


async def test_a_duplicate_runs_the_handler_once_and_middleware_sees_it(sqlite_engine: AsyncEngine) -> None:
    outbox = await prepared(sqlite_engine)
    fates = Fates()
    app, calls = billing(outbox, "payments", fates)
    async with TestClient(app) as client:
        await app.publish({"id": "p1", "amount": 5}, routing_key="payments", message_id="pay-1")
        await app.publish({"id": "p1", "amount": 5}, routing_key="payments", message_id="pay-1")
        await app.publish({"id": "p2", "amount": 7}, routing_key="payments", message_id="pay-2")
        await client.drain()
        await outbox.flush()
        await client.drain()
        invoices_sent = client.sent(routing_key="payments.invoices")
    assert sorted(calls) == ["p1", "p2"]  # once each, in whichever order they ran
    assert await rows(sqlite_engine) == 2
    assert sorted(s.body["invoice"] for s in invoices_sent) == ["p1", "p2"]
    assert sorted(fates.seen) == [("pay-1", Fate.DUPLICATE), ("pay-1", Fate.HANDLED), ("pay-2", Fate.HANDLED)]


def test_exactly_once_without_an_outbox_fails_at_import_time() -> None:
    app = App("billing", url="memory://")
    with pytest.raises(ConfigError, match=r"exactly_once=True needs an outbox: App\('billing'"):

        @app.consumer("payments", exactly_once=True)
        async def on_payment(payment: Payment, tx: Transaction) -> None: ...


def test_exactly_once_on_a_router_is_checked_when_it_is_included() -> None:
    router = Router()

    @router.consumer("payments", exactly_once=True)
    async def on_payment(payment: Payment, tx: Transaction) -> None: ...

    with pytest.raises(ConfigError, match="exactly_once=True needs an outbox"):
        App("billing", url="memory://").include_router(router)
    engine = create_async_engine("sqlite+aiosqlite://")
    App("billing", url="memory://", outbox=Outbox(engine)).include_router(router)  # accepted


def test_exactly_once_refuses_publish_to_and_a_handler_without_a_transaction() -> None:
    app = App("billing", url="memory://", outbox=Outbox(create_async_engine("sqlite+aiosqlite://")))
    with pytest.raises(ConfigError, match=r"stage onward messages with tx\.publish"):

        @app.consumer("payments", exactly_once=True, publish_to="invoices")
        async def on_payment(payment: Payment, tx: Transaction) -> None: ...

    with pytest.raises(ConfigError, match="add a parameter annotated `Transaction`"):

        @app.consumer("refunds", exactly_once=True)
        async def on_refund(payment: Payment) -> None: ...


async def test_on_rabbitmq_and_postgresql_a_redelivery_after_a_failure_is_handled_once(
    pg_engine: AsyncEngine, broker_url: str, admin: Admin
) -> None:
    outbox = await prepared(pg_engine)
    fates = Fates()
    queue = unique("payments")
    app, calls = billing(outbox, queue, fates, url=broker_url)
    admin.forget_app(app)
    await admin.channel.queue_declare(f"{queue}.invoices")
    admin.queues.add(f"{queue}.invoices")
    async with app:
        for n in range(20):
            await app.publish({"id": f"p{n}", "amount": n}, routing_key=queue, message_id=f"pay-{n}")
        for n in range(5):  # the producer's at-least-once: five sent twice
            await app.publish({"id": f"p{n}", "amount": n}, routing_key=queue, message_id=f"pay-{n}")
        await wait_for(lambda: len(fates.seen) == 25, timeout=30)
        await wait_for(lambda: outbox.sent >= 20, timeout=30)
    assert sorted(calls) == sorted(f"p{n}" for n in range(20))
    assert await rows(pg_engine) == 20
    assert sum(1 for _, fate in fates.seen if fate is Fate.DUPLICATE) == 5
    assert await admin.count(f"{queue}.invoices") == 20
