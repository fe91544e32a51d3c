"""Retry and parked copies: what they carry, and their publish.

A copy is the producer's message (every property and header byte for byte) plus rabbitflow's
`x-rf-*` headers, built by pure functions of the delivery and the failure. `Copier` publishes it
on the session's copy publisher without holding the handler's task (or its concurrency slot);
the original is acked at the confirm, sent again under the publish rules after anything else,
and rejected to its parking queue when the broker refuses the copy for good.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import struct
import time
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from rabbitflow import names
from rabbitflow.errors import ChannelClosed, ConnectionLost, UnencodableMessage, Unroutable
from rabbitflow.runtime.publisher import Publisher
from rabbitflow.runtime.settlement import Settlement
from rabbitflow.transport.amqp.tables import entries, header_table
from rabbitflow.transport.base import Delivery, persistent_copy

__all__ = [
    "Copier",
    "attempt",
    "delivery_count",
    "describe",
    "exact_headers",
    "lean",
    "park_headers",
    "retry_headers",
]

log = logging.getLogger("rabbitflow.runtime.consumer")

_MAX_ERROR = 1000
_MAX_TRACEBACK = 4000


_second: tuple[int, str] = (0, "")


def _now() -> str:
    """ISO 8601 UTC with milliseconds; the formatting of the current second is reused."""
    global _second
    now = time.time()
    whole = int(now)
    if _second[0] != whole:
        _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


def attempt(delivery: Delivery, headers: Mapping[str, Any], queue: str, retries: int) -> int:
    """Which attempt `delivery` of `queue` is. rabbitflow's header counts only on a copy that came
    back through one of this queue's own retry queues; a forged header on any other message is
    ignored, and no header makes it more than the last attempt."""
    if not _came_back(delivery, headers, queue):
        return 1
    value = headers.get(names.RETRY_ATTEMPT)
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        return min(value, retries + 1)
    return 1


def _came_back(delivery: Delivery, headers: Mapping[str, Any], queue: str) -> bool:
    if delivery.exchange != "" or delivery.routing_key != queue:
        return False
    # The broker's own newest death record: 3.13+ writes x-last-death-*, older ones only x-death.
    last_queue = headers.get("x-last-death-queue")
    if last_queue is None:
        deaths = headers.get("x-death")
        if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
            return False
        last_queue, reason = deaths[0].get("queue"), deaths[0].get("reason")
    else:
        reason = headers.get("x-last-death-reason")
    return (
        reason == "expired"
        and isinstance(last_queue, str)
        and last_queue.startswith(names.retry_prefix(queue))
    )


def retry_headers(delivery: Delivery, attempt: int) -> dict[str, Any]:
    """The headers of the copy that brings `delivery` back as attempt `attempt + 1`."""
    copy = _copy_headers(delivery, attempt, _now(), drop=())
    copy[names.RETRY_ATTEMPT] = attempt + 1
    return copy


def park_headers(
    delivery: Delivery, reason: str, attempt: int, queue: str, exc: BaseException | None
) -> dict[str, Any]:
    """The headers of the parked copy of `delivery`, with why and after how many attempts."""
    now = _now()
    copy = _copy_headers(delivery, attempt, now, drop=names.RABBITFLOW_HEADERS)
    copy[names.REASON] = reason
    copy[names.PARKED_ATTEMPTS] = attempt
    copy[names.QUEUE] = queue
    copy[names.LAST_FAILURE] = now
    if exc is not None:
        copy[names.EXCEPTION] = f"{type(exc).__module__}.{type(exc).__qualname__}"
        copy[names.ERROR] = describe(exc)[:_MAX_ERROR]
        tb = "".join(traceback.format_exception(exc))
        copy[names.TRACEBACK] = tb[-_MAX_TRACEBACK:]
    elif reason == "delivery-limit":
        count = delivery_count(delivery.properties.headers or {})
        copy[names.ERROR] = (
            f"delivered {count + 1} times without being settled (a handler that crashes its worker?)"
        )
    elif reason == "worker-crash":
        copy[names.ERROR] = "its handler killed the worker process each time it ran alone (crash journal)"
    return copy


def _copy_headers(delivery: Delivery, attempt: int, now: str, drop: tuple[str, ...]) -> dict[str, Any]:
    """The headers of a copy: the delivery's without the broker's (and `drop`), plus where the
    message was first published and when it first failed. A later attempt is a copy that came
    back through a retry queue and carries both already."""
    headers = delivery.properties.headers or {}
    copy = exact_headers(delivery, names.without(headers, names.BROKER_HEADERS, drop))
    if attempt > 1:
        copy[names.ORIGINAL_EXCHANGE] = str(headers.get(names.ORIGINAL_EXCHANGE, ""))
        copy[names.ORIGINAL_ROUTING_KEY] = str(headers.get(names.ORIGINAL_ROUTING_KEY, delivery.routing_key))
        copy[names.FIRST_FAILURE] = headers.get(names.FIRST_FAILURE) or now
    else:
        copy[names.ORIGINAL_EXCHANGE] = delivery.exchange
        copy[names.ORIGINAL_ROUTING_KEY] = delivery.routing_key
        copy[names.FIRST_FAILURE] = now
    return copy


def exact_headers(delivery: Delivery, headers: dict[str, Any]) -> dict[str, Any]:
    """`headers` (some of the delivery's) with each value as the bytes it arrived in, type octet
    included, where the broker kept them: re-encoding a decoded value would pick its type by
    range (an int32 5 becomes an int8, a double 0.1 a float, a millisecond timestamp seconds)."""
    if delivery.raw_header is None or not headers:
        return headers
    try:
        table = header_table(delivery.raw_header)
        arrived = entries(table) if table is not None else {}
    except (ValueError, IndexError, struct.error):  # not what the decoder read: keep its values
        return headers
    return {key: arrived.get(key, value) for key, value in headers.items()}


def describe(exc: BaseException) -> str:
    """`str(exc)`, or what can be said of an exception whose `__str__` itself fails."""
    try:
        return str(exc)
    except Exception as failure:
        return f"<{type(exc).__name__}: str() failed with {type(failure).__name__}>"


def delivery_count(headers: Mapping[str, Any]) -> int:
    value = headers.get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


def lean(headers: Mapping[str, Any]) -> dict[str, Any] | None:
    """A copy's headers without rabbitflow's long texts (traceback, error), for a copy that does
    not fit the broker's frame; None when it has none to drop."""
    if names.TRACEBACK not in headers and names.ERROR not in headers:
        return None
    return names.without(headers, (names.TRACEBACK, names.ERROR))


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
                smaller = lean(properties.headers or {})
                if smaller is None:
                    raise
                # The producer's headers and ours do not fit a frame: drop our traceback and error
                # text (the first to go; x-rf-exception still says what failed) and try again.
                properties = persistent_copy(delivery.properties, smaller)
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
