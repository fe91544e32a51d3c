"""A queue of the in-memory broker: its messages, arguments and consumers."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rabbitflow.transport.base import OnDelivery, Properties, QueueInfo, clone_properties
from rabbitflow.transport.memory.amqp import copy_table
from rabbitflow.transport.memory.profile import PROFILES, Profile

if TYPE_CHECKING:
    from rabbitflow.transport.memory.channel import MemoryChannel

__all__ = ["Consumer", "MemoryQueue", "Message", "Unacked"]


@dataclass(slots=True, eq=False)
class Message:
    """One message in one queue (a message routed to two queues is two of these)."""

    body: bytes
    properties: Properties  # never mutated: deliveries and inspections get copies
    exchange: str
    routing_key: str
    seq: int  # enqueue order; a classic queue requeues by it
    expires_at: float | None  # virtual time, None without TTL
    delivery_count: int = 0  # quorum: returns that count towards the delivery limit
    acquired_count: int = 0  # quorum: every return (4.3's x-acquired-count)
    redelivered: bool = False  # classic: requeued at least once
    broker_deaths: bool = False  # its x-death was written by the broker, not a client

    def expired(self, now: float) -> bool:
        # A nanosecond of slack, so that advance(0.1) three times reaches a 0.3 s TTL.
        return self.expires_at is not None and self.expires_at <= now + 1e-9


@dataclass(slots=True, eq=False)
class Consumer:
    tag: str
    channel: MemoryChannel
    queue: MemoryQueue
    on_delivery: OnDelivery
    prefetch: int  # 0: unlimited
    unacked: int = 0
    on_cancel: Callable[[], None] | None = None
    timeout: float | None = None  # seconds a delivery may stay unacked (quorum queues)

    @property
    def has_capacity(self) -> bool:
        return (self.prefetch == 0 or self.unacked < self.prefetch) and self.channel._has_room()


@dataclass(slots=True, eq=False)
class Unacked:
    """A delivery its channel has not acked or rejected yet."""

    queue: MemoryQueue
    message: Message
    consumer: Consumer | None  # None for basic.get


def _int(arguments: dict[str, Any], key: str) -> int | None:
    value = arguments.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(arguments: dict[str, Any], key: str) -> str | None:
    value = arguments.get(key)
    return value if isinstance(value, str) else None


def _delivery_limit(arguments: dict[str, Any], profile: Profile) -> float | None:
    # RabbitMQ 3.10 takes any x-delivery-limit on a quorum queue unchecked and compares it the
    # Erlang way: a number as a number; anything else sorts above every count, so is never hit.
    if "x-delivery-limit" not in arguments:
        # 4.0+: 20 when none is set (https://github.com/rabbitmq/rabbitmq-server/releases/tag/v4.0.1)
        return profile.default_delivery_limit
    value = arguments["x-delivery-limit"]
    if isinstance(value, int | float) and not isinstance(value, bool):
        if value < 0 and profile.default_delivery_limit is not None:
            return None  # 4.0+: -1 means unlimited (https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling)
        return value
    return math.inf


class MemoryQueue:
    """One queue's state; tests read it through `MemoryBroker.queues[name]`."""

    def __init__(
        self,
        name: str,
        *,
        durable: bool,
        owner: object | None,
        arguments: dict[str, Any],
        profile: Profile = PROFILES["3.10"],
    ) -> None:
        self.name = name
        self.profile = profile
        self.durable = durable
        self.owner = owner  # the transport of an exclusive queue
        self.arguments = arguments
        self.queue_type = _str(arguments, "x-queue-type") or "classic"
        self.message_ttl = _int(arguments, "x-message-ttl")
        self.dead_letter_exchange = _str(arguments, "x-dead-letter-exchange")
        self.dead_letter_routing_key = _str(arguments, "x-dead-letter-routing-key")
        self.max_length = _int(arguments, "x-max-length")
        self.overflow = _str(arguments, "x-overflow") or "drop-head"
        if self.is_quorum and self.overflow == "reject-publish-dlx":
            self.overflow = "drop-head"  # quorum queues log a warning and use their default
        self.delivery_limit = _delivery_limit(arguments, profile) if self.is_quorum else None
        timeout = _int(arguments, "x-consumer-timeout") if profile.queue_consumer_timeout else None
        honoured = self.is_quorum or profile.classic_consumer_timeout
        self.consumer_timeout = None if timeout is None or not honoured else timeout / 1000
        self.unacked_count = 0
        self.consumers: list[Consumer] = []
        # x-single-active-consumer: only the earliest subscribed consumer gets messages; when it
        # goes (cancel, channel closed), the next in subscription order at once, even while the
        # one that went still holds unacked messages (seen on 3.10.8). Consumer priorities do
        # not change which one is active (3.10.8).
        self.single_active = arguments.get("x-single-active-consumer") is True
        self._ready: deque[Message] = deque()
        self._returns: deque[Message] = deque()  # quorum: returned messages go first
        self._next_consumer = 0
        # quorum x-overflow=reject-publish: publisher -> blocked (rabbit_fifo's enqueuers)
        self._enqueuers: dict[object, bool] = {}

    def __repr__(self) -> str:
        return (
            f"<MemoryQueue {self.name!r} {self.queue_type} ready={self.message_count} "
            f"unacked={self.unacked_count} consumers={self.consumer_count}>"
        )

    @property
    def is_quorum(self) -> bool:
        return self.queue_type == "quorum"

    @property
    def exclusive(self) -> bool:
        return self.owner is not None

    @property
    def message_count(self) -> int:
        """Messages ready for delivery (not counting unacked ones), as queue.declare-ok reports."""
        return len(self._ready) + len(self._returns)

    @property
    def consumer_count(self) -> int:
        return len(self.consumers)

    def info(self) -> QueueInfo:
        return QueueInfo(self.name, self.message_count, self.consumer_count)

    def messages(self) -> list[tuple[Properties, bytes]]:
        """Copies of the ready messages' properties and bodies, head first."""
        return [(self.delivery_properties(m, peek=True), m.body) for m in self._all()]

    def _all(self) -> list[Message]:
        return [*self._returns, *self._ready]

    def expiry(self, per_message_ttl: int | None, now: float) -> float | None:
        """When a message enqueued now expires: the lower of queue and per-message TTL."""
        ttl = self.message_ttl
        if per_message_ttl is not None:
            ttl = per_message_ttl if ttl is None else min(ttl, per_message_ttl)
        return None if ttl is None else now + ttl / 1000

    def head(self) -> Message | None:
        if self._returns:
            return self._returns[0]
        return self._ready[0] if self._ready else None

    def pop_head(self) -> Message:
        return self._returns.popleft() if self._returns else self._ready.popleft()

    def push(self, message: Message) -> None:
        self._ready.append(message)

    def requeue(self, message: Message, *, rejected: bool = False) -> None:
        """Put a returned message back. Classic queues put it back at its original position.
        Quorum queues serve returns first, in return order, except that 3.10-3.13 append a
        message a consumer rejected with requeue to the back when there is no x-delivery-limit
        (rabbit_fifo turns that return into a #requeue{} command, to let its log be truncated)."""
        if self.is_quorum:
            if rejected and self.delivery_limit is None and self.profile.requeue_to_back:
                self._ready.append(message)
            else:
                self._returns.append(message)
            return
        message.redelivered = True
        ready = self._ready
        for index, other in enumerate(ready):
            if other.seq > message.seq:
                ready.insert(index, message)
                return
        ready.append(message)

    def refuses(self, publisher: object) -> bool:
        """Whether x-overflow=reject-publish(-dlx) refuses a message from `publisher` now."""
        limit = self.max_length
        if limit is None or self.overflow == "drop-head":
            return False
        if not self.is_quorum:
            return self.message_count >= limit  # classic: refused once the queue is full
        # rabbit_fifo accepts the message that takes the queue over the limit, then blocks every
        # publisher it knows until the ready count falls to 80% of the limit; a new publisher
        # is refused only while the queue is over the limit.
        if self.message_count <= int(limit * 0.8):
            self._enqueuers = dict.fromkeys(self._enqueuers, False)
        if publisher not in self._enqueuers:
            self._enqueuers[publisher] = self.message_count > limit
        return self._enqueuers[publisher]

    def check_overflow(self) -> None:
        """After an enqueue: a quorum queue over its reject-publish limit blocks its publishers."""
        limit = self.max_length
        if (
            self.is_quorum
            and self.overflow != "drop-head"
            and limit is not None
            and self.message_count > limit
        ):
            self._enqueuers = dict.fromkeys(self._enqueuers, True)

    def redelivered(self, message: Message) -> bool:
        return message.acquired_count > 0 if self.is_quorum else message.redelivered

    def delivery_properties(
        self,
        message: Message,
        *,
        basic_get: bool = False,
        peek: bool = False,
    ) -> Properties:
        """A private copy of the properties, with `x-delivery-count` where a quorum queue adds it."""
        p = message.properties
        headers = copy_table(p.headers) if p.headers is not None else None
        # Quorum queues add x-delivery-count once a message was returned (absent on the first
        # delivery); 3.10's basic.get adds it always, 0 on the first get (4.0: not).
        first_get = basic_get and self.profile.get_adds_delivery_count
        if self.is_quorum and not peek and (message.delivery_count or first_get):
            headers = {**(headers or {}), "x-delivery-count": message.delivery_count}
        # 4.3 adds x-acquired-count, every hand-out before this one
        # (https://github.com/rabbitmq/rabbitmq-server/releases/tag/v4.3.0)
        if self.is_quorum and not peek and self.profile.acquired_count_header and message.acquired_count:
            headers = {**(headers or {}), "x-acquired-count": message.acquired_count}
        return clone_properties(p, headers=headers, expiration=p.expiration, delivery_mode=p.delivery_mode)

    def next_consumer(self) -> Consumer | None:
        """The next consumer with room under its prefetch, round-robin as RabbitMQ does."""
        if self.single_active:
            active = self.consumers[0] if self.consumers else None
            return active if active is not None and active.has_capacity else None
        count = len(self.consumers)
        for offset in range(count):
            index = (self._next_consumer + offset) % count
            consumer = self.consumers[index]
            if consumer.has_capacity:
                self._next_consumer = index + 1
                return consumer
        return None

    def clear(self) -> None:
        self._ready.clear()
        self._returns.clear()
        self.consumers.clear()
