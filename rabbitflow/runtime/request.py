"""Requests over RabbitMQ's direct reply-to: publish with `reply_to=amq.rabbitmq.reply-to` on a
channel that consumes its replies, and match each reply to its request by correlation id.

One channel per session carries every request of the app, concurrently: nothing is serialised
behind a lock but the channel's opening. A reply lives only as long as that channel (RabbitMQ
keeps no queue for it): when the session ends, the requests still waiting are sent again on the
next one, until the caller's deadline.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid

from rabbitflow.errors import ConnectionLost, StateError
from rabbitflow.message import Message
from rabbitflow.middleware.base import PublishChain
from rabbitflow.runtime.publisher import Publisher
from rabbitflow.transport.base import DIRECT_REPLY_TO, Channel, Delivery, Properties, Transport

__all__ = ["Requests", "ask", "reply_message"]


class Requests:
    """The requests of one session, on one channel of its publishing connection."""

    def __init__(self, transport: Transport, publisher: Publisher) -> None:
        self.transport = transport
        self._publisher = publisher  # its probe keeps a missing exchange off the shared channel
        self._channel: Channel | None = None
        self._opening = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[Delivery]] = {}
        self._prefix = f"rq-{uuid.uuid4().hex[:12]}-"
        self._ids = itertools.count(1)

    async def send(
        self, body: bytes, exchange: str, routing_key: str, properties: Properties
    ) -> asyncio.Future[Delivery]:
        """Publish the request (confirmed, mandatory: `Unroutable` when nobody serves it); returns
        the future of its reply; the caller bounds the wait."""
        # A publish to a missing exchange would close the channel, and every other request's reply
        # with it: the publisher's probe finds that out on a channel of its own.
        await self._publisher.check_exchange(exchange)
        channel = await self._open()
        correlation_id = f"{self._prefix}{next(self._ids):x}"
        properties.correlation_id = correlation_id
        properties.reply_to = DIRECT_REPLY_TO
        future: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        # Answered, given up (the caller's timeout cancels it) or failed: no longer waited for.
        future.add_done_callback(lambda _: self._waiting.pop(correlation_id, None))
        try:
            await channel.publish(body, exchange=exchange, routing_key=routing_key, properties=properties)
        except BaseException:
            self._waiting.pop(correlation_id, None)
            raise
        return future

    async def _open(self) -> Channel:
        channel = self._channel
        if channel is not None and channel.is_open:
            return channel
        async with self._opening:
            if self._channel is None or not self._channel.is_open:
                channel = await self.transport.channel()
                channel.on_close(self._closed)
                await channel.consume_replies(self._reply)
                self._channel = channel
            return self._channel

    def _reply(self, delivery: Delivery) -> None:
        future = self._waiting.pop(delivery.properties.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(delivery)
        # else: a late reply to a request that gave up, or a stranger's: nobody waits for it

    def _closed(self, reason: BaseException | None) -> None:
        """The channel went, and with it every reply still to come."""
        self._channel = None
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(ConnectionLost(f"the requests' channel closed ({reason})"))

    def abandon(self) -> None:
        """The session is gone: the requests waiting are sent again on the next one."""
        self._channel = None
        self._closed(ConnectionLost("the session ended"))

    async def close(self) -> None:
        """The app stops: a request still waiting fails now, rather than wait for a next session
        that will never come until its timeout."""
        channel, self._channel = self._channel, None
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(StateError("the app stopped while this request waited for its reply"))
        if channel is not None:
            await channel.close()
        self._closed(None)


def reply_message(reply: Delivery) -> Message:
    """The reply to a request, as the caller sees it."""
    p = reply.properties
    return Message(
        body=reply.body,
        headers=p.headers or {},
        attempt=1,
        message_id=p.message_id,
        routing_key=reply.routing_key,
        exchange=reply.exchange,
        redelivered=reply.redelivered,
        content_type=p.content_type,
        correlation_id=p.correlation_id,
    )


async def ask(
    requests: Requests,
    body: bytes,
    exchange: str,
    routing_key: str,
    properties: Properties,
    chain: PublishChain | None,
) -> Delivery:
    """Send one request on a session's `requests` and wait for its reply (unbounded: the caller's
    deadline bounds it); `chain`, the publish middleware, runs around the send."""
    future: asyncio.Future[Delivery] | None = None

    async def send() -> None:
        nonlocal future
        future = await requests.send(body, exchange, routing_key, properties)

    if chain is not None:
        await chain(body, exchange, routing_key, properties, send)
    else:
        await send()
    assert future is not None
    return await future
