"""The Outbox: where a service's database transactions and its messages meet.

    outbox = Outbox(engine)                        # the service's AsyncEngine
    async with outbox.transaction() as tx:         # commits at the end of the block
        tx.session.add(Order(...))
        tx.publish({"id": 1}, exchange="orders", routing_key="order.created")

The messages are rows of the same transaction; a relay inside the running app (`start(app)`)
publishes them once committed. `outbox.inbox` gives consumers the other half: exactly-once effects.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from rabbitflow.errors import ConfigError, StateError
from rabbitflow.sql.inbox import Inbox, MessageKey, message_id_key
from rabbitflow.sql.relay import Publisher, Relay
from rabbitflow.sql.schema import create_tables, inbox_table, outbox_table
from rabbitflow.sql.transaction import Transaction

__all__ = ["Outbox"]

_PRUNE_CHUNK = 1000  # rows per pruning transaction: short locks, never a long delete


class _State(enum.Enum):
    IDLE = "idle"
    RELAYING = "relaying"


class Outbox:
    """A transactional outbox and an idempotent inbox on one SQLAlchemy asyncio engine.

    Args:
        engine: the service's `AsyncEngine` (PostgreSQL with asyncpg in production; SQLite with
            aiosqlite works for tests, with a single relay).
        sessions: makes the `AsyncSession` of each transaction (default:
            `async_sessionmaker(engine, expire_on_commit=False)`); pass your own to use your
            session class or options.
        message_key: the inbox's key for a delivery (default: its `message_id`). A delivery
            without a key is parked (`Reject`), never handled twice by chance.
        keep: how long inbox records are kept: a duplicate arriving later than this after the
            first delivery is handled again. Default 7 days.
        keep_sent: how long sent outbox rows are kept (for inspection) before pruning. Default 1 hour.
        poll: seconds between the relay's safety passes when no commit woke it.
        batch: transactions one relay pass claims at most.
        prune_every: seconds between pruning runs of a running relay.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        sessions: async_sessionmaker[AsyncSession] | None = None,
        message_key: MessageKey | None = None,
        keep: timedelta = timedelta(days=7),
        keep_sent: timedelta = timedelta(hours=1),
        poll: float = 5.0,
        batch: int = 100,
        prune_every: float = 600.0,
    ) -> None:
        if not isinstance(engine, AsyncEngine):
            raise ConfigError(
                f"Outbox(engine={engine!r}): expected a SQLAlchemy AsyncEngine "
                "(sqlalchemy.ext.asyncio.create_async_engine('postgresql+asyncpg://...'))"
            )
        for name, value in (("poll", poll), ("prune_every", prune_every), ("batch", batch)):
            if value <= 0:
                raise ConfigError(f"Outbox({name}={value!r}): must be positive")
        self.engine = engine
        self._sessions = sessions or async_sessionmaker(engine, expire_on_commit=False)
        self.keep = keep
        self.keep_sent = keep_sent
        self._poll = poll
        self._batch = batch
        self._prune_every = prune_every
        self.inbox = Inbox(self, message_key or message_id_key)
        self._relay: Relay | None = None
        self._state = _State.IDLE
        self._sent_before = 0  # by relays of this Outbox that stopped

    def __repr__(self) -> str:
        return f"Outbox({self.engine.url.render_as_string(hide_password=True)!r}, {self._state.value})"

    async def create_tables(self) -> None:
        """Create the outbox and inbox tables (and on PostgreSQL the notify trigger) where they
        do not exist; `rabbitflow.sql.schema_sql()` prints the same as SQL."""
        await create_tables(self.engine)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """A transaction for the service's own work and its messages: it commits when the block
        ends without an exception (messages staged with `tx.publish` are written with it, then
        relayed) and rolls back otherwise (nothing is published)."""
        async with self._sessions() as session:
            async with session.begin():
                tx = Transaction(session)
                yield tx
                await tx._write()
            if tx._staged and self._relay is not None:
                self._relay.wake()

    # -- the inbox ---------------------------------------------------------------------------

    def exactly_once(self, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[None]]:
        """`outbox.inbox.exactly_once`: a handler `(body, tx: Transaction)` whose database effects
        (and staged messages) happen once per message id."""
        return self.inbox.exactly_once(handler)

    # -- the relay ---------------------------------------------------------------------------

    async def start(self, app: Publisher) -> None:
        """Start relaying committed messages through `app` (a running `rabbitflow.App`)."""
        if self._state is _State.RELAYING:
            raise StateError("this Outbox already relays; stop() it before starting it again")
        relay = Relay(
            self.engine,
            app,
            batch=self._batch,
            poll=self._poll,
            prune=self.prune,
            prune_every=self._prune_every,
        )
        await relay.start()
        self._relay = relay
        self._state = _State.RELAYING

    async def stop(self) -> None:
        """Finish the relay's pass in progress and stop relaying; messages still unsent stay in
        the outbox for the next relay (another replica, or this one started again)."""
        relay, self._relay = self._relay, None
        self._state = _State.IDLE
        if relay is not None:
            await relay.stop()
            self._sent_before += relay.sent

    @contextlib.asynccontextmanager
    async def relaying(self, app: Publisher) -> AsyncIterator[Outbox]:
        """`start(app)` ... `stop()` as a block, inside `async with app:`."""
        await self.start(app)
        try:
            yield self
        finally:
            await self.stop()

    async def flush(self) -> int:
        """Relay everything committed and due now, then return how many messages were sent
        (tests: after `client.drain()`). Needs a running relay."""
        if self._relay is None:
            raise StateError("flush() needs a running relay: call outbox.start(app) first")
        return await self._relay.flush()

    @property
    def sent(self) -> int:
        """Messages this Outbox's relay published and marked sent (all its runs)."""
        return self._sent_before + (self._relay.sent if self._relay is not None else 0)

    async def pending(self) -> int:
        """Committed messages not sent yet."""
        t = outbox_table
        async with self.engine.connect() as connection:
            count = await connection.scalar(select(func.count()).where(t.c.sent_at.is_(None)))
        return int(count or 0)

    # -- pruning -----------------------------------------------------------------------------

    async def prune(self) -> tuple[int, int]:
        """Delete inbox records older than `keep` and sent outbox rows older than `keep_sent`, a
        chunk per short transaction (consumers never wait long); returns (records, rows)."""
        now = datetime.now(UTC)
        i, o = inbox_table, outbox_table
        old_records = select(i.c.consumer, i.c.message_id).where(i.c.handled_at < now - self.keep)
        old_rows = select(o.c.id).where(o.c.sent_at < now - self.keep_sent)
        records = await self._prune_chunks(
            old_records, lambda chunk: delete(i).where(tuple_(i.c.consumer, i.c.message_id).in_(chunk))
        )
        rows = await self._prune_chunks(old_rows, lambda chunk: delete(o).where(o.c.id.in_(chunk)))
        return records, rows

    async def _prune_chunks(self, old: Any, delete_chunk: Callable[[Any], Any]) -> int:
        chunk = old.limit(_PRUNE_CHUNK)
        if self.engine.dialect.name == "postgresql":
            chunk = chunk.with_for_update(skip_locked=True)  # replicas prune side by side
        total = 0
        while True:
            async with self.engine.begin() as connection:
                result = await connection.execute(delete_chunk(chunk))
            total += result.rowcount
            if result.rowcount < _PRUNE_CHUNK:
                return total
