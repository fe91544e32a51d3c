"""Retry and parked copies: a failed delivery ends when the broker answered its copy.

The copy is published on the session's copy publisher without holding the handler's task (or
its concurrency slot); the original is acked at the confirm, sent again under the publish rules
after anything else, and rejected to its parking queue when the broker refuses the copy for good.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from . import copies
from .errors import ChannelClosed, ConnectionLost, UnencodableMessage, Unroutable
from .publisher import Publisher
from .settlement import Settlement
from .transport.base import Delivery, persistent_copy

__all__ = ["Copier"]

log = logging.getLogger("rabbitflow.consumer")


class Copier:
    """The copies of one consumer's deliveries, to the service's dead-letter exchange."""

    def __init__(
        self, publisher: Publisher, settlement: Settlement, *, queue: str, dlx: str, parked: str
    ) -> None:
        self._publisher = publisher
        self.settlement = settlement
        self._queue = queue
        self._dlx = dlx
        self._parked_queue = parked
        self.pending: set[asyncio.Future[Any]] = set()  # copies awaiting the broker

    def send(self, delivery: Delivery, queue: str, headers: dict[str, Any]) -> None:
        """Publish the copy; the original is settled when the broker answers, without keeping the
        handler's task (or its concurrency slot) for it."""
        if delivery.undecodable is not None:
            # What could not be decoded cannot be copied: the queue dead-letters the original to
            # its parking queue instead, with every byte of it.
            self.settlement.reject(delivery.delivery_tag)
            return
        properties = persistent_copy(delivery.properties, headers)
        future = self._publisher.send(delivery.body, self._dlx, queue, properties)
        self.pending.add(future)
        future.add_done_callback(functools.partial(self._answered, delivery, queue, properties))

    def _answered(
        self, delivery: Delivery, queue: str, properties: Any, future: asyncio.Future[None]
    ) -> None:
        self.pending.discard(future)
        if future.cancelled():
            self.settlement.requeue(delivery.delivery_tag)
            return
        failure = future.exception()
        if failure is None:
            self.settlement.ack(delivery.delivery_tag)
            return
        # Anything else is sent again under the publish rules (backoff after a nack, a fresh channel
        # after a neighbour's channel error, the topology re-declared once for a missing exchange).
        again = asyncio.ensure_future(self._again(delivery, queue, properties, failure))
        self.pending.add(again)
        again.add_done_callback(self.pending.discard)

    async def _again(self, delivery: Delivery, queue: str, properties: Any, failure: BaseException) -> None:
        tag = delivery.delivery_tag
        try:
            try:
                await self._publisher.publish(delivery.body, self._dlx, queue, properties, after=failure)
            except UnencodableMessage:
                lean = copies.lean(properties.headers or {})
                if lean is None:
                    raise
                # The producer's headers and ours do not fit a frame: drop our traceback and error
                # text (the first to go; x-rf-exception still says what failed) and try again.
                properties = persistent_copy(delivery.properties, lean)
                await self._publisher.publish(delivery.body, self._dlx, queue, properties)
        except ConnectionLost:
            self.settlement.requeue(tag)  # the session is ending: the broker redelivers it
            return
        except asyncio.CancelledError:
            self.settlement.requeue(tag)
            raise
        except (ChannelClosed, Unroutable, UnencodableMessage) as refused:
            # The broker refuses this copy for good (a user_id it does not let us publish, say),
            # or it cannot be written: reject the original instead, which its queue dead-letters
            # to the parking queue with every property and header intact.
            log.error(
                "queue %s: message %s: copy to %s refused (%s); rejecting it to %s",
                self._queue,
                delivery.properties.message_id or "-",
                queue,
                refused,
                self._parked_queue,
            )
            self.settlement.reject(tag)
            return
        except Exception:
            # Not a refusal we know: back to the queue rather than a reject that could be lost.
            log.exception("queue %s: copy to %s failed; requeueing the message", self._queue, queue)
            self.settlement.requeue(tag)
            return
        self.settlement.ack(tag)
