"""An in-memory AMQP 0-9-1 broker on a virtual clock, for tests without RabbitMQ.

It behaves like RabbitMQ 3.10 where rabbitflow relies on it: exchanges and bindings, TTL with
head-of-queue expiry, dead-lettering with `x-death`, quorum delivery limits, prefetch,
ack/reject/requeue, mandatory returns and publisher confirms. Time only moves when a test calls
`advance()` or `drain()`, so a 60 s retry delay costs nothing.

    broker = MemoryBroker()
    transport = await broker.connect()
    channel = await transport.channel()
    ...
    await broker.drain()  # deliver, expire and dead-letter until nothing is left to happen
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from ..errors import PublishNacked, Unroutable
from ..transport.base import (
    Arguments,
    Channel,
    ChannelClosed,
    ConnectionLost,
    Delivery,
    OnDelivery,
    Properties,
    QueueInfo,
    Transport,
    TransportError,
)
from ._amqp import (
    EXCHANGE_ARGS,
    QUEUE_ARGS,
    access_refused,
    assert_args_equivalence,
    assert_field_equivalence,
    clone_properties,
    copy_table,
    not_found,
    parse_expiration,
    precondition_failed,
    resource_locked,
    rs,
    validate_queue_arguments,
    wire_properties,
    wire_table,
)
from ._deadletter import is_cycle, record_death
from ._queue import Consumer, MemoryQueue, Message
from ._routing import EXCHANGE_TYPES, X_MATCH, Binding, MemoryExchange

__all__ = [
    "Dropped",
    "MemoryBroker",
    "MemoryChannel",
    "MemoryExchange",
    "MemoryQueue",
    "MemoryTransport",
    "Published",
]

_log = logging.getLogger("rabbitflow.testing")

# How many event-loop turns without broker activity count as idle. More while messages are
# unacked: a consumer may hand deliveries to its own tasks, which ack a few turns later.
_QUIET_TURNS = 3
_QUIET_TURNS_UNACKED = 20


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


@dataclass(slots=True, eq=False)
class _Unacked:
    queue: MemoryQueue
    message: Message
    consumer: Consumer | None  # None for basic.get


class _Budget:
    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.left = max_steps


class MemoryBroker:
    """One vhost's exchanges, queues and bindings, and a virtual clock `now` in seconds."""

    def __init__(self, *, epoch: datetime | None = None) -> None:
        """`epoch` is the wall-clock time at `now == 0` (default: when the broker was made)."""
        self.now = 0.0
        self.epoch = epoch or datetime.now(UTC).replace(microsecond=0)
        self.exchanges: dict[str, MemoryExchange] = {
            name: MemoryExchange(name, kind, True, {})
            for name, kind in [("", "direct"), ("amq.direct", "direct"), ("amq.fanout", "fanout"),
                               ("amq.topic", "topic"), ("amq.headers", "headers")]
        }
        self.queues: dict[str, MemoryQueue] = {}
        self.published: list[Published] = []
        self.dropped: list[Dropped] = []
        self._transports: list[MemoryTransport] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[Exception] = []
        self._dirty: dict[MemoryQueue, None] = {}
        self._pumping = False
        self._activity = 0
        self._seq = itertools.count(1)
        self._names = itertools.count(1)

    # -- the public surface --------------------------------------------------------------

    async def connect(self) -> MemoryTransport:
        transport = MemoryTransport(self)
        self._transports.append(transport)
        await asyncio.sleep(0)
        return transport

    @property
    def wall_clock(self) -> datetime:
        """The virtual clock as a UTC datetime."""
        return self.epoch + timedelta(seconds=self.now)

    def queue_names(self) -> list[str]:
        return sorted(self.queues)

    def messages(self, queue: str) -> list[tuple[Properties, bytes]]:
        """Copies of the messages ready in `queue`, head first (unacked ones are not listed)."""
        return self.queues[queue].messages()

    def disconnect_all(self) -> None:
        """Cut every connection as a network failure would: unacked messages return to their
        queues, in-flight delivery callbacks are cancelled and `wait_closed()` returns ConnectionLost."""
        for transport in list(self._transports):
            self._close_transport(
                transport, ConnectionLost("connection to memory:// lost (MemoryBroker.disconnect_all)"),
            )

    async def advance(self, seconds: float, *, max_steps: int = 10_000) -> None:
        """Move the clock forward by `seconds`, one expiry at a time, settling after each."""
        if seconds < 0:
            raise ValueError(f"advance({seconds!r}): the clock only moves forward")
        target = self.now + seconds
        budget = _Budget(max_steps)
        await self._settle(budget)
        while (due := self._next_expiry()) is not None and due <= target:
            self._step(budget)
            self.now = max(self.now, due)
            self._expire_due()
            await self._settle(budget)
        self.now = target
        await self._settle(budget)

    async def drain(self, *, advance_clock: bool = True, max_steps: int = 10_000) -> None:
        """Run until idle: nothing deliverable and no delivery callback running. With
        `advance_clock`, also jump to each pending expiry until no message has a TTL left.

        Exceptions raised by `on_delivery` callbacks are re-raised here (several as an
        ExceptionGroup). `max_steps` bounds the rounds, so a consumer that requeues forever
        fails the test instead of hanging it.
        """
        budget = _Budget(max_steps)
        await self._settle(budget)
        while advance_clock and (due := self._next_expiry()) is not None:
            self._step(budget)
            self.now = max(self.now, due)
            self._expire_due()
            await self._settle(budget)

    # -- idleness and the clock ----------------------------------------------------------

    def _step(self, budget: _Budget) -> None:
        budget.left -= 1
        if budget.left < 0:
            self._raise_errors()
            raise RuntimeError(
                f"the memory broker did not settle within max_steps={budget.max_steps}: "
                "deliveries keep coming (a consumer that requeues forever?)"
            )

    async def _settle(self, budget: _Budget) -> None:
        if asyncio.current_task() in self._tasks:
            raise RuntimeError("drain()/advance() can't be awaited inside an on_delivery callback")
        quiet = 0
        while True:
            self._pump()
            if self._tasks:
                self._step(budget)
                await asyncio.wait(set(self._tasks))
                quiet = 0
                continue
            mark = self._activity
            await asyncio.sleep(0)
            if self._tasks or self._activity != mark:
                quiet = 0
                continue
            quiet += 1
            unacked = any(q.unacked_count for q in self.queues.values())
            if quiet >= (_QUIET_TURNS_UNACKED if unacked else _QUIET_TURNS):
                break
        self._raise_errors()

    def _raise_errors(self) -> None:
        errors, self._errors = self._errors, []
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"{len(errors)} on_delivery callbacks failed", errors)

    def _next_expiry(self) -> float | None:
        # Only the head of a queue can expire (as in RabbitMQ), so only heads are pending.
        due = [
            head.expires_at for q in self.queues.values()
            if (head := q.head()) is not None and head.expires_at is not None
        ]
        return min(due, default=None)

    def _expire_due(self) -> None:
        for q in self.queues.values():
            head = q.head()
            if head is not None and head.expires_at is not None and head.expires_at <= self.now:
                self._dirty[q] = None
        self._pump()

    def _death_time(self) -> datetime:
        # x-death `time` is an AMQP timestamp in whole seconds; aiormq decodes it to a UTC datetime.
        return datetime.fromtimestamp(math.floor(self.epoch.timestamp() + self.now), tz=UTC)

    # -- moving messages -----------------------------------------------------------------

    def _pump(self) -> None:
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

    def _service(self, q: MemoryQueue) -> None:
        while (head := q.head()) is not None:
            if head.expires_at is not None and head.expires_at <= self.now:
                q.pop_head()
                self._dead_letter(q, head, "expired")
                continue
            consumer = q.next_consumer()
            if consumer is None:
                return
            q.pop_head()
            self._deliver(q, consumer, head)

    def _deliver(self, q: MemoryQueue, consumer: Consumer, message: Message) -> None:
        channel = consumer.channel
        tag = channel._add_unacked(_Unacked(q, message, consumer))
        consumer.unacked += 1
        delivery = Delivery(
            message.body, q.delivery_properties(message), tag, q.redelivered(message),
            message.exchange, message.routing_key,
        )
        self._activity += 1
        task = asyncio.get_running_loop().create_task(
            self._invoke(consumer.on_delivery, delivery), name=f"memory-delivery:{q.name}:{tag}",
        )
        # Like aiormq: each delivery runs in its own task, owned by the channel.
        self._tasks.add(task)
        channel._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(channel._tasks.discard)

    async def _invoke(self, on_delivery: OnDelivery, delivery: Delivery) -> None:
        try:
            await on_delivery(delivery)
        except Exception as exc:
            _log.error("on_delivery failed for delivery %d", delivery.delivery_tag, exc_info=exc)
            self._errors.append(exc)

    def _route(self, exchange: MemoryExchange, routing_key: str, properties: Properties,
               ) -> list[MemoryQueue]:
        if exchange.name == "":  # the default exchange routes by queue name
            q = self.queues.get(routing_key)
            return [q] if q is not None else []
        names = exchange.route(routing_key, properties.headers)
        return [self.queues[name] for name in names if name in self.queues]

    def _enqueue(self, q: MemoryQueue, body: bytes, properties: Properties, exchange: str,
                 routing_key: str, ttl: int | None) -> bool:
        """Put a message on `q`; False if the queue refused it (x-overflow=reject-publish)."""
        message = Message(body, properties, exchange, routing_key, next(self._seq),
                          q.expiry(ttl, self.now))
        if (q.max_length is not None and q.overflow != "drop-head"
                and q.message_count >= q.max_length):
            if q.overflow == "reject-publish-dlx":
                self._dead_letter(q, message, "maxlen")
            return False
        # An idle consumer takes the message before TTL or max-length apply (classic queues
        # deliver even a TTL-0 message; quorum queues expire it first).
        expired = message.expires_at is not None and message.expires_at <= self.now
        consumer = q.next_consumer() if q.head() is None else None
        if consumer is not None and not (expired and q.is_quorum):
            self._deliver(q, consumer, message)
            return True
        q.push(message)
        self._drop_over_limit(q)
        self._dirty[q] = None
        return True

    def _drop_over_limit(self, q: MemoryQueue) -> None:
        # x-max-length with the default drop-head overflow dead-letters from the head.
        while q.max_length is not None and q.overflow == "drop-head" \
                and q.message_count > q.max_length:
            self._dead_letter(q, q.pop_head(), "maxlen")

    def _return(self, entry: _Unacked) -> None:
        """A message comes back unacked: reject/nack with requeue, or its channel closed."""
        q, message = entry.queue, entry.message
        if self.queues.get(q.name) is not q:
            return  # the queue was deleted
        if q.is_quorum:
            message.delivery_count += 1
            # rabbit_fifo: a message returned more than x-delivery-limit times is dead-lettered.
            if q.delivery_limit is not None and message.delivery_count > q.delivery_limit:
                self._dead_letter(q, message, "delivery_limit")
                return
        q.requeue(message)
        self._drop_over_limit(q)
        self._dirty[q] = None

    def _settle_entry(self, entry: _Unacked) -> None:
        entry.queue.unacked_count -= 1
        if entry.consumer is not None:
            entry.consumer.unacked -= 1
        self._dirty[entry.queue] = None

    def _dead_letter(self, q: MemoryQueue, message: Message, reason: str) -> None:
        """Republish a message that left `q` to its dead-letter exchange, as rabbit_dead_letter."""
        props = message.properties
        if q.dead_letter_exchange is None:
            self._drop(q, message, reason, "the queue has no x-dead-letter-exchange")
            return
        dlx = self.exchanges.get(q.dead_letter_exchange)
        if dlx is None:
            self._drop(q, message, reason,
                       f"its dead-letter exchange '{q.dead_letter_exchange}' does not exist")
            return
        routing_key = q.dead_letter_routing_key
        if routing_key is None:
            routing_key = message.routing_key
        headers = record_death(
            props.headers, queue=q.name, reason=reason, exchange=message.exchange,
            routing_keys=[message.routing_key], time=self._death_time(),
            expiration=props.expiration,
        )
        # The per-message TTL is moved into x-death's original-expiration.
        dead = clone_properties(props, headers=headers, expiration=None)
        targets = self._route(dlx, routing_key, dead)
        if reason != "rejected":
            # A loop back to a queue the message died in, with no rejection on the way, is
            # dropped ("Dead-letter queues cycle detected" in RabbitMQ's log).
            looping = [t for t in targets if is_cycle(t.name, headers["x-death"])]
            targets = [t for t in targets if t not in looping]
            if looping and not targets:
                names = ", ".join(t.name for t in looping)
                self._drop(q, message, reason, f"dead-letter cycle back to {names}")
                return
        if not targets:
            self._drop(q, message, reason,
                       f"no queue is bound to '{dlx.name}' for routing key '{routing_key}'")
            return
        for target in targets:
            if not self._enqueue(target, message.body, dead, dlx.name, routing_key, None):
                self._drop(q, message, reason, f"queue '{target.name}' refused it (x-overflow)")

    def _drop(self, q: MemoryQueue, message: Message, reason: str, cause: str) -> None:
        self.dropped.append(Dropped(q.name, reason, cause, message.properties, message.body,
                                    self.now))

    # -- AMQP methods, called by MemoryChannel ------------------------------------------

    def _declare_exchange(self, name: str, kind: str, durable: bool, arguments: Arguments | None,
                          passive: bool) -> None:
        if passive:
            if name not in self.exchanges:
                raise not_found("exchange", name)
            return
        if kind not in EXCHANGE_TYPES:
            raise ChannelClosed(503, f"COMMAND_INVALID - unknown exchange type '{kind}'")
        if name == "":
            raise access_refused("operation not permitted on the default exchange")
        args = wire_table(arguments)
        existing = self.exchanges.get(name)
        if existing is not None:
            assert_field_equivalence("exchange", name, "type", existing.type, kind)
            assert_field_equivalence("exchange", name, "durable", existing.durable, durable)
            assert_args_equivalence("exchange", name, existing.arguments, args, EXCHANGE_ARGS)
            return
        if name.startswith("amq."):
            raise access_refused(f"exchange name '{name}' contains reserved prefix 'amq.*'")
        self.exchanges[name] = MemoryExchange(name, kind, durable, args)

    def _declare_queue(self, owner: MemoryTransport, name: str, durable: bool, exclusive: bool,
                       arguments: Arguments | None, passive: bool) -> QueueInfo:
        if passive:
            return self._queue(owner, name).info()
        args = wire_table(arguments)
        durable = durable and not exclusive  # RabbitMQ never keeps an exclusive queue durable
        if name == "":
            if args.get("x-queue-type") == "quorum":
                raise precondition_failed("Cannot declare a server-named queue for type quorum")
            name = f"amq.gen-{next(self._names):06d}"
        elif name.startswith("amq."):
            raise access_refused(f"queue name '{name}' contains reserved prefix 'amq.*'")
        existing = self.queues.get(name)
        if existing is not None:
            if existing.owner is not (owner if exclusive else None):
                raise resource_locked(name)
            assert_field_equivalence("queue", name, "durable", existing.durable, durable)
            assert_args_equivalence("queue", name, existing.arguments, args, QUEUE_ARGS)
            return existing.info()
        validate_queue_arguments(name, args)
        kind = args.get("x-queue-type", "classic")
        if kind == "stream":
            raise NotImplementedError("the memory broker has no stream queues")
        if kind == "quorum" and not durable:
            prop = "exclusive-owner" if exclusive else "non-durable"
            raise precondition_failed(f"invalid property '{prop}' for {rs('queue', name)}")
        q = MemoryQueue(name, durable=durable, owner=owner if exclusive else None, arguments=args)
        self.queues[name] = q
        return q.info()

    def _queue(self, owner: MemoryTransport, name: str) -> MemoryQueue:
        q = self.queues.get(name)
        if q is None:
            raise not_found("queue", name)
        if q.owner is not None and q.owner is not owner:
            raise resource_locked(name)
        return q

    def _bind(self, owner: MemoryTransport, queue: str, exchange: str, routing_key: str,
              arguments: Arguments | None) -> None:
        if exchange == "":
            raise access_refused("operation not permitted on the default exchange")
        args = wire_table(arguments)
        x = self.exchanges.get(exchange)
        if x is None:
            raise not_found("exchange", exchange)
        q = self._queue(owner, queue)
        if x.type == "headers" and args.get("x-match", "all") not in X_MATCH:
            raise precondition_failed(
                f"Invalid x-match field value {args['x-match']!r}; "
                "expected all, any, all-with-x, or any-with-x"
            )
        x.bind(Binding(q.name, routing_key, args))

    def _delete_queue(self, owner: MemoryTransport, name: str) -> None:
        if name not in self.queues:
            return  # deleting a missing queue is not an error
        q = self._queue(owner, name)
        del self.queues[name]
        for x in self.exchanges.values():
            x.unbind_queue(name)
        for consumer in q.consumers:
            consumer.channel._consumers.pop(consumer.tag, None)
        q.clear()
        self._dirty.pop(q, None)

    def _delete_exchange(self, name: str) -> None:
        if name == "":
            raise access_refused("operation not permitted on the default exchange")
        if name.startswith("amq."):
            raise access_refused(f"deletion of system {rs('exchange', name)} not allowed")
        self.exchanges.pop(name, None)

    def _publish(self, body: bytes, exchange: str, routing_key: str, properties: Properties,
                 mandatory: bool) -> None:
        x = self.exchanges.get(exchange)
        if x is None:
            raise not_found("exchange", exchange)
        props = wire_properties(properties)  # a copy, never the publisher's headers dict
        ttl = parse_expiration(props.expiration) if props.expiration is not None else None
        self.published.append(Published(exchange, routing_key, wire_properties(props), body,
                                        self.now))
        targets = self._route(x, routing_key, props)
        if not targets:
            if mandatory:
                raise Unroutable(exchange, routing_key)
            return
        refused = [q.name for q in targets
                   if not self._enqueue(q, body, props, exchange, routing_key, ttl)]
        if refused:
            raise PublishNacked(
                f"the broker refused the message: queue {', '.join(map(repr, refused))} is full "
                "(x-max-length with x-overflow=reject-publish); consume or raise the limit"
            )

    def _consume(self, channel: MemoryChannel, queue: str, on_delivery: OnDelivery,
                 prefetch: int) -> str:
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch!r}: expected a count >= 0 (0 = unlimited)")
        q = self._queue(channel._transport, queue)
        tag = f"amq.ctag-{next(self._names):06d}"
        consumer = Consumer(tag, channel, q, on_delivery, prefetch)
        q.consumers.append(consumer)
        channel._consumers[tag] = consumer
        self._dirty[q] = None
        return tag

    def _cancel(self, channel: MemoryChannel, tag: str) -> None:
        consumer = channel._consumers.pop(tag, None)
        if consumer is not None and consumer in consumer.queue.consumers:
            consumer.queue.consumers.remove(consumer)

    def _get(self, channel: MemoryChannel, queue: str) -> Delivery | None:
        q = self._queue(channel._transport, queue)
        while (head := q.head()) is not None and head.expires_at is not None \
                and head.expires_at <= self.now:
            self._dead_letter(q, q.pop_head(), "expired")
        if head is None:
            return None
        q.pop_head()
        tag = channel._add_unacked(_Unacked(q, head, None))
        return Delivery(head.body, q.delivery_properties(head, basic_get=True), tag,
                        q.redelivered(head), head.exchange, head.routing_key)

    def _ack(self, channel: MemoryChannel, tag: int, multiple: bool) -> None:
        # rabbit_channel: multiple with tag 0 acks everything; otherwise the tag must be known.
        unacked = channel._unacked
        if multiple and tag == 0:
            tags = list(unacked)
        elif tag not in unacked:
            raise precondition_failed(f"unknown delivery tag {tag}")
        else:
            tags = [t for t in unacked if t <= tag] if multiple else [tag]
        for t in tags:
            self._settle_entry(unacked.pop(t))

    def _reject(self, channel: MemoryChannel, tag: int, requeue: bool) -> None:
        entry = channel._unacked.pop(tag, None)
        if entry is None:
            raise precondition_failed(f"unknown delivery tag {tag}")
        self._settle_entry(entry)
        if requeue:
            self._return(entry)
        elif self.queues.get(entry.queue.name) is entry.queue:
            self._dead_letter(entry.queue, entry.message, "rejected")

    def _close_channel(self, channel: MemoryChannel, reason: TransportError) -> None:
        if channel._closed is not None:
            return
        channel._closed = reason
        for tag in list(channel._consumers):
            self._cancel(channel, tag)
        entries = list(channel._unacked.values())
        channel._unacked.clear()
        for entry in entries:  # unacked messages go back to their queues, redelivered
            self._settle_entry(entry)
            self._return(entry)
        # aiormq cancels a channel's consumer tasks when the channel closes.
        current = asyncio.current_task()
        for task in list(channel._tasks):
            if task is not current:
                task.cancel()
        self._pump()

    def _close_transport(self, transport: MemoryTransport, lost: ConnectionLost | None) -> None:
        if transport._closed.done():
            return
        reason = lost or ConnectionLost("the connection was closed")
        for channel in transport._channels:
            self._close_channel(channel, reason)
        for q in [q for q in self.queues.values() if q.owner is transport]:
            self._delete_queue(transport, q.name)  # exclusive queues go with their connection
        if transport in self._transports:
            self._transports.remove(transport)
        transport._closed.set_result(lost)


