"""The outbox and inbox on SQLite with the in-memory broker: what a service's own tests use."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from rabbitflow import App, Message
from rabbitflow.errors import StateError, UnencodableMessage
from rabbitflow.sql import Outbox, Transaction, Verdict, schema
from rabbitflow.testing import TestClient

user = MetaData()
invoices = Table("invoices", user, Column("id", Integer, primary_key=True), Column("payment", String(50)))


@dataclass
class Payment:
    id: str
    amount: int


async def tables(engine: AsyncEngine, outbox: Outbox) -> None:
    await outbox.create_tables()
    async with engine.begin() as connection:
        await connection.run_sync(user.create_all)


async def count(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(invoices)) or 0)


async def test_a_committed_transaction_publishes_its_messages_in_order(sqlite_engine: AsyncEngine) -> None:
    outbox = Outbox(sqlite_engine)
    await tables(sqlite_engine, outbox)
    app = App("shop", url="memory://")
    async with TestClient(app) as client, outbox.relaying(app):
        async with outbox.transaction() as tx:
            await tx.session.execute(insert(invoices).values(payment="p1"))
            first = tx.publish({"n": 1}, routing_key="events", mandatory=False)
            tx.publish("two", routing_key="events", headers={"k": [1, "x"]}, mandatory=False)
            tx.publish(b"\x00three", routing_key="events", message_id="m3", mandatory=False)
        await outbox.flush()
        await client.drain()
        sent = client.sent(routing_key="events")
    assert [s.body for s in sent] == [{"n": 1}, "two", b"\x00three"]
    assert sent[0].message_id == first
    assert sent[1].headers == {"k": [1, "x"]}
    assert sent[2].message_id == "m3"
    assert await count(sqlite_engine) == 1
    assert await outbox.pending() == 0


async def test_a_batch_that_cannot_be_sent_stays_with_its_error_and_is_tried_later(
    sqlite_engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    outbox = Outbox(sqlite_engine)
    await tables(sqlite_engine, outbox)
    app = App("shop", url="memory://")
    async with TestClient(app), outbox.relaying(app):
        async with outbox.transaction() as tx:
            tx.publish({"n": 1}, routing_key="nobody-listens")
        assert await outbox.flush() == 0
        assert await outbox.flush() == 0  # not due again yet: no hot loop on a poison batch
    assert await outbox.pending() == 1
    async with sqlite_engine.connect() as connection:
        row = (await connection.execute(select(schema.outbox_table))).one()
    assert row.attempts == 1
    assert "Unroutable" in row.error
    assert row.available_at > row.created_at
    assert "failed to send (attempt 1): Unroutable" in caplog.text


async def test_a_rolled_back_transaction_publishes_nothing(sqlite_engine: AsyncEngine) -> None:
    outbox = Outbox(sqlite_engine)
    await tables(sqlite_engine, outbox)
    app = App("shop", url="memory://")
    async with TestClient(app) as client, outbox.relaying(app):

        async def declined() -> None:
            async with outbox.transaction() as tx:
                await tx.session.execute(insert(invoices).values(payment="p1"))
                tx.publish({"n": 1}, routing_key="events")
                raise RuntimeError("card declined")

        with pytest.raises(RuntimeError, match="card declined"):
            await declined()
        assert await outbox.flush() == 0
        await client.drain()
        assert client.sent(routing_key="events") == []
    assert await count(sqlite_engine) == 0


async def test_a_body_or_header_the_outbox_cannot_store_fails_the_transaction(
    sqlite_engine: AsyncEngine,
) -> None:
    outbox = Outbox(sqlite_engine)
    await tables(sqlite_engine, outbox)

    async def stage(body: object, headers: dict[str, object] | None) -> None:
        async with outbox.transaction() as tx:
            await tx.session.execute(insert(invoices).values(payment="p1"))
            tx.publish(body, routing_key="events", headers=headers)

    with pytest.raises(UnencodableMessage, match="JSON values"):
        await stage({"n": 1}, {"raw": b"bytes"})
    with pytest.raises(UnencodableMessage, match="cannot encode"):
        await stage(object(), None)
    assert await count(sqlite_engine) == 0
    assert await outbox.pending() == 0


async def test_exactly_once_handler_runs_once_per_message_id(sqlite_engine: AsyncEngine) -> None:
    outbox = Outbox(sqlite_engine)
    await tables(sqlite_engine, outbox)
    app = App("billing", url="memory://")
    calls: list[str] = []

    @app.consumer("payments", retries=2, delay=10)
    @outbox.exactly_once
    async def on_payment(body: Payment, tx: Transaction, message: Message) -> None:
        calls.append(body.id)
        await tx.session.execute(insert(invoices).values(payment=body.id))
        tx.publish({"invoice_for": body.id}, routing_key="invoices", mandatory=False)

    async with TestClient(app) as client, outbox.relaying(app):
        await client.publish({"id": "p1", "amount": 5}, routing_key="payments", message_id="pay-1")
        await client.publish({"id": "p1", "amount": 5}, routing_key="payments", message_id="pay-1")
        await client.publish({"id": "p2", "amount": 7}, routing_key="payments", message_id="pay-2")
        await client.drain()
        await outbox.flush()
        await client.drain()
        invoices_sent = [s.body for s in client.sent(routing_key="invoices")]
    assert sorted(calls) == ["p1", "p2"]  # the handlers of two messages run side by side
    assert await count(sqlite_engine) == 2
    assert sorted(invoices_sent, key=str) == [{"invoice_for": "p1"}, {"invoice_for": "p2"}]
    assert outbox.inbox.duplicates["payments"] == 1


async def test_a_failed_attempt_rolls_back_and_is_retried(sqlite_engine: AsyncEngine) -> None:
    outbox = Outbox(sqlite_engine)
    await tables(sqlite_engine, outbox)
    app = App("billing", url="memory://")
    attempts: list[int] = []

    @app.consumer("payments", retries=2, delay=10)
    @outbox.exactly_once
    async def on_payment(body: dict[str, str], tx: Transaction, message: Message) -> None:
        attempts.append(message.attempt)
        await tx.session.execute(insert(invoices).values(payment=body["id"]))
        tx.publish({"invoice_for": body["id"]}, routing_key="invoices", mandatory=False)
        if message.attempt < 3:
            raise ConnectionError("ledger service down")

    async with TestClient(app) as client, outbox.relaying(app):
        await client.publish({"id": "p1"}, routing_key="payments", message_id="pay-1")
        await client.drain()
        await outbox.flush()
        await client.drain()
        assert [s.body for s in client.sent(routing_key="invoices")] == [{"invoice_for": "p1"}]
        assert client.parked("payments") == []
    assert attempts == [1, 2, 3]
    assert await count(sqlite_engine) == 1  # the two failed attempts left nothing behind


async def test_a_message_without_id_is_parked_not_handled(sqlite_engine: AsyncEngine) -> None:
    outbox = Outbox(sqlite_engine)
    await tables(sqlite_engine, outbox)
    app = App("billing", url="memory://")

    @app.consumer("payments", retries=2, delay=10)
    @outbox.exactly_once
    async def on_payment(body: dict[str, str], tx: Transaction) -> None:
        await tx.session.execute(insert(invoices).values(payment=body["id"]))

    async with TestClient(app) as client:
        # An outside producer that sets no message_id (the test client always sets one).
        assert client._channel is not None
        from rabbitflow.codec import outgoing

        raw, properties = outgoing({"id": "p1"}, message_id="")
        properties.message_id = None
        await client._channel.publish(raw, exchange="", routing_key="payments", properties=properties)
        await client.drain()
        parked = client.parked("payments")
    assert len(parked) == 1
    assert parked[0].reason == "rejected"
    assert "no message_id" in (parked[0].error or "")
    assert await count(sqlite_engine) == 0


async def test_a_key_function_gives_messages_without_id_a_key(sqlite_engine: AsyncEngine) -> None:
    outbox = Outbox(sqlite_engine, message_key=lambda m: m.message_id or m.headers.get("order"))
    await tables(sqlite_engine, outbox)
    app = App("billing", url="memory://")

    @app.consumer("payments")
    @outbox.exactly_once
    async def on_payment(body: dict[str, str], tx: Transaction) -> None:
        await tx.session.execute(insert(invoices).values(payment=body["id"]))

    async with TestClient(app) as client:
        assert client._channel is not None
        from rabbitflow.codec import outgoing

        for _ in range(2):
            raw, properties = outgoing({"id": "p1"}, message_id="", headers={"order": "o-1"})
            properties.message_id = None
            await client._channel.publish(raw, exchange="", routing_key="payments", properties=properties)
        await client.drain()
    assert await count(sqlite_engine) == 1
    assert outbox.inbox.duplicates["payments"] == 1


async def test_attempt_is_the_seam_a_plain_handler_can_call(sqlite_engine: AsyncEngine) -> None:
    outbox = Outbox(sqlite_engine)
    await tables(sqlite_engine, outbox)
    app = App("billing", url="memory://")
    verdicts: list[Verdict] = []

    @app.consumer("payments")
    async def on_payment(body: dict[str, str], message: Message) -> None:
        async def work(tx: Transaction) -> None:
            await tx.session.execute(insert(invoices).values(payment=body["id"]))

        verdicts.append(await outbox.inbox.attempt("payments", message, work))

    async with TestClient(app) as client:
        for _ in range(3):
            await client.publish({"id": "p1"}, routing_key="payments", message_id="same")
        await client.drain()
    assert verdicts == [Verdict.HANDLED, Verdict.DUPLICATE, Verdict.DUPLICATE]
    assert await count(sqlite_engine) == 1


async def test_exactly_once_needs_a_transaction_parameter(sqlite_engine: AsyncEngine) -> None:
    from rabbitflow import ConfigError

    outbox = Outbox(sqlite_engine)

    async def no_tx(body: dict[str, str]) -> None: ...

    with pytest.raises(ConfigError, match="annotated `Transaction`"):
        outbox.exactly_once(no_tx)


async def test_the_relay_starts_once_and_flush_needs_it(sqlite_engine: AsyncEngine) -> None:
    outbox = Outbox(sqlite_engine)
    await tables(sqlite_engine, outbox)
    with pytest.raises(StateError, match="running relay"):
        await outbox.flush()
    app = App("shop", url="memory://")
    async with TestClient(app), outbox.relaying(app):
        with pytest.raises(StateError, match="already relays"):
            await outbox.start(app)
