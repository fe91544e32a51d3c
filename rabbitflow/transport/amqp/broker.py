"""The transport on a real broker: aio-pika for the connection, aiormq channels for the work."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import aio_pika
import aiormq
import aiormq.exceptions as amqp_errors
from aiormq.abc import DeliveredMessage
from pamqp.base import Frame
from pamqp.commands import Basic

from rabbitflow.errors import LoginRefused, PublishNacked, UnencodableMessage, Unroutable
from rabbitflow.transport.amqp import internals
from rabbitflow.transport.amqp.decode import Header, Receiver, Route, receiving
from rabbitflow.transport.amqp.encode import ack_frame
from rabbitflow.transport.amqp.pipeline import Pipeline, supported
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
    Transport,
)
from rabbitflow.urls import Endpoint

__all__ = ["AmqpBroker", "AmqpChannel", "AmqpTransport", "connect"]

log = logging.getLogger("rabbitflow.transport.amqp")

_CODES: Mapping[type[BaseException], int] = {
    amqp_errors.ChannelAccessRefused: 403,
    amqp_errors.ChannelNotFoundEntity: 404,
    amqp_errors.ChannelLockedResource: 405,
    amqp_errors.ChannelPreconditionFailed: 406,
}


def _translate(exc: BaseException) -> BaseException:
    """aiormq's exception as one of the transport's; the caller raises it `from exc`."""
    if isinstance(exc, amqp_errors.PublishError):
        delivery = exc.message.delivery if exc.message is not None else None
        return Unroutable(
            getattr(delivery, "exchange", "") or "",
            getattr(delivery, "routing_key", "") or "",
            getattr(delivery, "reply_text", "") or "NO_ROUTE",
        )
    if isinstance(exc, amqp_errors.DeliveryError):
        return PublishNacked(f"the broker refused the publish: {exc}")
    if isinstance(exc, amqp_errors.ChannelClosed):
        code = _CODES.get(type(exc))
        if code is not None:
            return ChannelClosed(code, str(exc.args[0]) if exc.args else "")
        if len(exc.args) >= 2 and isinstance(exc.args[0], int):
            return ChannelClosed(exc.args[0], str(exc.args[1]))
        return ChannelClosed(0, str(exc))
    if isinstance(
        exc,
        amqp_errors.AMQPConnectionError
        | amqp_errors.ChannelInvalidStateError
        | ConnectionError
        | asyncio.CancelledError,
    ):
        return ConnectionLost(f"connection lost: {type(exc).__name__}")
    return exc


class _Translated:
    """Async context: aiormq errors leave as the transport's own."""

    __slots__ = ()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if exc is None or isinstance(exc, asyncio.CancelledError):
            return False
        translated = _translate(exc)
        if translated is exc:
            return False
        raise translated from exc


_translated = _Translated()


def _delivery(message: DeliveredMessage) -> Delivery:
    frame = cast(Basic.Deliver | Basic.GetOk, message.delivery)
    header = message.header
    ours = header if type(header) is Header else None  # decoded by rabbitflow's receiver (`inbound`)
    return Delivery(
        message.body,
        header.properties,
        frame.delivery_tag or 0,
        bool(frame.redelivered),
        frame.exchange or "",
        frame.routing_key or "",
        ours.payload if ours is not None else None,
        ours.undecodable if ours is not None else None,
    )


