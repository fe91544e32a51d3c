"""Looking into a parking queue, and sending parked messages back where they first went."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import names
from .transport.base import Delivery, Transport, persistent_copy

__all__ = ["ParkedMessage", "peek", "replay"]


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """A parked message as an operator reads it."""

    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    reason: str
    attempts: int
    error: str

    @classmethod
    def of(cls, delivery: Delivery) -> ParkedMessage:
        headers: dict[str, Any] = dict(delivery.properties.headers or {})
        return cls(
            body=delivery.body,
            headers=headers,
            message_id=delivery.properties.message_id,
            reason=str(headers.get(names.REASON, "")),
            attempts=int(headers.get(names.PARKED_ATTEMPTS, 0) or 0),
            error=str(headers.get(names.ERROR, "")),
        )


async def peek(transport: Transport, queue: str, limit: int) -> list[ParkedMessage]:
    """Up to `limit` messages of `queue`'s parking queue, head first; all of them stay parked."""
    channel = await transport.channel()
    found: list[ParkedMessage] = []
    try:
        while len(found) < limit:
            delivery = await channel.get(names.parked_queue(queue))
            if delivery is None:
                break
            found.append(ParkedMessage.of(delivery))
    finally:
        await channel.close()  # unacked: every message goes back to the parking queue
    return found


async def replay(transport: Transport, queue: str, limit: int | None = None) -> int:
    """Send parked messages back to the queue that parked them (the default exchange, routing key
    `queue`: never to the other queues bound where they were first published, whatever their
    headers say), without rabbitflow's headers, so they start again at attempt 1. It takes at most
    the messages parked when it began: those parked again meanwhile wait for the next replay.
    Each leaves the parking queue only after the broker confirmed its copy. Returns how many
    were sent back."""
    parked_queue = names.parked_queue(queue)
    channel = await transport.channel()
    sent = 0
    try:
        found = (await channel.declare_queue(parked_queue, passive=True)).message_count
        count = found if limit is None else min(found, limit)
        while sent < count:
            delivery = await channel.get(parked_queue)
            if delivery is None:
                break
            parked = delivery.properties.headers or {}
            headers = names.without(parked, names.RABBITFLOW_HEADERS, names.BROKER_HEADERS)
            await channel.publish(
                delivery.body,
                exchange="",
                routing_key=queue,
                properties=persistent_copy(delivery.properties, headers or None),
            )
            await channel.ack(delivery.delivery_tag)
            sent += 1
    finally:
        await channel.close()
    return sent
