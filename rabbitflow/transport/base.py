"""The transport interface: the few broker operations rabbitflow needs.

A `Broker` opens connections (`Transport`) to a node; the App is handed one (httpx's
`transport=` seam). Two implementations: `amqp.AmqpBroker` (aiormq, a real RabbitMQ) and
`rabbitflow.testing.MemoryBroker` (the in-memory broker). Message properties are pamqp's
`Basic.Properties` in both, so nothing is converted on the hot path.
"""

from __future__ import annotations

import abc
import asyncio
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pamqp.commands import Basic

from rabbitflow.errors import ChannelClosed, ConnectionLost, TransportError

if TYPE_CHECKING:
    from rabbitflow.urls import Endpoint

__all__ = [
    "Broker",
    "Channel",
    "ChannelClosed",
    "ConnectionLost",
    "Delivery",
    "OnDelivery",
    "Properties",
    "QueueInfo",
    "Transport",
    "TransportError",
    "clone_properties",
    "persistent_copy",
]

Properties = Basic.Properties
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"  # RabbitMQ's pseudo-queue for replies without a queue
Arguments = Mapping[str, Any]


def clone_properties(
    p: Properties, *, headers: dict[str, Any] | None, expiration: str | None, delivery_mode: int | None
) -> Properties:
    """A new Properties with these fields and every other field of `p`."""
    return Properties(
        content_type=p.content_type,
        content_encoding=p.content_encoding,
        headers=headers,
        delivery_mode=delivery_mode,
        priority=p.priority,
        correlation_id=p.correlation_id,
        reply_to=p.reply_to,
        expiration=expiration,
        message_id=p.message_id,
        timestamp=p.timestamp,
        message_type=p.message_type,
        user_id=p.user_id,
        app_id=p.app_id,
    )


def persistent_copy(properties: Properties, headers: dict[str, Any] | None) -> Properties:
    """`properties` with other headers, persistent and without a per-message expiration: for the
    copies rabbitflow republishes (a retry copy waits its retry queue's TTL; a parked one stays)."""
    return clone_properties(properties, headers=headers, expiration=None, delivery_mode=2)


@dataclass(slots=True)
class Delivery:
    """One message as the broker delivered it."""

    body: bytes
    properties: Properties
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    # The content-header frame's payload as received, for copies that carry each header exactly
    # (`copies.exact_headers`); None from a broker that does not keep it (the in-memory one).
    raw_header: bytes | None = None
    # What of the properties could not be decoded (the rest is in `properties`); such a delivery
    # is parked by rejection, so that its parking queue gets every byte of it.
    undecodable: str | None = None


@dataclass(frozen=True, slots=True)
class QueueInfo:
    name: str
    message_count: int
    consumer_count: int


OnDelivery = Callable[[Delivery], Awaitable[None]]
OnCancel = Callable[[], None]


