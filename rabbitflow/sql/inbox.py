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

from rabbitflow.errors import ConfigError, Reject, StateError
from rabbitflow.message import DUPLICATE, Message
from rabbitflow.sql.schema import inbox_table
from rabbitflow.sql.transaction import Transaction

if TYPE_CHECKING:
    from rabbitflow.sql.outbox import Outbox

__all__ = ["Inbox", "MessageKey", "Verdict", "bind", "exactly_once"]

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

    def exactly_once(self, handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        """`exactly_once(handler)` bound to this inbox now (for use under `@app.consumer`)."""
        wrapped = exactly_once(handler)
        bind(wrapped, self)
        return wrapped


def exactly_once(handler: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Make a handler `async def h(body: T, tx: Transaction[, message: Message])` a rabbitflow
    handler `(body: T, message: Message)` that runs it through an inbox's `attempt`, keyed by the
    consumer's queue. `@app.consumer(..., exactly_once=True)` does this and binds the app's
    outbox's inbox when the app starts. It returns `DUPLICATE` for a message handled before; the
    handler's own return value is not published: stage onward messages with `tx.publish`."""
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
    bound: list[Inbox] = []

    @functools.wraps(handler)
    async def consume(body: Any, message: Message) -> Any:
        if not bound:
            raise StateError(
                f"exactly_once {name}: no inbox: give the App an outbox (App(..., outbox=Outbox(engine)))"
            )

        async def call(tx: Transaction) -> None:
            extra: dict[str, Any] = {tx_param: tx}
            if message_param is not None:
                extra[message_param] = message
            await handler(body, **extra)

        verdict = await bound[-1].attempt(message.queue, message, call)
        return DUPLICATE if verdict is Verdict.DUPLICATE else None

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
    consume.__rabbitflow_inbox__ = bound  # type: ignore[attr-defined]
    return consume


def bind(handler: Callable[..., Awaitable[Any]], inbox: Inbox) -> None:
    """Point an `exactly_once` handler at `inbox` (the app's outbox's, when the app starts)."""
    bound: list[Inbox] = handler.__rabbitflow_inbox__  # type: ignore[attr-defined]
    bound[:] = [inbox]


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
