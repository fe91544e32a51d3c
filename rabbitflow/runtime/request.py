"""Requests: publish with `reply_to` set to the session's own reply queue, and match each reply
to its request by correlation id.

The reply queue is exclusive and server-named, declared on the consuming connection and consumed
on a channel of its own; requests are published on the app's ordinary confirm publisher. So a
request the broker refuses (a missing exchange, a body too large, any channel error) fails on the
publisher, which knows which publish it belongs to: that caller alone sees the error, and no other
request loses its reply or is sent again. (Direct reply-to would force every request onto the
channel that consumes the replies, where one bad publish closes it and fails them all.)

A reply lives only as long as the consuming connection (the queue is exclusive): when the session
ends, the requests still waiting are sent again on the next one, until the caller's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from typing import Any

from rabbitflow import names
from rabbitflow.errors import ChannelClosed, ConnectionLost, RequestFailed, StateError
from rabbitflow.message import Message
from rabbitflow.middleware.base import PublishChain
from rabbitflow.runtime.publisher import Publisher
from rabbitflow.transport.base import Channel, Delivery, Properties, Transport

__all__ = ["Requests", "ask", "reply_message"]

log = logging.getLogger("rabbitflow.runtime.request")

_REPLY_PREFETCH = 1000


class Requests:
    """The requests of one session: its reply queue, and the requests waiting for a reply."""

    def __init__(self, transport: Transport, publisher: Publisher) -> None:
        self.transport = transport  # the consuming connection: it holds the reply queue
        self._publisher = publisher
        self._channel: Channel | None = None
        self._queue: str | None = None
        self._opening = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[Delivery]] = {}
        self._prefix = f"rq-{uuid.uuid4().hex[:12]}-"
        self._ids = itertools.count(1)
        self._closed_for_good = False

    async def send(
        self, body: bytes, exchange: str, routing_key: str, properties: Properties
    ) -> asyncio.Future[Delivery]:
        """Publish the request (confirmed, mandatory: `Unroutable` when nobody serves it); returns
        the future of its reply; the caller bounds the wait."""
        queue = await self._open()
        correlation_id = f"{self._prefix}{next(self._ids):x}"
        properties.correlation_id = correlation_id
        properties.reply_to = queue
        future: asyncio.Future[Delivery] = asyncio.get_running_loop().create_future()
        self._waiting[correlation_id] = future
        # Answered, given up (the caller's timeout cancels it) or failed: no longer waited for.
        future.add_done_callback(lambda _: self._waiting.pop(correlation_id, None))
        try:
            await self._publisher.publish(body, exchange, routing_key, properties)
        except BaseException:
            self._waiting.pop(correlation_id, None)
            future.cancel()  # nobody will await it: it must not hold an exception unretrieved
            raise
        return future

    async def _open(self) -> str:
        channel = self._channel
        if channel is not None and channel.is_open and self._queue is not None:
            return self._queue
        async with self._opening:
            if self._channel is None or not self._channel.is_open or self._queue is None:
                channel = await self.transport.channel()
                # The same queue again after a channel (not the connection) went: its replies wait there.
                info = await channel.declare_queue(self._queue or "", durable=False, exclusive=True)
                await channel.consume(info.name, self._reply, prefetch=_REPLY_PREFETCH)
                channel.on_close(self._closed)
                self._channel, self._queue = channel, info.name
            assert self._queue is not None
            return self._queue

    async def _reply(self, delivery: Delivery) -> None:
        future = self._waiting.pop(delivery.properties.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(delivery)
        # else: a late reply to a request that gave up, or a stranger's: nobody waits for it
        channel = self._channel
        if channel is not None and channel.is_open:
            # The channel may go meanwhile; the reply was taken all the same.
            with contextlib.suppress(ChannelClosed, ConnectionLost):
                await channel.ack(delivery.delivery_tag)

    def _closed(self, reason: BaseException | None) -> None:
        """The reply channel went. With the connection up, the queue (exclusive to the connection)
        is still there: the next request consumes it again; only a lost connection takes the
        replies still to come with it."""
        self._channel = None
        if self.transport.is_open and not self._closed_for_good:
            log.info("the reply channel closed (%s); consuming the reply queue again", reason)
            task = asyncio.ensure_future(self._reopen())
            task.add_done_callback(_quiet)
            return
        self._fail(ConnectionLost(f"the connection of the reply queue closed ({reason})"))

    async def _reopen(self) -> None:
        try:
            await self._open()
        except Exception as exc:
            self._queue = None
            self._fail(ConnectionLost(f"cannot consume the reply queue again ({exc})"))

    def _fail(self, error: BaseException) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a caller that gave up leaves no warning behind

    def abandon(self) -> None:
        """The session is gone: the requests waiting are sent again on the next one."""
        self._closed_for_good = True
        self._channel = None
        self._fail(ConnectionLost("the session ended"))

    async def close(self) -> None:
        """The app stops: a request still waiting fails now, rather than wait for a next session
        that will never come until its timeout."""
        self._closed_for_good = True
        channel, self._channel = self._channel, None
        self._fail(StateError("the app stopped while this request waited for its reply"))
        if channel is not None:
            await channel.close()


def _quiet(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


def reply_message(reply: Delivery) -> Message:
    """The reply to a request, as the caller sees it; `RequestFailed` for an error reply."""
    p = reply.properties
    headers = p.headers or {}
    reason = headers.get(names.ERROR_REPLY)
    if reason is not None:
        raise RequestFailed(
            str(reason), str(headers.get(names.ERROR, "")), exception=str(headers.get(names.EXCEPTION, ""))
        )
    return Message(
        body=reply.body,
        headers=headers,
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
    try:
        return await future
    finally:
        if not future.done():
            future.cancel()
