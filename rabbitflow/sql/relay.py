"""The relay: publishes committed outbox messages through the running app and marks them sent.

One pass claims up to `batch` unsent transactions (their head rows, oldest first), publishes each
transaction's messages in order, waiting for every confirm, and marks the transactions it sent.
On PostgreSQL the claim is `SELECT ... FOR UPDATE SKIP LOCKED` in a transaction held open until
the batch is marked: replicas never send the same batch at once, and a relay that dies mid-batch
rolls back, so another sends it again (at least once: the broker may see a message twice, with the
same message id). On other databases (SQLite, for tests) the claim takes no lock: run one relay.

The relay runs a pass when woken (a local commit; on PostgreSQL with asyncpg, a NOTIFY that the
outbox's trigger sends on any replica's commit), and every `poll` seconds in case a notification
was missed. It prunes sent outbox rows and old inbox records every `prune_every` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Row, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from rabbitflow.sql.schema import NOTIFY_CHANNEL, outbox_table

__all__ = ["Publisher", "Relay"]

log = logging.getLogger("rabbitflow.sql")

_MAX_BACKOFF = 60.0  # seconds between sends of a batch that keeps failing


class Publisher(Protocol):
    """What the relay publishes through: `rabbitflow.App` has it."""

    def publish(
        self,
        body: Any,
        *,
        exchange: str = ...,
        routing_key: str,
        headers: dict[str, Any] | None = ...,
        message_id: str | None = ...,
        content_type: str | None = ...,
        persistent: bool = ...,
        mandatory: bool = ...,
    ) -> Awaitable[None]: ...


class Relay:
    """The outbox's sender inside one running app (see the module's docstring)."""

    def __init__(
        self,
        engine: AsyncEngine,
        app: Publisher,
        *,
        batch: int,
        poll: float,
        prune: Callable[[], Awaitable[Any]],
        prune_every: float,
    ) -> None:
        self._engine = engine
        self._app = app
        self._batch = batch
        self._poll = poll
        self._prune = prune
        self._prune_every = prune_every
        self._locking = engine.dialect.name == "postgresql"
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one pass at a time in this process (the loop, or a flush)
        self._task: asyncio.Task[None] | None = None
        self._listener: AsyncConnection | None = None
        self._stopping = False
        self.sent = 0  # messages this relay published and marked sent

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._listen()
        self._wake.set()  # a first pass for what committed while no relay ran
        self._task = asyncio.create_task(self._run(), name="rabbitflow-outbox-relay")

    async def stop(self) -> None:
        """Finish the pass in progress (its batch is marked sent), then stop."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await asyncio.shield(self._task)
            self._task = None
        await self._unlisten()

    def wake(self) -> None:
        self._wake.set()

    async def flush(self) -> int:
        """Run passes until nothing is left to send now; returns how many messages were sent."""
        total = 0
        while sent := await self._pass():
            total += sent
        return total

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + self._prune_every
        failures = 0
        while not self._stopping:
            self._wake.clear()
            try:
                sent = await self._pass()
                failures = 0
            except Exception:
                failures += 1
                delay = min(_MAX_BACKOFF, 0.5 * 2**failures)
                log.exception("outbox relay: a pass failed; trying again in %.1fs", delay)
                await self._sleep(delay)
                continue
            if sent == 0 or self._stopping:
                # Nothing more now: wait for a commit (local or NOTIFY) or the safety poll.
                await self._sleep(self._poll)
            if loop.time() >= next_prune and not self._stopping:
                next_prune = loop.time() + self._prune_every
                try:
                    await self._prune()
                except Exception:
                    log.exception("outbox relay: pruning failed; trying again in %.0fs", self._prune_every)
            if self._listener is not None and self._listener.closed:
                await self._listen()  # the database went away and came back: listen again

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _pass(self) -> int:
        """Claim, publish and mark one batch of transactions; returns the messages sent."""
        async with self._lock:
            if self._locking:
                async with self._engine.begin() as connection:
                    batches = await self._claim(connection)
                    if not batches:
                        return 0
                    results = await self._send(batches)
                    return await self._mark(connection, batches, results)
            async with self._engine.begin() as connection:
                batches = await self._claim(connection)
            if not batches:
                return 0
            results = await self._send(batches)
            async with self._engine.begin() as connection:
                return await self._mark(connection, batches, results)

    async def _claim(self, connection: AsyncConnection) -> dict[str, list[Row[Any]]]:
        """The oldest unsent transactions' messages by batch, in order; on PostgreSQL their head
        rows stay locked until the connection's transaction ends."""
        t = outbox_table
        heads = select(t.c.batch).where(
            t.c.sent_at.is_(None), t.c.seq == 0, t.c.available_at <= datetime.now(UTC)
        )
        heads = heads.order_by(t.c.id).limit(self._batch)
        if self._locking:
            heads = heads.with_for_update(skip_locked=True)
        claimed = list((await connection.execute(heads)).scalars())
        if not claimed:
            return {}
        rows = await connection.execute(
            select(t).where(t.c.batch.in_(claimed), t.c.sent_at.is_(None)).order_by(t.c.id)
        )
        batches: dict[str, list[Row[Any]]] = {batch: [] for batch in claimed}
        for row in rows:
            batches[row.batch].append(row)
        return batches

    async def _send(self, batches: dict[str, list[Row[Any]]]) -> list[BaseException | None]:
        """Publish every batch, each in order and the batches side by side."""
        return await asyncio.gather(
            *(self._send_batch(rows) for rows in batches.values()), return_exceptions=True
        )

    async def _send_batch(self, rows: list[Row[Any]]) -> None:
        for row in rows:
            # One confirm before the next message of the same transaction: its order is kept.
            await self._app.publish(
                row.body,
                exchange=row.exchange,
                routing_key=row.routing_key,
                headers=row.headers,
                message_id=row.message_id,
                content_type=row.content_type,
                persistent=row.persistent,
                mandatory=row.mandatory,
            )

    async def _mark(
        self,
        connection: AsyncConnection,
        batches: dict[str, list[Row[Any]]],
        results: list[BaseException | None],
    ) -> int:
        t = outbox_table
        now = datetime.now(UTC)
        sent = [batch for batch, result in zip(batches, results, strict=True) if result is None]
        if sent:
            await connection.execute(update(t).where(t.c.batch.in_(sent)).values(sent_at=now))
        for (batch, rows), result in zip(batches.items(), results, strict=True):
            if result is None:
                continue
            if not isinstance(result, Exception):
                raise result  # a cancellation or an interpreter exit: the claim rolls back
            head = rows[0]
            attempts = head.attempts + 1 if head.seq == 0 else 1
            delay = min(_MAX_BACKOFF, 2.0 ** min(attempts, 16))
            log.warning(
                "outbox: batch %s (%d message(s), first to %r/%r, message id %s) failed to send "
                "(attempt %d): %s: %s; trying again in %.0fs",
                batch,
                len(rows),
                head.exchange,
                head.routing_key,
                head.message_id,
                attempts,
                type(result).__name__,
                result,
                delay,
            )
            await connection.execute(
                update(t)
                .where(t.c.batch == batch, t.c.seq == 0)
                .values(
                    attempts=t.c.attempts + 1,
                    error=f"{type(result).__name__}: {result}"[:2000],
                    available_at=now + timedelta(seconds=delay),
                )
            )
        count = sum(len(batches[batch]) for batch in sent)
        self.sent += count
        return count

    # -- LISTEN/NOTIFY -----------------------------------------------------------------------

    async def _listen(self) -> None:
        """On PostgreSQL with asyncpg, hold one connection that LISTENs for the outbox trigger's
        notifications; elsewhere the relay runs on local commits and the poll alone."""
        if not self._locking or self._engine.dialect.driver != "asyncpg":
            return
        await self._unlisten()
        try:
            connection = await self._engine.connect()
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection  # asyncpg.Connection
            await driver.add_listener(NOTIFY_CHANNEL, self._notified)
        except Exception as exc:
            log.warning("outbox relay: cannot LISTEN (%s); relaying every %.1fs meanwhile", exc, self._poll)
            return
        self._listener = connection

    async def _unlisten(self) -> None:
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:
            await listener.invalidate()  # the LISTEN must not go back into the pool with it
        except Exception:
            log.debug("outbox relay: closing the LISTEN connection failed", exc_info=True)

    def _notified(self, *_: object) -> None:
        self._wake.set()
