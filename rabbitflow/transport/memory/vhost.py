"""The broker's state (exchanges, queues, bindings) and how messages move through it.

Everything here is synchronous: deliveries are handed to `spawn`, which runs each in a task,
and the clock is read from `clock`. MemoryBroker drives it.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from rabbitflow.transport.base import Delivery, Properties, clone_properties
from rabbitflow.transport.memory.amqp import not_found, precondition_failed, resource_locked
from rabbitflow.transport.memory.deadletter import BROKER_DEATH_HEADERS, is_cycle, record_death
from rabbitflow.transport.memory.profile import PROFILES, Profile
from rabbitflow.transport.memory.queue import Consumer, MemoryQueue, Message, Unacked
from rabbitflow.transport.memory.routing import MemoryExchange

__all__ = ["Dropped", "Published", "VHost"]

_PREDECLARED = [
    ("", "direct"),
    ("amq.direct", "direct"),
    ("amq.fanout", "fanout"),
    ("amq.topic", "topic"),
    ("amq.headers", "headers"),
]


@dataclass(frozen=True, slots=True)
class Published:
    """One publish as the broker received it, at virtual time `time`."""

    exchange: str
    routing_key: str
    properties: Properties
    body: bytes
    time: float


@dataclass(frozen=True, slots=True)
class Dropped:
    """A message that left `queue` for `reason` and went nowhere (RabbitMQ drops it silently)."""

    queue: str
    reason: str  # expired, rejected, maxlen, delivery_limit
    cause: str  # why it was not dead-lettered
    properties: Properties
    body: bytes
    time: float


class VHost:
    """The vhost "/" of the in-memory broker."""

    def __init__(
        self,
        clock: Callable[[], float],
        epoch: datetime,
        spawn: Callable[[Consumer, Delivery], None],
        profile: Profile = PROFILES["3.10"],
        consumer_timeout: float | None = None,
    ) -> None:
        self.clock = clock
        self.epoch = epoch
        self.profile = profile
        self.consumer_timeout = consumer_timeout  # seconds; the broker-wide setting
        self.held: dict[Unacked, float] = {}  # deliveries under a consumer timeout -> deadline
        self.exchanges = {name: MemoryExchange(name, kind, True, {}) for name, kind in _PREDECLARED}
        self.queues: dict[str, MemoryQueue] = {}
        # Direct reply-to: the channels consuming `amq.rabbitmq.reply-to`, by their reply address.
        self.repliers: dict[str, Callable[[Delivery], None]] = {}
        self.published: list[Published] = []
        self.dropped: list[Dropped] = []
        self.activity = 0  # counts every change, so the broker can tell when it is idle
        self.progress = 0  # counts messages leaving for good (acked, dead-lettered, deleted)
        self.after_pump: Callable[[], None] | None = None
        self._spawn = spawn
        self._dirty: dict[MemoryQueue, None] = {}
        self._pumping = False
        self._seq = itertools.count(1)
        self._names = itertools.count(1)

    def listen_for_replies(self, on_reply: Callable[[Delivery], None]) -> str:
        """A channel consumes amq.rabbitmq.reply-to: the address its requests get as reply_to."""
        address = self.new_name("amq.rabbitmq.reply-to.")
        self.repliers[address] = on_reply
        return address

    def reply(self, address: str, body: bytes, properties: Properties) -> bool:
        """A direct reply to `address` (amq.rabbitmq.reply-to.<token>); False when its requester's
        channel is gone."""
        replier = self.repliers.get(address)
        if replier is not None:
            delivery = Delivery(body, properties, 0, False, "", address)
            asyncio.get_running_loop().call_soon(replier, delivery)
        return replier is not None

    def new_name(self, prefix: str) -> str:
        return f"{prefix}{next(self._names):06d}"

    def queue(self, name: str, owner: object) -> MemoryQueue:
        """The queue, or 404; 405 when it is another connection's exclusive queue."""
        q = self.queues.get(name)
        if q is None:
            raise not_found("queue", name)
        if q.owner is not None and q.owner is not owner:
            raise resource_locked(name)
        return q

    def remove_queue(self, q: MemoryQueue) -> None:
        self.progress += 1
        del self.queues[q.name]
        for exchange in self.exchanges.values():
            exchange.unbind_queue(q.name)
        for consumer in list(q.consumers):
            consumer.channel._forget_consumer(consumer.tag)
            if consumer.on_cancel is not None:
                # RabbitMQ sends basic.cancel to the consumers of a deleted queue (its
                # consumer_cancel_notify capability, which aiormq announces).
                consumer.on_cancel()
        q.clear()
        self._dirty.pop(q, None)

    def touch(self, q: MemoryQueue) -> None:
        """Something changed on `q`: service it on the next pump."""
        self._dirty[q] = None

    # -- the clock -----------------------------------------------------------------------------

    def next_expiry(self) -> float | None:
        # Only the head of a queue can expire (as in RabbitMQ), so only heads are pending.
        due = [
            head.expires_at
            for q in self.queues.values()
            if (head := q.head()) is not None and head.expires_at is not None
        ]
        if self.held:
            due.append(min(self.held.values()))
        return min(due, default=None)

    def expire_due(self) -> None:
        now = self.clock()
        for q in self.queues.values():
            head = q.head()
            if head is not None and head.expired(now):
                self._dirty[q] = None
        late = [entry for entry, deadline in self.held.items() if deadline <= now + 1e-9]
        for entry in late:
            if entry in self.held and entry.consumer is not None:
                self._time_out(entry.consumer)
        self.pump()

    def timeout_for(self, q: MemoryQueue) -> float | None:
        """The consumer timeout (seconds) of a new consumer of `q`: the queue's x-consumer-timeout,
        else the broker's setting; from 4.3 quorum queues only
        (https://github.com/rabbitmq/rabbitmq-server/blob/main/consumer_timeouts.md)."""
        if self.profile.timeout_cancels and not q.is_quorum:
            return None
        return q.consumer_timeout if q.consumer_timeout is not None else self.consumer_timeout

    def _time_out(self, consumer: Consumer) -> None:
        """A delivery of `consumer` stayed unacked past its timeout."""
        channel = consumer.channel
        if not self.profile.timeout_cancels:
            # Up to 4.2 the channel is closed (https://www.rabbitmq.com/docs/consumers#acknowledgement-timeout).
            timeout = consumer.timeout or 0
            channel._shutdown(
                precondition_failed(
                    f"delivery acknowledgement on channel {channel.number} timed out. Timeout value "
                    f"used: {round(timeout * 1000)} ms. This timeout value can be configured, see "
                    "consumers doc guide to learn more"
                )
            )
            return
        # 4.3: the consumer's deliveries go back (uncounted) and it gets basic.cancel; the channel
        # stays open and ignores late acks of the reclaimed tags
        # (https://github.com/rabbitmq/rabbitmq-server/discussions/18207).
        for entry in channel._reclaim(consumer):
            self.settle(entry)
            self.give_back(entry, how="timeout")
        channel._forget_consumer(consumer.tag)
        if consumer.on_cancel is not None:
            consumer.on_cancel()

    def death_time(self) -> datetime:
        # x-death `time` is an AMQP timestamp in whole seconds; aiormq decodes it to a UTC datetime.
        return datetime.fromtimestamp(math.floor(self.epoch.timestamp() + self.clock()), tz=UTC)

    # -- moving messages -----------------------------------------------------------------------

    def pump(self) -> None:
        """Expire and deliver on every queue that changed, until none is left to service."""
        if self._pumping:
            return
        self._pumping = True
        try:
            while self._dirty:
                q = next(iter(self._dirty))
                del self._dirty[q]
                if self.queues.get(q.name) is q:
                    self._service(q)
        finally:
            self._pumping = False
        if self.after_pump is not None:
            self.after_pump()

    def _service(self, q: MemoryQueue) -> None:
        while (head := q.head()) is not None:
            if head.expired(self.clock()):
                q.pop_head()
                self.dead_letter(q, head, "expired")
                continue
            consumer = q.next_consumer()
            if consumer is None:
                return
            q.pop_head()
            self._deliver(q, consumer, head)

    def _deliver(self, q: MemoryQueue, consumer: Consumer, message: Message) -> None:
        entry = Unacked(q, message, consumer)
        tag = consumer.channel._track(entry)
        if consumer.timeout is not None:
            self.held[entry] = self.clock() + consumer.timeout
        consumer.unacked += 1
        q.unacked_count += 1
        properties = q.delivery_properties(message)
        redelivered = q.redelivered(message)
        delivery = Delivery(message.body, properties, tag, redelivered, message.exchange, message.routing_key)
        self.activity += 1
        self._spawn(consumer, delivery)

    def take(self, q: MemoryQueue) -> Unacked | None:
        """basic.get: the head message, now unacked on the caller's channel; None when empty."""
        while (head := q.head()) is not None and head.expired(self.clock()):
            self.dead_letter(q, q.pop_head(), "expired")
        if q.head() is None:
            return None
        q.unacked_count += 1
        return Unacked(q, q.pop_head(), None)

    def route(self, exchange: MemoryExchange, routing_key: str, properties: Properties) -> list[MemoryQueue]:
        if exchange.name == "":  # the default exchange routes by queue name
            q = self.queues.get(routing_key)
            return [q] if q is not None else []
        names = exchange.route(routing_key, properties.headers)
        return [self.queues[name] for name in names if name in self.queues]

    def enqueue(
        self,
        q: MemoryQueue,
        body: bytes,
        properties: Properties,
        exchange: str,
        routing_key: str,
        ttl: int | None,
        publisher: object,
        counts: tuple[int, int] = (0, 0),
    ) -> bool:
        """Put a message from `publisher` (a channel, or the dead-lettering queue) on `q`; False
        if the queue refused it (x-overflow=reject-publish). `counts`: the delivery and acquired
        counts a dead-lettered message carries (4.0)."""
        now = self.clock()
        message = Message(body, properties, exchange, routing_key, next(self._seq), q.expiry(ttl, now))
        message.broker_deaths = isinstance(publisher, MemoryQueue)  # dead-lettered, not published
        message.delivery_count, message.acquired_count = counts
        self.activity += 1
        if q.refuses(publisher):
            if q.overflow == "reject-publish-dlx":
                self.dead_letter(q, message, "maxlen")
            return False
        # An idle consumer takes the message before TTL or max-length apply: classic queues
        # deliver even a TTL-0 message, and quorum queues give TTL 0 a millisecond
        # (rabbit_fifo:update_expiry_header/3), which a waiting consumer beats.
        consumer = q.next_consumer() if q.head() is None else None
        if consumer is not None:
            self._deliver(q, consumer, message)
            return True
        q.push(message)
        self._drop_over_limit(q)
        q.check_overflow()
        self._dirty[q] = None
        return True

    def _drop_over_limit(self, q: MemoryQueue) -> None:
        # x-max-length with the default drop-head overflow dead-letters from the head.
        while q.max_length is not None and q.overflow == "drop-head" and q.message_count > q.max_length:
            self.dead_letter(q, q.pop_head(), "maxlen")

    def settle(self, entry: Unacked) -> None:
        """The delivery is no longer unacked (acked, rejected or returned)."""
        entry.queue.unacked_count -= 1
        self.held.pop(entry, None)
        if entry.consumer is not None:
            entry.consumer.unacked -= 1
        self._dirty[entry.queue] = None
        self.activity += 1

    def give_back(self, entry: Unacked, *, how: str = "lost") -> None:
        """A settled delivery returns to its queue: by basic.reject or basic.nack with requeue
        (`how` "reject", "nack"), its channel or connection closing ("lost"), or a consumer
        timeout ("timeout")."""
        q, message = entry.queue, entry.message
        if self.queues.get(q.name) is not q:
            return  # the queue was deleted meanwhile
        if q.is_quorum:
            message.acquired_count += 1
            # 4.3 counts only basic.reject and lost connections towards the limit
            # (https://www.rabbitmq.com/docs/4.3/nack); earlier versions count every return.
            profile = self.profile
            if (how != "nack" or profile.nack_counts) and (how != "timeout" or profile.timeout_counts):
                message.delivery_count += 1
            # rabbit_fifo: a message returned more than x-delivery-limit times is dead-lettered.
            if q.delivery_limit is not None and message.delivery_count > q.delivery_limit:
                self.dead_letter(q, message, "delivery_limit")
                return
        q.requeue(message, rejected=how in ("reject", "nack"))
        self._drop_over_limit(q)
        q.check_overflow()
        self._dirty[q] = None

    def discard(self, entry: Unacked) -> None:
        """A settled delivery was rejected without requeue: dead-letter it."""
        if self.queues.get(entry.queue.name) is entry.queue:
            self.dead_letter(entry.queue, entry.message, "rejected")

    def dead_letter(self, q: MemoryQueue, message: Message, reason: str) -> None:
        """Republish a message that left `q` to its dead-letter exchange, as rabbit_dead_letter does."""
        self.progress += 1
        props = message.properties
        if q.dead_letter_exchange is None:
            self._drop(q, message, reason, "the queue has no x-dead-letter-exchange")
            return
        dlx = self.exchanges.get(q.dead_letter_exchange)
        if dlx is None:
            self._drop(
                q, message, reason, f"its dead-letter exchange '{q.dead_letter_exchange}' does not exist"
            )
            return
        routing_key = q.dead_letter_routing_key
        if routing_key is None:
            routing_key = message.routing_key
        history = props.headers
        if not message.broker_deaths and not self.profile.interprets_client_x_death and history:
            # 4.0+ never interpret a client-set x-death: the broker starts its own history
            # (https://github.com/rabbitmq/rabbitmq-server/pull/11339).
            history = {k: v for k, v in history.items() if k not in BROKER_DEATH_HEADERS}
        headers = record_death(
            history,
            last_death=self.profile.last_death_headers,
            queue=q.name,
            reason=reason,
            exchange=message.exchange,
            routing_keys=[message.routing_key],
            time=self.death_time(),
            expiration=props.expiration,
        )
        # The per-message TTL does not travel on: x-death keeps it as original-expiration.
        dead = clone_properties(props, headers=headers, expiration=None, delivery_mode=props.delivery_mode)
        targets = self.route(dlx, routing_key, dead)
        if reason != "rejected":
            # A loop back to a queue the message already died in, with no rejection on the way,
            # is dropped ("Dead-letter queues cycle detected" in RabbitMQ's log).
            looping = [t for t in targets if is_cycle(t.name, headers["x-death"])]
            if looping:
                targets = [t for t in targets if t not in looping]
                cycle = f"dead-letter cycle back to {', '.join(t.name for t in looping)}"
                if not targets:
                    self._drop(q, message, reason, cycle)
                    return
        if not targets:
            self._drop(q, message, reason, f"no queue is bound to '{dlx.name}' for '{routing_key}'")
            return
        counts = (0, 0)
        if self.profile.dead_letter_keeps_counts:
            # 4.0 carries a message's delivery count round a dead-letter loop, the rejection
            # counted: it comes back redelivered with x-delivery-count 1, 2, ... (seen on 4.0.5).
            rejected = 1 if reason == "rejected" else 0
            counts = (message.delivery_count + rejected, message.acquired_count + rejected)
        for target in targets:
            if not self.enqueue(target, message.body, dead, dlx.name, routing_key, None, q, counts):
                self._drop(q, message, reason, f"queue '{target.name}' refused it (x-overflow)")

    def _drop(self, q: MemoryQueue, message: Message, reason: str, cause: str) -> None:
        record = Dropped(q.name, reason, cause, message.properties, message.body, self.clock())
        self.dropped.append(record)