class Channel(abc.ABC):
    """An AMQP channel in confirm mode."""

    # How long settled deliveries may wait to share one multiple-ack; a broker on the same
    # event loop (the in-memory one) wants them at once.
    ack_linger: float = 0.005
    # Seconds a queue the broker cancelled our consumer for may still answer declare-ok while it
    # is being deleted (RabbitMQ 4.0); 0 where deletion is atomic (the in-memory broker).
    deletion_lag: float = 0.2

    @property
    @abc.abstractmethod
    def is_open(self) -> bool: ...

    @abc.abstractmethod
    async def declare_exchange(
        self,
        name: str,
        type: str = "direct",
        *,
        durable: bool = True,
        arguments: Arguments | None = None,
        passive: bool = False,
    ) -> None: ...

    @abc.abstractmethod
    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        exclusive: bool = False,
        arguments: Arguments | None = None,
        passive: bool = False,
    ) -> QueueInfo: ...

    @abc.abstractmethod
    async def bind_queue(
        self,
        queue: str,
        exchange: str,
        routing_key: str,
        arguments: Arguments | None = None,
    ) -> None: ...

    @abc.abstractmethod
    async def delete_queue(self, name: str) -> None: ...

    @abc.abstractmethod
    async def delete_exchange(self, name: str) -> None: ...

    @abc.abstractmethod
    async def publish(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        properties: Properties,
        mandatory: bool = True,
    ) -> None:
        """Publish and wait for the broker's confirm; `Unroutable` if a mandatory publish returns."""

    def publish_nowait(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        properties: Properties,
        mandatory: bool = True,
    ) -> asyncio.Future[None]:
        """`publish` without waiting: the future resolves at the broker's confirm, or fails as
        `publish` would."""
        return asyncio.ensure_future(
            self.publish(
                body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=mandatory
            )
        )

    @abc.abstractmethod
    async def consume(
        self, queue: str, on_delivery: OnDelivery, *, prefetch: int, on_cancel: OnCancel | None = None
    ) -> str:
        """Start consuming with manual acks and this prefetch; returns the consumer tag.
        `on_cancel()` runs when the broker cancels the consumer (queue deleted, say)."""

    async def consume_replies(self, on_reply: Callable[[Delivery], None]) -> None:
        """Consume this channel's direct replies (`amq.rabbitmq.reply-to`, no acks): a message
        published on this channel with `reply_to=DIRECT_REPLY_TO` has its answer passed to
        `on_reply`."""
        raise NotImplementedError(f"{type(self).__name__} has no direct reply-to")

    @abc.abstractmethod
    async def cancel(self, consumer_tag: str) -> None: ...

    @abc.abstractmethod
    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None: ...

    async def ack_each(self, delivery_tags: Sequence[int]) -> None:
        """Ack each of these tags on its own (not `multiple`)."""
        for tag in delivery_tags:
            await self.ack(tag)

    @abc.abstractmethod
    async def reject(self, delivery_tag: int, *, requeue: bool) -> None: ...

    @abc.abstractmethod
    async def get(self, queue: str) -> Delivery | None:
        """basic.get with manual ack; None when the queue is empty."""

    async def commit(self) -> None:
        """Commit the transaction of a `Transport.transaction_channel`: its publishes and acks
        since the last commit take effect together."""
        raise NotImplementedError(f"{type(self).__name__} has no transactions")

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def on_close(self, callback: Callable[[BaseException | None], None]) -> None:
        """`callback(reason)` once the channel is closed, by either side; registering the same
        callback again does nothing."""


class Transport(abc.ABC):
    """One connection to one broker node."""

    node: str  # the node's URL with the password masked
    # Channels a topology is declared over at once (`topology.applier`): each of a channel's
    # methods waits for the one before, a round trip each; 1 where a call takes no round trip.
    declare_width: int = 8

    @property
    @abc.abstractmethod
    def is_open(self) -> bool: ...

    @property
    @abc.abstractmethod
    def blocked(self) -> bool:
        """True while the broker blocks publishing on this connection (resource alarm)."""

    @abc.abstractmethod
    async def wait_unblocked(self) -> None: ...

    @abc.abstractmethod
    async def channel(self) -> Channel: ...

    @abc.abstractmethod
    async def wait_closed(self) -> BaseException | None:
        """Wait until the connection is gone; returns why (None for a clean close)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @property
    def server_version(self) -> str:
        """The broker's version as its server properties say ("3.10.8"), or "" when unknown."""
        return ""

    async def transaction_channel(self) -> Channel | None:
        """A channel in transaction mode (AMQP tx, no publisher confirms): its publishes and acks
        take effect together at `commit`, and none of them if it closes (or the connection goes)
        before. None when this transport has no transactions."""
        return None

    async def native_channel(self) -> Any:
        """A channel of the underlying client library (aio-pika), for `App.ensure`."""
        raise NotImplementedError(f"{type(self).__name__} has no native channel")


class Broker(Protocol):
    """Where connections come from: a real RabbitMQ (`AmqpBroker`) or the in-memory one."""

    async def connect(
        self,
        endpoint: Endpoint,
        *,
        timeout: float,
        heartbeat: int,
        name: str,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Transport:
        """Open a connection to `endpoint` within `timeout` seconds."""
        ...