class AmqpChannel(Channel):
    def __init__(self, channel: aiormq.abc.AbstractChannel, receiver: Receiver | None = None) -> None:
        self._channel = cast(aiormq.Channel, channel)
        self._pipeline = Pipeline(self._channel) if supported(self._channel) else None
        self._close_callbacks: list[Callable[[BaseException | None], None]] = []
        self._cancel_callbacks: dict[str, Callable[[Basic.Cancel], None]] = {}
        # This channel's consumers whose deliveries the connection's receiver hands over itself
        # (`decode.Receiver`), by consumer tag; None without rabbitflow's receiver (aiormq's
        # channel reader then calls each consumer in a task of its own).
        self._routes: dict[str, Route] | None = None
        self._receiver = receiver
        # The handlers started for those deliveries (and some that ended since): cancelled when
        # the channel goes, as aiormq cancels the tasks it starts for its consumers.
        self._handling: list[asyncio.Task[None]] = []
        self._prune_at = 1024
        # Set when our channel.close goes out: from then on the broker takes nothing on this
        # channel but close-ok, and an ack it reads after our close is a 504 CHANNEL_ERROR that
        # takes the whole connection down (a handler that ends while its channel closes).
        self._closing = False

    def _route(self, tag: str, route: Route) -> None:
        """Deliveries to consumer `tag` go to `route`, from the receiver."""
        routes = self._routes
        if routes is None:
            assert self._receiver is not None
            routes = self._routes = {}
            receiver, number = self._receiver, self._channel.number
            receiver.route(number, routes)

            def gone(closing: asyncio.Future[Any]) -> None:
                receiver.unroute(number, routes)
                for task in self._handling:
                    task.cancel()  # a no-op on one that ended

            self._channel.closing.add_done_callback(gone)
        routes[tag] = route

    def _unroute(self, tag: str) -> None:
        if self._routes is not None:
            self._routes.pop(tag, None)

    def _starter(self, on_delivery: OnDelivery) -> Route:
        """A route that runs `on_delivery` in a task of its own, as aiormq would (without a done
        callback, the list of tasks is pruned once in a while)."""
        create_task = asyncio.get_running_loop().create_task

        def start(delivery: Delivery) -> None:
            handling = self._handling
            handling.append(create_task(on_delivery(delivery)))  # type: ignore[arg-type]
            if len(handling) > self._prune_at:
                self._handling = [task for task in handling if not task.done()]
                self._prune_at = max(1024, 2 * len(self._handling))

        return start

    @property
    def is_open(self) -> bool:
        return not self._closing and not self._channel.is_closed

    def _closing_error(self) -> ConnectionLost:
        return ConnectionLost(f"channel {self._channel.number} is closing")

    async def declare_exchange(
        self,
        name: str,
        type: str = "direct",
        *,
        durable: bool = True,
        arguments: Arguments | None = None,
        passive: bool = False,
    ) -> None:
        async with _translated:
            await self._channel.exchange_declare(
                name,
                exchange_type=type,
                durable=durable,
                passive=passive,
                arguments=dict(arguments or {}),
            )

    async def declare_queue(
        self,
        name: str,
        *,
        durable: bool = True,
        exclusive: bool = False,
        arguments: Arguments | None = None,
        passive: bool = False,
    ) -> QueueInfo:
        async with _translated:
            ok = await self._channel.queue_declare(
                name,
                durable=durable,
                exclusive=exclusive,
                passive=passive,
                arguments=dict(arguments or {}),
            )
        return QueueInfo(ok.queue or name, ok.message_count or 0, ok.consumer_count or 0)

    async def bind_queue(
        self,
        queue: str,
        exchange: str,
        routing_key: str,
        arguments: Arguments | None = None,
    ) -> None:
        async with _translated:
            await self._channel.queue_bind(
                queue, exchange, routing_key=routing_key, arguments=dict(arguments or {})
            )

    async def delete_queue(self, name: str) -> None:
        async with _translated:
            await self._channel.queue_delete(name)

    async def delete_exchange(self, name: str) -> None:
        async with _translated:
            await self._channel.exchange_delete(name)

    async def publish(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        properties: Properties,
        mandatory: bool = True,
    ) -> None:
        # A nack and a returned mandatory publish arrive as aiormq exceptions on the confirm
        # (DeliveryError, PublishError): translated here into PublishNacked and Unroutable.
        async with _translated:
            if self._pipeline is not None:
                await self._pipeline.publish(body, exchange, routing_key, properties, mandatory)
            else:
                await self._channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=routing_key,
                    properties=properties,
                    mandatory=mandatory,
                )

    def publish_nowait(
        self,
        body: bytes,
        *,
        exchange: str,
        routing_key: str,
        properties: Properties,
        mandatory: bool = True,
    ) -> asyncio.Future[None]:
        pipeline = self._pipeline
        if pipeline is None:
            return super().publish_nowait(
                body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=mandatory
            )
        # The pipeline's loop: asyncio.get_running_loop() makes a getpid() system call on 3.11.
        result: asyncio.Future[None] = pipeline.loop.create_future()
        try:
            confirm = pipeline.publish(body, exchange, routing_key, properties, mandatory)
        except UnencodableMessage as exc:
            result.set_exception(exc)
            return result
        except (amqp_errors.AMQPError, amqp_errors.ChannelInvalidStateError, ConnectionError) as exc:
            result.set_exception(_translate(exc))
            return result

        def settle(confirm: asyncio.Future[object]) -> None:
            if result.done():
                return
            if confirm.cancelled():
                result.set_exception(ConnectionLost("publish cancelled before its confirm"))
            elif (exc := confirm.exception()) is not None:
                result.set_exception(_translate(exc))
            else:
                result.set_result(None)

        confirm.add_done_callback(settle)
        return result

    async def consume(
        self, queue: str, on_delivery: OnDelivery, *, prefetch: int, on_cancel: OnCancel | None = None
    ) -> str:
        async def on_message(message: DeliveredMessage) -> None:
            await on_delivery(_delivery(message))

        tag = None
        if self._receiver is not None:
            # The tag is chosen here, as aiormq would, so that the route is there before the
            # first delivery can be.
            tag = f"ctag{self._channel.number}.{uuid.uuid4().hex}"
            self._route(tag, self._starter(on_delivery))
        try:
            async with _translated:
                await self._channel.basic_qos(prefetch_count=prefetch)
                ok = await self._channel.basic_consume(queue, on_message, consumer_tag=tag)
        except BaseException:
            if tag is not None:
                self._unroute(tag)
            raise
        tag = str(ok.consumer_tag)
        if on_cancel is not None:

            def cancelled(frame: Basic.Cancel) -> None:
                if frame.consumer_tag == tag:
                    on_cancel()

            self._channel.on_consumer_cancel_callbacks.add(cancelled)
            self._cancel_callbacks[tag] = cancelled
        return tag

    async def consume_replies(self, on_reply: Callable[[Delivery], None]) -> None:
        async def on_message(message: DeliveredMessage) -> None:
            on_reply(_delivery(message))

        tag = None
        if self._receiver is not None:
            tag = f"ctag{self._channel.number}.{uuid.uuid4().hex}"

            def reply(delivery: Delivery) -> None:
                try:
                    on_reply(delivery)  # quick: it resolves the caller's future
                except Exception:
                    log.exception("Consumer callback failed")

            self._route(tag, reply)
        try:
            async with _translated:
                await self._channel.basic_consume(DIRECT_REPLY_TO, on_message, no_ack=True, consumer_tag=tag)
        except BaseException:
            if tag is not None:
                self._unroute(tag)
            raise

    async def cancel(self, consumer_tag: str) -> None:
        callback = self._cancel_callbacks.pop(consumer_tag, None)
        if callback is not None:
            self._channel.on_consumer_cancel_callbacks.discard(callback)
        try:
            async with _translated:
                await self._channel.basic_cancel(consumer_tag)
        finally:
            # After cancel-ok: the deliveries the broker sent before it were routed already.
            self._unroute(consumer_tag)

    # Acks and rejects go through the pipeline when there is one, so they leave in the order they
    # were made: a single ack overtaken by a `multiple` one covering it would be a 406.
    def _methods(self, frames: Sequence[Frame]) -> None:
        assert self._pipeline is not None
        try:
            self._pipeline.methods(frames)
        except (amqp_errors.AMQPError, amqp_errors.ChannelInvalidStateError, ConnectionError) as exc:
            raise _translate(exc) from exc

    def _frames(self, payload: bytes) -> None:
        assert self._pipeline is not None
        try:
            self._pipeline.frames(payload)
        except (amqp_errors.AMQPError, amqp_errors.ChannelInvalidStateError, ConnectionError) as exc:
            raise _translate(exc) from exc

    async def ack(self, delivery_tag: int, *, multiple: bool = False) -> None:
        if self._closing:
            raise self._closing_error()
        if self._pipeline is not None:
            self._frames(ack_frame(self._channel.number, delivery_tag, multiple))
            return
        async with _translated:
            await self._channel.basic_ack(delivery_tag, multiple=multiple, wait=False)

    async def ack_each(self, delivery_tags: Sequence[int]) -> None:
        if self._closing:
            raise self._closing_error()
        if self._pipeline is None:
            await super().ack_each(delivery_tags)
            return
        number = self._channel.number
        self._frames(b"".join([ack_frame(number, tag) for tag in delivery_tags]))

    async def reject(self, delivery_tag: int, *, requeue: bool) -> None:
        # basic.reject, not nack: from 4.3 only reject counts towards a quorum delivery limit.
        if self._closing:
            raise self._closing_error()
        if self._pipeline is not None:
            self._methods((Basic.Reject(delivery_tag=delivery_tag, requeue=requeue),))
            return
        async with _translated:
            await self._channel.basic_reject(delivery_tag, requeue=requeue, wait=False)

    async def get(self, queue: str) -> Delivery | None:
        async with _translated:
            message = await self._channel.basic_get(queue, no_ack=False)
        return _delivery(message) if isinstance(message.delivery, Basic.GetOk) else None

    async def commit(self) -> None:
        async with _translated:
            await self._channel.tx_commit()

    async def close(self) -> None:
        if not self._channel.is_closed:
            if self._pipeline is not None:
                self._pipeline.close()  # what this turn made (acks) goes out before the close
            self._closing = True
            with contextlib.suppress(TimeoutError, amqp_errors.AMQPError, ConnectionError):
                # Bounded: a blocked connection (a resource alarm) may never answer close-ok.
                await asyncio.wait_for(self._channel.close(), 5)

    def on_close(self, callback: Callable[[BaseException | None], None]) -> None:
        if callback in self._close_callbacks:
            return
        self._close_callbacks.append(callback)

        def closed(future: asyncio.Future[Any]) -> None:
            reason = None if future.cancelled() else future.exception()
            callback(_translate(reason) if reason is not None else None)

        self._channel.closing.add_done_callback(closed)


