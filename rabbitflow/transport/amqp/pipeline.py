"""Pipelined publishing on an aiormq channel: the publishes of one event-loop turn leave in one
write, and each still waits for its own publisher confirm.

aiormq's `basic_publish` takes a lock, a timeout scope and a queue slot per message and the
writer sends each message with its own syscall. Here the frames of every publish made in the same
loop turn are marshalled into one buffer. Confirms and channel-close rejections stay aiormq's
own: a publish registers its future under its delivery tag in the channel's confirmations,
as `basic_publish` does (every reach into aiormq's channel is in `internals`). Returns are
matched to their publish by `returns.Returns`, by the broker's order rather than by message id,
so nothing is added to what the producer published. When this aiormq lacks what that needs (or
the patches are off), `supported()` is false and the plain `basic_publish` is used.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence

import aiormq
from aiormq.channel import Returning
from pamqp.base import Frame
from pamqp.commands import Basic
from pamqp.frame import marshal

from rabbitflow.errors import UnencodableMessage
from rabbitflow.transport.amqp import internals
from rabbitflow.transport.amqp.encode import body_frames, content_header_frame
from rabbitflow.transport.amqp.returns import Returns
from rabbitflow.transport.base import ConnectionLost

__all__ = ["Pipeline", "supported"]

_FRAME_OVERHEAD = 8  # frame type, channel, size and end octet around a frame's payload


def supported(channel: aiormq.Channel) -> bool:
    return internals.can_pipeline(channel)


class Pipeline:
    __slots__ = ("_channel", "_chunks", "_closed", "_draining", "_loop", "_methods", "_outbox", "_returns")

    def __init__(self, channel: aiormq.Channel) -> None:
        self._channel = channel
        self._loop = asyncio.get_running_loop()
        self._chunks: list[bytes] = []  # this turn's marshalled frames, in delivery-tag order
        self._methods: dict[tuple[str, str, bool], bytes] = {}
        self._outbox: deque[bytes] = deque()  # marshalled turns the write queue had no room for
        self._draining: asyncio.Task[None] | None = None
        self._returns = Returns(channel)
        self._closed = False  # our channel.close is going out: nothing may follow it
        channel.closing.add_done_callback(self._fail_pending)

    def close(self) -> None:
        """Before our channel.close: write what this turn queued now, then take nothing more (a
        frame after the close is a 504 CHANNEL_ERROR for the whole connection)."""
        self._flush()
        self._closed = True

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def publish(
        self, body: bytes, exchange: str, routing_key: str, properties: Basic.Properties, mandatory: bool
    ) -> asyncio.Future[object]:
        """Queue the publish for this turn's write; the future resolves with the broker's confirm."""
        channel = self._channel
        if self._closed or internals.closing(channel):
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        # Encoded and measured before a delivery tag is taken or anything is queued: a frame that
        # cannot be written leaves nothing half-sent (a method frame without its header is a 505
        # that drops the connection, a tag taken for nothing shifts every later confirm).
        number = channel.number
        key = (exchange, routing_key, mandatory)
        try:
            method = self._methods.get(key)
            if method is None:
                # Retry and parking copies go to a handful of routes: marshal each method frame once.
                publish = Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory)
                method = marshal(publish, number)
                if len(self._methods) < 1024:
                    self._methods[key] = method
            header = content_header_frame(number, len(body), properties)
        except Exception as exc:
            raise UnencodableMessage(f"cannot encode the publish, its properties or headers: {exc}") from exc
        frame_max = channel.max_content_size + _FRAME_OVERHEAD
        if len(header) > frame_max:
            raise UnencodableMessage(
                f"the message's properties and headers take {len(header)} bytes, more than the "
                f"broker's frame size of {frame_max}; send less in headers"
            )
        tag = internals.next_delivery_tag(channel)
        # A plain future: `_fail_pending` rejects it if the channel goes, so aiormq's future store
        # (a weak set and two callbacks per future) is not needed.
        confirmation: asyncio.Future[object] = self._loop.create_future()
        internals.confirmations(channel)[tag] = confirmation
        if mandatory:
            self._returns.expect(tag, exchange, routing_key, body)

        chunks = self._chunks
        if not chunks:
            self._loop.call_soon(self._flush)
        chunks.append(method)
        chunks.append(header)
        chunks.extend(body_frames(number, body, channel.max_content_size))
        return confirmation

    def methods(self, frames: Sequence[Frame]) -> None:
        """Queue method frames (acks, rejects) for this turn's write, in order with everything
        else the channel sends: an ack of tag 7 never overtakes a `multiple` ack covering it. A
        flush's acks behind an unsettled delivery then cost one syscall, not one per tag."""
        channel = self._channel
        if self._closed or internals.closing(channel):
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        chunks = self._chunks
        if not chunks:
            self._loop.call_soon(self._flush)
        number = channel.number
        chunks.extend(marshal(frame, number) for frame in frames)

    def frames(self, payload: bytes) -> None:
        """Queue already marshalled frames (acks) for this turn's write, in order as `methods`."""
        channel = self._channel
        if self._closed or internals.closing(channel):
            raise aiormq.exceptions.ChannelInvalidStateError(f"{channel!r} closed")
        chunks = self._chunks
        if not chunks:
            self._loop.call_soon(self._flush)
        chunks.append(payload)

    def _fail_pending(self, closing: asyncio.Future[object]) -> None:
        """The channel is gone: every unconfirmed publish has an unknown outcome, and says so."""
        reason = None if closing.cancelled() else closing.exception()
        error: BaseException = (
            reason  # the broker closed the channel (404, 406...): the caller learns why
            if isinstance(reason, aiormq.exceptions.AMQPChannelError)
            else ConnectionLost("channel closed before the broker confirmed")
        )
        for confirmation in list(internals.confirmations(self._channel).values()):
            if not confirmation.done() and not isinstance(confirmation, Returning):
                confirmation.set_exception(error)
        self._outbox.clear()
        if self._draining is not None:
            self._draining.cancel()  # it may wait forever on a queue no writer empties

    def _flush(self) -> None:
        chunks, self._chunks = self._chunks, []
        if not chunks or self._closed or internals.closing(self._channel):
            return  # their confirmations fail with the channel (`_fail_pending`)
        chunk = b"".join(chunks)
        if self._draining is None and internals.write(self._channel, chunk):
            return
        self._outbox.append(chunk)
        if self._draining is None:
            self._draining = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        """Hand over, in order, what did not fit in the connection's write queue."""
        try:
            while self._outbox and not self._closed and not internals.closing(self._channel):
                await internals.write_waiting(self._channel, self._outbox.popleft())
            self._outbox.clear()
        finally:
            self._draining = None
