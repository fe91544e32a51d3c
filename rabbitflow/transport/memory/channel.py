"""Channels of the in-memory broker: the AMQP methods of the Channel interface."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rabbitflow.errors import PublishNacked, Unroutable
from rabbitflow.transport.base import (
    DIRECT_REPLY_TO,
    Arguments,
    Channel,
    ChannelClosed,
    ConnectionLost,
    Delivery,
    OnCancel,
    OnDelivery,
    Properties,
    QueueInfo,
    TransportError,
)
from rabbitflow.transport.memory.amqp import (
    EXCHANGE_ARGS,
    access_refused,
    assert_args_equivalence,
    assert_field_equivalence,
    compared_queue_args,
    not_found,
    parse_expiration,
    precondition_failed,
    queue_type_module,
    resource_locked,
    rs,
    validate_queue_arguments,
    wire_properties,
    wire_table,
)
from rabbitflow.transport.memory.queue import Consumer, MemoryQueue, Unacked
from rabbitflow.transport.memory.routing import EXCHANGE_TYPES, Binding, MemoryExchange, invalid_x_match
from rabbitflow.transport.memory.vhost import Published, VHost

if TYPE_CHECKING:
    from rabbitflow.transport.memory.connection import MemoryTransport

__all__ = ["MemoryChannel"]


class MemoryChannel(Channel):
    """A channel in confirm mode: a publish returns once the broker has taken the message."""

    ack_linger = 0.0  # the broker runs on this event loop: acks go out on the next turn
    deletion_lag = 0.0  # a queue is deleted at once

    def __init__(self, transport: MemoryTransport, number: int) -> None:
        self.number = number
        self._transport = transport
        self._vhost = transport._vhost
        self._closed: TransportError | None = None
        self._last_tag = 0
        self._unacked: dict[int, Unacked] = {}
        self._consumers: dict[str, Consumer] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # delivery callbacks running for this channel
        self._reclaimed: set[int] = set()  # tags a consumer timeout took back (4.3)
        self.global_prefetch = 0  # basic.qos(global=True): unacked deliveries per channel, 0 = no limit
        self._on_close: list[Callable[[BaseException | None], None]] = []
        self._reply_address: str | None = None  # amq.rabbitmq.reply-to.<token> once consuming it

    def __repr__(self) -> str:
        state = "open" if self._closed is None else f"closed ({self._closed})"
        return f"<MemoryChannel {self.number} {state} unacked={len(self._unacked)}>"

    @property
    def is_open(self) -> bool:
        return self._closed is None

    # -- AMQP methods --------------------------------------------------------------------------

    async def declare_exchange(
        self,
        name: str,
        type: str = "direct",
        *,
        durable: bool = True,
        arguments: Arguments | None = None,
        passive: bool = False,
    ) -> None:
        with self._method() as vhost:
            if passive:
                if name not in vhost.exchanges:
                    raise not_found("exchange", name)
            elif type not in EXCHANGE_TYPES:
                if not vhost.profile.unknown_exchange_type_closes_connection:
                    raise precondition_failed(f"unknown exchange type '{type}'")
                # A connection-level error: 3.10 closes the whole connection.
                lost = ConnectionLost(
                    f"the broker closed the connection: 503 COMMAND_INVALID - unknown exchange type '{type}'"
                )
                self._transport._shutdown(lost)
                raise lost
            elif name == "":
                raise access_refused("operation not permitted on the default exchange")
            elif (existing := vhost.exchanges.get(name)) is not None:
                assert_field_equivalence("exchange", name, "type", existing.type, type)
                assert_field_equivalence("exchange", name, "durable", existing.durable, durable)
                args = wire_table(arguments)
                assert_args_equivalence("exchange", name, existing.arguments, args, EXCHANGE_ARGS)
            elif name.startswith("amq."):
                raise access_refused(f"exchange name '{name}' contains reserved prefix 'amq.*'")
            else:
                vhost.exchanges[name] = MemoryExchange(name, type, durable, wire_table(arguments))
        await asyncio.sleep(0)

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        exclusive: bool = False,
        arguments: Arguments | None = None,
        passive: bool = False,
    ) -> QueueInfo:
        with self._method() as vhost:
            q = (
                vhost.queue(name, self._transport)
                if passive
                else self._declare(name, durable, exclusive, arguments)
            )
            info = q.info()
        await asyncio.sleep(0)
        return info

    def _declare(self, name: str, durable: bool, exclusive: bool, arguments: Arguments | None) -> MemoryQueue:
        vhost = self._vhost
        args = wire_table(arguments)
        durable = durable and not exclusive  # RabbitMQ never keeps an exclusive queue durable
        if name == "":
            if args.get("x-queue-type") == "quorum":
                raise precondition_failed(
                    f"Cannot declare a server-named queue for type {queue_type_module('quorum')}"
                )
            name = vhost.new_name("amq.gen-")
        elif name.startswith("amq."):
            raise access_refused(f"queue name '{name}' contains reserved prefix 'amq.*'")
        profile = vhost.profile
        owner = self._transport if exclusive else None
        existing = vhost.queues.get(name)
        if existing is not None:
            if existing.owner is not owner:
                raise resource_locked(name)
            assert_field_equivalence("queue", name, "durable", existing.durable, durable)
            keys = compared_queue_args(existing.queue_type)
            assert_args_equivalence("queue", name, existing.arguments, args, keys)
            return existing
        if profile.refuses_transient_nonexclusive and not durable and not exclusive:
            # 4.3 denies the deprecated feature by default, with a connection error
            # (https://github.com/rabbitmq/rabbitmq-server/releases/tag/v4.3.0); a redeclaration
            # of an existing queue is compared first (our assumption: not documented)
            self._deprecated("transient_nonexcl_queues")
        validate_queue_arguments(name, args)
        kind = args.get("x-queue-type", "classic")
        if profile.refuses_queue_mode and kind == "classic" and "x-queue-mode" in args:
            # 4.3 removed CQv1 and with it x-queue-mode (https://github.com/rabbitmq/rabbitmq-server/pull/14769)
            raise precondition_failed(
                f"invalid arg 'x-queue-mode' for {rs('queue', name)} of queue type {queue_type_module(kind)}"
            )
        if kind == "stream":
            raise NotImplementedError("the memory broker has no stream queues")
        if kind == "quorum" and not durable:
            prop = "exclusive-owner" if exclusive else "non-durable"
            raise precondition_failed(f"invalid property '{prop}' for {rs('queue', name)}")
        q = vhost.queues[name] = MemoryQueue(
            name, durable=durable, owner=owner, arguments=args, profile=profile
        )
        return q

    def _deprecated(self, feature: str) -> None:
        """A deprecated feature 4.3 denies: 541 closes the whole connection."""
        lost = ConnectionLost(
            f"the broker closed the connection: 541 INTERNAL_ERROR - Feature `{feature}` is deprecated. "
            "By default, this feature is not permitted anymore."
        )
        self._transport._shutdown(lost)
        raise lost

    async def bind_queue(
        self,
        queue: str,
        exchange: str,
        routing_key: str,
        arguments: Arguments | None = None,
    ) -> None:
        with self._method() as vhost:
            if exchange == "":
                raise access_refused("operation not permitted on the default exchange")
            args = wire_table(arguments)
            x = vhost.exchanges.get(exchange)
            if x is None:
                raise not_found("exchange", exchange)
            q = vhost.queue(queue, self._transport)
            if x.type == "headers" and (error := invalid_x_match(args)) is not None:
                raise precondition_failed(error)
            x.bind(Binding(q.name, routing_key, args))
        await asyncio.sleep(0)

    async def delete_queue(self, name: str) -> None:
        with self._method() as vhost:
            if name in vhost.queues:  # deleting a missing queue is no error
                vhost.remove_queue(vhost.queue(name, self._transport))
        await asyncio.sleep(0)

    async def delete_exchange(self, name: str) -> None:
        with self._method() as vhost:
            if name == "":
                raise access_refused("operation not permitted on the default exchange")
            if name.startswith("amq."):
                raise access_refused(f"deletion of system {rs('exchange', name)} not allowed")
            vhost.exchanges.pop(name, None)
        await asyncio.sleep(0)

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        properties: Properties,
        mandatory: bool = True,
    ) -> None:
        """Publish and return once confirmed; `Unroutable` if a mandatory publish has no queue."""
        with self._method() as vhost:
            x = vhost.exchanges.get(exchange)
            if x is None:
                raise not_found("exchange", exchange)
            limit = vhost.profile.max_message_size
            if len(body) > limit:
                # 128 MiB up to 3.13, 16 MiB from 4.0 (https://github.com/rabbitmq/rabbitmq-server/pull/11455)
                raise precondition_failed(
                    f"message size {len(body)} is larger than configured max size {limit}"
                )
            props = wire_properties(properties)  # a copy, never the publisher's headers dict
            if props.reply_to == DIRECT_REPLY_TO:
                if self._reply_address is None:
                    raise precondition_failed("fast reply consumer does not exist")
                props.reply_to = self._reply_address  # what the broker tells the replier
            ttl = None if props.expiration is None else parse_expiration(props.expiration)
            now = vhost.clock()
            vhost.published.append(Published(exchange, routing_key, wire_properties(props), body, now))
            if exchange == "" and routing_key.startswith(DIRECT_REPLY_TO + "."):
                if not vhost.reply(routing_key, body, props) and mandatory:
                    raise Unroutable(exchange, routing_key)
                await asyncio.sleep(0)
                return
            targets = vhost.route(x, routing_key, props)
            if not targets and mandatory:
                raise Unroutable(exchange, routing_key)
            refused = [
                q.name for q in targets if not vhost.enqueue(q, body, props, exchange, routing_key, ttl, self)
            ]
            if refused:
                raise PublishNacked(
                    f"the broker refused the message: queue {', '.join(map(repr, refused))} is full "
                    "(x-max-length with x-overflow=reject-publish); consume from it or raise the limit"
                )
        await asyncio.sleep(0)

    async def consume(
        self, queue: str, on_delivery: OnDelivery, *, prefetch: int, on_cancel: OnCancel | None = None
    ) -> str:
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch!r}: expected a count >= 0 (0 = unlimited)")
        with self._method() as vhost:
            q = vhost.queue(queue, self._transport)
            tag = vhost.new_name("amq.ctag-")
            # basic.qos(prefetch) before basic.consume: the limit applies per consumer.
            consumer = Consumer(
                tag, self, q, on_delivery, prefetch, on_cancel=on_cancel, timeout=vhost.timeout_for(q)
            )
            q.consumers.append(consumer)
            self._consumers[tag] = consumer
            vhost.touch(q)
        await asyncio.sleep(0)
        return tag

    async def consume_replies(self, on_reply: Callable[[Delivery], None]) -> None:
        with self._method() as vhost:
            self._reply_address = self._reply_address or vhost.listen_for_replies(on_reply)
        await asyncio.sleep(0)

    async def cancel(self, consumer_tag: str) -> None:
        # Deliveries already made stay unacked on the channel, as after a real basic.cancel.
        with self._method():
            self._forget_consumer(consumer_tag)
        await asyncio.sleep(0)

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        with self._method() as vhost:
            # rabbit_channel: multiple with tag 0 acks everything; otherwise the tag must be known.
            if multiple and delivery_tag == 0:
                tags = list(self._unacked)
            elif delivery_tag in self._reclaimed:
                return  # a consumer timeout took it back (4.3): a late ack is ignored
            elif delivery_tag not in self._unacked:
                self._unknown_tag(delivery_tag)
                return
            elif multiple:
                tags = [tag for tag in self._unacked if tag <= delivery_tag]
            else:
                tags = [delivery_tag]
            for tag in tags:
                vhost.settle(self._unacked.pop(tag))
            vhost.progress += len(tags)
        await asyncio.sleep(0)

    async def reject(self, delivery_tag: int, *, requeue: bool) -> None:
        """basic.reject (what rabbitflow sends)."""
        with self._method():
            self._settle_negatively([delivery_tag], requeue=requeue, how="reject")
        await asyncio.sleep(0)

    async def nack(self, delivery_tag: int, *, multiple: bool = False, requeue: bool = True) -> None:
        """basic.nack; not part of the Transport interface. On 4.3 a quorum queue does not count
        a nack towards its delivery limit, a reject it does."""
        with self._method():
            if multiple:
                tags = [t for t in self._unacked if delivery_tag == 0 or t <= delivery_tag]
            else:
                tags = [delivery_tag]
            self._settle_negatively(tags, requeue=requeue, how="nack")
        await asyncio.sleep(0)

    def _settle_negatively(self, tags: list[int], *, requeue: bool, how: str) -> None:
        vhost = self._vhost
        for delivery_tag in tags:
            if delivery_tag in self._reclaimed:
                continue
            entry = self._unacked.pop(delivery_tag, None)
            if entry is None:
                self._unknown_tag(delivery_tag)
                return
            vhost.settle(entry)
            if requeue:
                vhost.give_back(entry, how=how)
            else:
                vhost.discard(entry)

    async def qos(self, prefetch_count: int, *, global_: bool = False) -> None:
        """basic.qos; not part of the Transport interface (`consume` takes a per-consumer
        prefetch). `global_=True` limits the whole channel; 4.3 refuses it."""
        with self._method() as vhost:
            if global_:
                if vhost.profile.refuses_global_qos:
                    # denied in 4.3: https://github.com/rabbitmq/rabbitmq-dotnet-client/issues/1931
                    self._deprecated("global_qos")
                self.global_prefetch = prefetch_count
        await asyncio.sleep(0)

    async def get(self, queue: str) -> Delivery | None:
        with self._method() as vhost:
            q = vhost.queue(queue, self._transport)
            entry = vhost.take(q)
            delivery = None
            if entry is not None:
                m = entry.message
                tag = self._track(entry)
                properties = q.delivery_properties(m, basic_get=True)
                delivery = Delivery(m.body, properties, tag, q.redelivered(m), m.exchange, m.routing_key)
        await asyncio.sleep(0)
        return delivery

    async def close(self) -> None:
        self._shutdown(ChannelClosed(200, "channel closed by the client"))
        await asyncio.sleep(0)

    def on_close(self, callback: Callable[[BaseException | None], None]) -> None:
        if self._closed is not None:
            asyncio.get_running_loop().call_soon(callback, self._closed)
        elif callback not in self._on_close:
            self._on_close.append(callback)

    # -- bookkeeping ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _method(self) -> Iterator[VHost]:
        """Run one AMQP method; a channel error closes the channel, as RabbitMQ does."""
        reason = self._closed
        if isinstance(reason, ChannelClosed):
            raise ChannelClosed(reason.code, reason.text)
        if reason is not None:
            raise ConnectionLost(str(reason))
        vhost = self._vhost
        vhost.activity += 1
        try:
            yield vhost
        except ChannelClosed as exc:
            self._shutdown(exc)
            raise
        finally:
            vhost.pump()

    def _unknown_tag(self, delivery_tag: int) -> None:
        # basic.ack/reject get no reply: the caller returns, and the broker closes the channel
        # (406) shortly after; the next method on it fails.
        self._shutdown(precondition_failed(f"unknown delivery tag {delivery_tag}"))

    def _track(self, entry: Unacked) -> int:
        # Delivery tags count from 1 on each channel.
        self._last_tag += 1
        self._unacked[self._last_tag] = entry
        return self._last_tag

    def _reclaim(self, consumer: Consumer) -> list[Unacked]:
        """Take back the unacked deliveries of `consumer` (a consumer timeout, 4.3)."""
        tags = [tag for tag, entry in self._unacked.items() if entry.consumer is consumer]
        self._reclaimed.update(tags)
        return [self._unacked.pop(tag) for tag in tags]

    def _has_room(self) -> bool:
        return self.global_prefetch == 0 or len(self._unacked) < self.global_prefetch

    def _forget_consumer(self, tag: str) -> None:
        consumer = self._consumers.pop(tag, None)
        if consumer is not None and consumer in consumer.queue.consumers:
            consumer.queue.consumers.remove(consumer)

    def _shutdown(self, reason: TransportError) -> None:
        """Close: cancel consumers, return unacked messages (redelivered), stop callbacks."""
        if self._closed is not None:
            return
        self._closed = reason
        self._vhost.repliers.pop(self._reply_address or "", None)
        for tag in list(self._consumers):
            self._forget_consumer(tag)
        entries = list(self._unacked.values())
        self._unacked.clear()
        vhost = self._vhost
        for entry in entries:
            vhost.settle(entry)
            vhost.give_back(entry, how="lost")
        # aiormq cancels a channel's running consumer callbacks when the channel closes.
        try:
            current = asyncio.current_task()
        except RuntimeError:
            current = None
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        loop = asyncio.get_running_loop()
        for callback in self._on_close:
            loop.call_soon(callback, reason)
        self._on_close.clear()
        vhost.pump()