class AmqpTransport(Transport):
    def __init__(
        self,
        endpoint: Endpoint,
        connection: aio_pika.abc.AbstractConnection,
        receiver: Receiver | None = None,
    ) -> None:
        self.node = str(endpoint)
        self._connection = connection
        self._receiver = receiver
        transport = connection.transport
        assert transport is not None
        self._amqp: aiormq.abc.AbstractConnection = transport.connection

    @property
    def is_open(self) -> bool:
        return not self._amqp.is_closed

    @property
    def server_version(self) -> str:
        version = (getattr(self._amqp, "server_properties", None) or {}).get("version", "")
        return version.decode() if isinstance(version, bytes) else str(version)

    @property
    def blocked(self) -> bool:
        return internals.blocked(self._amqp)

    async def wait_unblocked(self) -> None:
        async with _translated:
            await self._amqp.ready()

    async def channel(self) -> Channel:
        if self._amqp.is_closed:
            raise ConnectionLost(f"the connection to {self.node} is closed")
        async with _translated:
            try:
                channel = await self._amqp.channel(publisher_confirms=True, on_return_raises=True)
            except RuntimeError as exc:  # aiormq: "<Connection ...> closed", between its states
                raise ConnectionLost(f"the connection to {self.node} is closed") from exc
        return AmqpChannel(channel, self._receiver)

    async def transaction_channel(self) -> Channel | None:
        if self._amqp.is_closed:
            raise ConnectionLost(f"the connection to {self.node} is closed")
        async with _translated:
            try:
                channel = await self._amqp.channel(publisher_confirms=False, on_return_raises=False)
            except RuntimeError as exc:  # as in `channel`
                raise ConnectionLost(f"the connection to {self.node} is closed") from exc
            await channel.tx_select()
        return AmqpChannel(channel)

    async def native_channel(self) -> aio_pika.abc.AbstractChannel:
        return await self._connection.channel()

    async def wait_closed(self) -> BaseException | None:
        closing = self._amqp.closing
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            if not closing.done():
                raise  # we were cancelled, the connection was not
            # aiormq cancels `closing` when the peer went silent past the heartbeat grace.
            return ConnectionLost("no frames from the node within the heartbeat timeout")
        except BaseException as exc:  # the reason the connection went away
            return exc
        return None

    async def close(self) -> None:
        with contextlib.suppress(TimeoutError, amqp_errors.AMQPError, ConnectionError):
            await asyncio.wait_for(self._connection.close(), 5)