class MemoryTransport(Transport):
    """A connection to a MemoryBroker."""

    node = "memory://"

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker
        self._channels: list[MemoryChannel] = []
        self._closed: asyncio.Future[ConnectionLost | None] = (
            asyncio.get_running_loop().create_future()
        )

    @property
    def is_open(self) -> bool:
        return not self._closed.done()

    @property
    def blocked(self) -> bool:
        return False

    async def wait_unblocked(self) -> None:
        return None

    async def channel(self) -> MemoryChannel:
        if not self.is_open:
            raise ConnectionLost("the connection is closed")
        channel = MemoryChannel(self, len(self._channels) + 1)
        self._channels.append(channel)
        await asyncio.sleep(0)
        return channel

    async def wait_closed(self) -> BaseException | None:
        return await asyncio.shield(self._closed)

    async def close(self) -> None:
        self._broker._close_transport(self, None)
        await asyncio.sleep(0)


class MemoryChannel(Channel):
    """A channel in confirm mode: every publish returns once the broker took the message."""

    def __init__(self, transport: MemoryTransport, number: int) -> None:
        self.number = number
        self._transport = transport
        self._broker = transport._broker
        self._closed: TransportError | None = None
        self._last_tag = 0
        self._unacked: dict[int, _Unacked] = {}
        self._consumers: dict[str, Consumer] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        state = "open" if self._closed is None else f"closed ({self._closed})"
        return f"<MemoryChannel {self.number} {state} unacked={len(self._unacked)}>"

    @property
    def is_open(self) -> bool:
        return self._closed is None

    def _add_unacked(self, entry: _Unacked) -> int:
        # Delivery tags count per channel from 1.
        self._last_tag += 1
        self._unacked[self._last_tag] = entry
        entry.queue.unacked_count += 1
        return self._last_tag

    @contextlib.contextmanager
    def _method(self) -> Iterator[MemoryBroker]:
        """Run one AMQP method: a channel error closes the channel, as the broker does."""
        reason = self._closed
        if isinstance(reason, ChannelClosed):
            raise ChannelClosed(reason.code, reason.text)
        if reason is not None:
            raise ConnectionLost(str(reason))
        broker = self._broker
        broker._activity += 1
        try:
            yield broker
        except ChannelClosed as exc:
            broker._close_channel(self, exc)
            raise
        finally:
            broker._pump()

    async def declare_exchange(
        self, name: str, type: str = "direct", *, durable: bool = True,
        arguments: Arguments | None = None, passive: bool = False,
    ) -> None:
        with self._method() as broker:
            broker._declare_exchange(name, type, durable, arguments, passive)
        await asyncio.sleep(0)

    async def declare_queue(
        self, name: str, *, durable: bool = True, exclusive: bool = False,
        arguments: Arguments | None = None, passive: bool = False,
    ) -> QueueInfo:
        with self._method() as broker:
            info = broker._declare_queue(self._transport, name, durable, exclusive, arguments,
                                         passive)
        await asyncio.sleep(0)
        return info

    async def bind_queue(
        self, queue: str, exchange: str, routing_key: str, arguments: Arguments | None = None,
    ) -> None:
        with self._method() as broker:
            broker._bind(self._transport, queue, exchange, routing_key, arguments)
        await asyncio.sleep(0)

    async def delete_queue(self, name: str) -> None:
        with self._method() as broker:
            broker._delete_queue(self._transport, name)
        await asyncio.sleep(0)

    async def delete_exchange(self, name: str) -> None:
        with self._method() as broker:
            broker._delete_exchange(name)
        await asyncio.sleep(0)

    async def publish(
        self, body: bytes, *, exchange: str, routing_key: str, properties: Properties,
        mandatory: bool = True,
    ) -> None:
        """Publish and return once confirmed; `Unroutable` if a mandatory publish has no queue."""
        with self._method() as broker:
            broker._publish(body, exchange, routing_key, properties, mandatory)
        await asyncio.sleep(0)

    async def consume(self, queue: str, on_delivery: OnDelivery, *, prefetch: int) -> str:
        with self._method() as broker:
            tag = broker._consume(self, queue, on_delivery, prefetch)
        await asyncio.sleep(0)
        return tag

    async def cancel(self, consumer_tag: str) -> None:
        with self._method() as broker:
            broker._cancel(self, consumer_tag)
        await asyncio.sleep(0)

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        with self._method() as broker:
            broker._ack(self, delivery_tag, multiple)
        await asyncio.sleep(0)

    async def reject(self, delivery_tag: int, *, requeue: bool) -> None:
        with self._method() as broker:
            broker._reject(self, delivery_tag, requeue)
        await asyncio.sleep(0)

    async def get(self, queue: str) -> Delivery | None:
        with self._method() as broker:
            delivery = broker._get(self, queue)
        await asyncio.sleep(0)
        return delivery

    async def close(self) -> None:
        if self._closed is None:
            self._broker._close_channel(self, ChannelClosed(200, "channel closed by the client"))
        await asyncio.sleep(0)
