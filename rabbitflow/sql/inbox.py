"""The inbox: an `exactly_once` consumer's handler runs in a transaction that also records
(consumer, message id); a delivery whose record exists is a duplicate and is not handled again.

The record is inserted first, before the handler runs. On PostgreSQL a second delivery of the same
message inserting the same key meanwhile waits for the first transaction: if it commits, the second
is a duplicate; if it rolls back (the handler failed), the second runs the handler. A failed
attempt rolls everything back, the record included, and is retried or parked as usual.
"""

from __future__ import annotations

import collections
import enum
import functools
import inspect
import logging
import typing
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from ..errors import ConfigError, Reject
from ..message import Message
from .schema import inbox_table
from .transaction import Transaction

if TYPE_CHECKING:
    from .outbox import Outbox

__all__ = ["Inbox", "MessageKey", "Verdict"]

log = logging.getLogger("rabbitflow.sql")

MessageKey = Callable[[Message], "str | None"]


class Verdict(enum.StrEnum):
    """What `Inbox.attempt` did with a delivery; either way it may be acked now."""

    HANDLED = "handled"  # the handler ran and its transaction (with the record) committed
    DUPLICATE = "duplicate"  # already handled by an earlier delivery: the handler was not called


class _AlreadyHandled(Exception):
    """Internal: roll back the attempt's transaction, the record exists."""


def message_id_key(message: Message) -> str | None:
    return message.message_id


class Inbox:
    """The idempotent receiver of one `Outbox`'s database (`outbox.inbox`)."""

    def __init__(self, outbox: Outbox, key: MessageKey = message_id_key) -> None:
        self._outbox = outbox
        self._key = key
        self._dialect = outbox.engine.dialect.name
        self.duplicates: collections.Counter[str] = collections.Counter()  # by consumer

    async def attempt(
        self,
        consumer: str,
        message: Message,
        call: Callable[[Transaction], Awaitable[Any]],
    ) -> Verdict:
        """Run `call(tx)` once for `message` on `consumer` (its queue), in a transaction that
        records it; ack the delivery after this returns, whatever the verdict.

        Raises what `call` raised, after rolling back (retry or park it as usual), and `Reject`
        for a message the key function gives no key for (no `message_id`): without a key a
        redelivery cannot be told from a new message, so it is parked rather than risk a second run.
        """
        key = self._key(message)
        if not key:
            raise Reject(
                f"exactly_once consumer {consumer!r}: the message has no message_id, so a "
                "redelivery could not be told from a new message; publish it with a message_id "
                "(app.publish always sets one) or give Outbox(message_key=...)"
            )
        try:
            async with self._outbox.transaction() as tx:
                if not await _record(tx.session, self._dialect, consumer, key):
                    raise _AlreadyHandled
                await call(tx)
        except _AlreadyHandled:
            self.duplicates[consumer] += 1
            log.info(
                "queue %s: message %s was handled before; acking it without calling the handler",
                consumer,
                key,
            )
            return Verdict.DUPLICATE
        return Verdict.HANDLED

    def exactly_once(self, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[None]]:
        """Decorate a handler `async def h(body: T, tx: Transaction[, message: Message])` into a
        rabbitflow handler `(body: T, message: Message)` that runs it through `attempt`, keyed by
        the consumer's queue. Put it under `@app.consumer(...)`. Its return value is not published:
        stage onward messages with `tx.publish`."""
        name = getattr(handler, "__qualname__", repr(handler))
        if not inspect.iscoroutinefunction(handler):
            raise ConfigError(f"exactly_once {name}: the handler must be an `async def` function")
        hints = typing.get_type_hints(handler)
        params = list(inspect.signature(handler).parameters.values())
        if not params:
            raise ConfigError(f"exactly_once {name}: the first parameter receives the message body")
        body = params[0]
        tx_param = next((p.name for p in params[1:] if hints.get(p.name) is Transaction), None)
        message_param = next((p.name for p in params[1:] if hints.get(p.name) is Message), None)
        if tx_param is None:
            raise ConfigError(
                f"exactly_once {name}: add a parameter annotated `Transaction` "
                "(from rabbitflow.sql import Transaction): the handler's database work goes through it"
            )
        attempt = self.attempt

        @functools.wraps(handler)
        async def consume(body: Any, message: Message) -> None:
            async def call(tx: Transaction) -> None:
                extra: dict[str, Any] = {tx_param: tx}
                if message_param is not None:
                    extra[message_param] = message
                await handler(body, **extra)

            await attempt(message.queue, message, call)

        # What rabbitflow's signature check reads: the body's annotation and a Message parameter.
        body_hint = hints.get(body.name, inspect.Parameter.empty)
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        consume.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [
                inspect.Parameter(body.name, kind, annotation=body_hint),
                inspect.Parameter("message", kind, annotation=Message),
            ],
            return_annotation=None,
        )
        consume.__annotations__ = {"message": Message, "return": None}
        if body_hint is not inspect.Parameter.empty:
            consume.__annotations__[body.name] = body_hint
        del consume.__wrapped__  # the signature above is the one to read
        return consume


async def _record(session: AsyncSession, dialect: str, consumer: str, key: str) -> bool:
    """Insert the (consumer, key) record; False when it exists (a duplicate)."""
    t = inbox_table
    values = {"consumer": consumer, "message_id": key, "handled_at": datetime.now(UTC)}
    statement: Any
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        statement = postgresql.insert(t).values(values).on_conflict_do_nothing()
    elif dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        statement = sqlite.insert(t).values(values).on_conflict_do_nothing()
    else:
        # Elsewhere a plain insert in a savepoint: the primary key refuses a duplicate.
        from sqlalchemy.exc import IntegrityError

        try:
            async with session.begin_nested():
                await session.execute(insert(t).values(values))
        except IntegrityError:
            return False
        return True
    result = await session.execute(statement)
    return bool(getattr(result, "rowcount", 0))