async def connect(
    endpoint: Endpoint,
    *,
    timeout: float,
    heartbeat: int,
    name: str,
    ssl_context: ssl.SSLContext | None = None,
) -> AmqpTransport:
    """Open a connection to one node, or fail within `timeout` seconds."""
    kwargs: dict[str, Any] = {
        "timeout": timeout,
        "heartbeat": heartbeat,
        "client_properties": {"connection_name": name},
    }
    # Without a context aiormq builds one for amqps:// from the URL's query: cafile, capath,
    # certfile, keyfile, no_verify_ssl.
    if ssl_context is not None:
        kwargs["ssl_context"] = ssl_context
    try:
        with receiving() as made:  # this connection's frames are decoded by `decode`, tolerantly
            connection = await asyncio.wait_for(aio_pika.connect(endpoint.url, **kwargs), timeout)
    except (amqp_errors.ProbableAuthenticationError, amqp_errors.AuthenticationError) as exc:
        raise LoginRefused(
            f"{endpoint} refused the login of user {endpoint.user!r} (ACCESS_REFUSED): check the user "
            "name and password in url= or RABBITFLOW_URL"
        ) from exc
    return AmqpTransport(endpoint, connection, made[0] if made else None)


class AmqpBroker:
    """A real RabbitMQ, reached over AMQP 0-9-1 with aiormq: the default broker of an App."""

    def __repr__(self) -> str:
        return "AmqpBroker()"

    async def connect(
        self,
        endpoint: Endpoint,
        *,
        timeout: float,
        heartbeat: int,
        name: str,
        ssl_context: ssl.SSLContext | None = None,
    ) -> Transport:
        return await connect(
            endpoint, timeout=timeout, heartbeat=heartbeat, name=name, ssl_context=ssl_context
        )
