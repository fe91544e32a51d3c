"""A database transaction that publishes: messages staged with `publish` are written to the
outbox in the same transaction, so they leave if and only if it commits."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from rabbitflow.codec import encode
from rabbitflow.errors import UnencodableMessage
from rabbitflow.sql.schema import outbox_table

__all__ = ["Staged", "Transaction"]


@dataclass(frozen=True, slots=True)
class Staged:
    """One message waiting for its transaction's commit."""

    exchange: str
    routing_key: str
    body: bytes
    content_type: str
    message_id: str
    headers: dict[str, Any] | None
    persistent: bool
    mandatory: bool


class Transaction:
    """One database transaction: `session` for the service's own work, `publish` for the messages
    that must leave with it.

    A transaction is opened by `outbox.transaction()` or, for an `exactly_once` consumer, around
    its handler; it commits when that block (or the handler) ends without an exception and rolls
    back otherwise. Do not commit or roll back `session` yourself.
    """

    __slots__ = ("_staged", "session")

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self._staged: list[Staged] = []

    def publish(
        self,
        body: Any,
        *,
        exchange: str = "",
        routing_key: str,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        persistent: bool = True,
        mandatory: bool = True,
    ) -> str:
        """Stage a message: it is written to the outbox with the transaction and published by the
        relay once the transaction committed (in the order staged), never if it rolls back.

        The body encodes as for `app.publish` (dict/list/dataclass/pydantic → JSON, str → text,
        bytes as is), here and now, so a body that cannot be encoded fails the transaction.
        Header values must be JSON values (str, int, float, bool, None, lists, dicts). Returns the
        message id (a new uuid4 in hex unless given): it stays the same on every re-send, so an
        `exactly_once` consumer downstream handles the message once.
        """
        try:
            data, ctype = encode(body, content_type)
        except TypeError as exc:
            raise UnencodableMessage(f"outbox message to {exchange!r}/{routing_key!r}: {exc}") from None
        if headers:
            try:
                orjson.dumps(headers)
            except TypeError as exc:
                raise UnencodableMessage(
                    f"outbox message to {exchange!r}/{routing_key!r}: its headers must be JSON values "
                    f"to be stored in the outbox ({exc})"
                ) from None
        message_id = message_id or uuid.uuid4().hex
        self._staged.append(
            Staged(exchange, routing_key, data, ctype, message_id, headers or None, persistent, mandatory)
        )
        return message_id

    @property
    def staged(self) -> tuple[Staged, ...]:
        """The messages published so far, in order."""
        return tuple(self._staged)

    async def _write(self) -> None:
        """Insert the staged messages into the outbox, one batch for this transaction."""
        if not self._staged:
            return
        batch = uuid.uuid4().hex
        now = datetime.now(UTC)
        await self.session.execute(
            insert(outbox_table),
            [
                {
                    "batch": batch,
                    "seq": seq,
                    "created_at": now,
                    "available_at": now,
                    "exchange": m.exchange,
                    "routing_key": m.routing_key,
                    "message_id": m.message_id,
                    "content_type": m.content_type,
                    "headers": m.headers,
                    "body": m.body,
                    "persistent": m.persistent,
                    "mandatory": m.mandatory,
                }
                for seq, m in enumerate(self._staged)
            ],
        )
