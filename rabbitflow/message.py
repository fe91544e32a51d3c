"""The delivery as a handler sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rabbitflow.transport.base import Delivery

__all__ = ["DUPLICATE", "Message"]


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery: what the broker sent, and which attempt this is (1 on the first delivery)."""

    body: bytes
    headers: Mapping[str, Any]
    attempt: int
    message_id: str | None
    routing_key: str
    exchange: str
    redelivered: bool
    content_type: str | None
    correlation_id: str | None = None
    reply_to: str | None = None
    queue: str = ""

    def decode(self) -> Any:
        """The body decoded by its content type, as a handler's untyped body would be: JSON to
        Python objects, `text/*` to str, anything else the bytes (a reply of `app.request`, say).
        Raises `rabbitflow.errors.DecodeError` for a body its content type cannot read."""
        from rabbitflow.codec import decode

        return decode(self.body, self.content_type)

    @classmethod
    def of(cls, delivery: Delivery, headers: Mapping[str, Any], attempt: int, queue: str) -> Message:
        p = delivery.properties
        return cls(
            body=delivery.body,
            headers=headers,
            attempt=attempt,
            message_id=p.message_id,
            routing_key=delivery.routing_key,
            exchange=delivery.exchange,
            redelivered=delivery.redelivered,
            content_type=p.content_type,
            correlation_id=p.correlation_id,
            reply_to=p.reply_to,
            queue=queue,
        )


class _Duplicate:
    """What an `exactly_once` handler wrapper returns for a message it had handled before."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "DUPLICATE"


# Returned by an exactly_once consumer's handler for a delivery handled before: the consumer acks
# it without publishing a result, and middleware sees `Fate.DUPLICATE`.
DUPLICATE = _Duplicate()
