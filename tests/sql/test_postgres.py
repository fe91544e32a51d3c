"""The outbox and inbox on PostgreSQL and the real RabbitMQ: NOTIFY wake-up, replicas relaying
one table, and concurrent duplicates serialised by the inbox record."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from rabbitflow import App, Message
from rabbitflow.sql import Outbox, Transaction, Verdict, schema, schema_sql

from ..helpers import unique, wait_for

user = MetaData()
effects = Table("effects", user, Column("id", Integer, primary_key=True), Column("key", String(64)))


async def prepare(engine: AsyncEngine, **options: object) -> Outbox:
    outbox = Outbox(engine, **options)  # type: ignore[arg-type]
    await outbox.create_tables()
    async with engine.begin() as connection:
        await connection.run_sync(user.create_all)
    return outbox


async def test_a_commit_wakes_the_relay_through_notify(
    pg_engine: AsyncEngine, make_app: Callable[..., App]
) -> None:
    outbox = await prepare(pg_engine, poll=60.0)  # the poll never fires within the test
    app = make_app()
    queue = unique("q")
    arrived: list[float] = []

    @app.consumer(queue, queue_type="classic")
    async def record(body: dict[str, int]) -> None:
        arrived.append(time.perf_counter())

    async with app, outbox.relaying(app):
        await asyncio.sleep(0.2)  # the relay's first pass found nothing and waits
        # Another replica's commit: a second engine, no local wake-up; only NOTIFY can tell.
        other = create_async_engine(pg_engine.url)
        try:
            async with Outbox(other).transaction() as tx:
                tx.publish({"n": 1}, routing_key=queue)
            committed = time.perf_counter()
        finally:
            await other.dispose()
        await wait_for(lambda: bool(arrived), timeout=5)
    assert arrived[0] - committed < 1.0


async def test_replicas_send_each_message_once_and_each_transaction_in_order(
    pg_database: str, make_app: Callable[..., App]
) -> None:
    queue = unique("q")
    consumer_app = make_app()
    seen: dict[int, list[int]] = defaultdict(list)

    @consumer_app.consumer(queue, queue_type="classic", prefetch=500)
    async def record(body: dict[str, int]) -> None:
        seen[body["tx"]].append(body["seq"])

    engines = [create_async_engine(pg_database) for _ in range(3)]
    outboxes = [Outbox(e, batch=20) for e in engines]
    await prepare(engines[0])
    relays = [make_app() for _ in engines]
    transactions, per_tx = 300, 3
    try:
        async with consumer_app:
            for app in relays:
                await app.start()
            for outbox, app in zip(outboxes, relays, strict=True):
                await outbox.start(app)

            async def write(n: int) -> None:
                async with outboxes[n % 3].transaction() as tx:
                    for seq in range(per_tx):
                        tx.publish({"tx": n, "seq": seq}, routing_key=queue)

            await asyncio.gather(*(write(n) for n in range(transactions)))
            await wait_for(lambda: sum(map(len, seen.values())) >= transactions * per_tx, timeout=30)
            await asyncio.sleep(0.3)  # a duplicate would arrive now
            for outbox in outboxes:
                await outbox.stop()
            for app in relays:
                await app.stop()
            sent_by = [outbox.sent for outbox in outboxes]
    finally:
        for engine in engines:
            await engine.dispose()
    assert len(seen) == transactions
    assert all(seqs == list(range(per_tx)) for seqs in seen.values())  # once each, in order
    assert sum(sent_by) == transactions * per_tx
    assert sum(1 for n in sent_by if n) >= 2  # the replicas shared the work


async def test_concurrent_duplicates_run_the_handler_once(pg_engine: AsyncEngine) -> None:
    outbox = await prepare(pg_engine)
    message = Message(b"{}", {}, 1, "dup-1", "payments", "", False, "application/json", queue="payments")
    started = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    async def slow(tx: Transaction) -> None:
        nonlocal calls
        calls += 1
        await tx.session.execute(insert(effects).values(key="dup-1"))
        started.set()
        await release.wait()

    first = asyncio.create_task(outbox.inbox.attempt("payments", message, slow))
    await started.wait()
    second = asyncio.create_task(outbox.inbox.attempt("payments", message, slow))
    await asyncio.sleep(0.3)
    assert not second.done()  # it waits on the first one's record
    release.set()
    assert await first == Verdict.HANDLED
    assert await second == Verdict.DUPLICATE
    assert calls == 1
    async with pg_engine.connect() as connection:
        assert await connection.scalar(select(func.count()).select_from(effects)) == 1


async def test_a_duplicate_of_a_failed_attempt_runs_the_handler(pg_engine: AsyncEngine) -> None:
    outbox = await prepare(pg_engine)
    message = Message(b"{}", {}, 1, "m-1", "payments", "", False, "application/json", queue="payments")
    started = asyncio.Event()

    async def failing(tx: Transaction) -> None:
        await tx.session.execute(insert(effects).values(key="fail"))
        started.set()
        await asyncio.sleep(0.2)
        raise ConnectionError("downstream down")

    async def working(tx: Transaction) -> None:
        await tx.session.execute(insert(effects).values(key="ok"))

    first = asyncio.create_task(outbox.inbox.attempt("payments", message, failing))
    await started.wait()
    second = await outbox.inbox.attempt("payments", message, working)
    assert second == Verdict.HANDLED
    try:
        await first
    except ConnectionError:
        pass
    else:
        raise AssertionError("the failed attempt's exception must reach the consumer")
    async with pg_engine.connect() as connection:
        keys = list((await connection.execute(select(effects.c.key))).scalars())
    assert keys == ["ok"]


async def test_prune_deletes_old_records_and_sent_rows_only(pg_engine: AsyncEngine) -> None:
    outbox = await prepare(pg_engine, keep=timedelta(days=7), keep_sent=timedelta(hours=1))
    now = datetime.now(UTC)
    old, fresh = now - timedelta(days=8), now - timedelta(days=6)
    async with pg_engine.begin() as connection:
        await connection.execute(
            insert(schema.inbox_table),
            [{"consumer": "q", "message_id": f"old-{n}", "handled_at": old} for n in range(2500)]
            + [{"consumer": "q", "message_id": f"new-{n}", "handled_at": fresh} for n in range(10)],
        )
        row = {
            "seq": 0,
            "created_at": old,
            "available_at": old,
            "exchange": "",
            "routing_key": "q",
            "message_id": "m",
            "body": b"",
            "persistent": True,
            "mandatory": True,
        }
        await connection.execute(
            insert(schema.outbox_table),
            [
                {**row, "batch": "sent-long-ago", "sent_at": now - timedelta(hours=2)},
                {**row, "batch": "sent-just-now", "sent_at": now},
                {**row, "batch": "unsent", "sent_at": None},
            ],
        )
    assert await outbox.prune() == (2500, 1)
    async with pg_engine.connect() as connection:
        left = set((await connection.execute(select(schema.inbox_table.c.message_id))).scalars())
        batches = set((await connection.execute(select(schema.outbox_table.c.batch))).scalars())
    assert left == {f"new-{n}" for n in range(10)}
    assert batches == {"sent-just-now", "unsent"}


async def test_schema_sql_creates_what_create_tables_does(pg_url: str, pg_engine: AsyncEngine) -> None:
    outbox = Outbox(pg_engine)
    await outbox.create_tables()
    await outbox.create_tables()  # idempotent
    connection = await asyncpg.connect(pg_url)
    name = unique("rf").replace("-", "_")
    try:
        await connection.execute(f"CREATE DATABASE {name}")
        other = await asyncpg.connect(pg_url.rsplit("/", 1)[0] + f"/{name}")
        try:
            await other.execute(schema_sql("postgresql"))
            triggers = await other.fetch("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")
            columns = await other.fetch(
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_name LIKE 'rabbitflow_%' ORDER BY 1, 2"
            )
        finally:
            await other.close()
        async with pg_engine.connect() as mine:
            raw = await mine.get_raw_connection()
            expected = await raw.driver_connection.fetch(  # type: ignore[union-attr]
                "SELECT table_name, column_name, data_type FROM information_schema.columns "
                "WHERE table_name LIKE 'rabbitflow_%' ORDER BY 1, 2"
            )
    finally:
        await connection.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await connection.close()
    assert [t["tgname"] for t in triggers] == ["rabbitflow_outbox_notify"]
    assert [tuple(c) for c in columns] == [tuple(c) for c in expected]
