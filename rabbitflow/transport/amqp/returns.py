"""basic.return matched to its publish by the broker's own order, never by a field of the message.

aiormq finds the publish a basic.return belongs to by its `message_id`, so a publish needs one
(aiormq invents a random one; a copy of a message published without one would carry it), and two
publishes in flight with the same id, one unroutable, are matched wrongly: the unroutable one is
confirmed, the delivered one fails as unroutable.

In confirm mode RabbitMQ sends a mandatory publish's basic.return before the basic.ack of that
publish's delivery tag (an unroutable message is acked once the exchange found no queue for it),
and returns come in publish order. So a return waits for the confirm frames that follow it: the
first mandatory publish they cover whose exchange, routing key and body are the return's is the
one returned. (An ack of an earlier publish may come between a return and its own ack, in the same
flush of the broker's channel; it is covered, but does not match.)
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, cast

import aiormq
from aiormq.abc import DeliveredMessage
from aiormq.channel import Returning
from aiormq.exceptions import PublishError
from pamqp.commands import Basic

from rabbitflow.transport.amqp import internals

__all__ = ["Returns"]

log = logging.getLogger("rabbitflow.transport")


class Returns:
    """The returns of one channel: installed in place of aiormq's handlers of basic.return and of
    confirms on that channel."""

    __slots__ = ("_channel", "_confirm", "_expected", "_returned")

    def __init__(self, channel: aiormq.Channel) -> None:
        self._channel = channel
        # Mandatory publishes awaiting their confirm, in delivery-tag order.
        self._expected: dict[int, tuple[str, str, bytes]] = {}
        self._returned: deque[DeliveredMessage] = deque()  # returns awaiting their ack
        self._confirm = internals.hook_returns(channel, self._on_return, self._on_confirm)

    def expect(self, tag: int, exchange: str, routing_key: str, body: bytes) -> None:
        self._expected[tag] = (exchange, routing_key, body)

    async def _on_return(self, frame: Basic.Return) -> None:
        self._returned.append(await internals.read_returned(self._channel, frame))

    async def _on_confirm(self, frame: Any) -> None:
        expected = self._expected
        if expected:
            tag = frame.delivery_tag
            if getattr(frame, "multiple", False):
                covered = []
                for t in expected:
                    if t > tag:
                        break
                    covered.append(t)
            else:
                covered = [tag] if tag in expected else []
            if self._returned and covered:
                self._match(covered)
            for t in covered:
                expected.pop(t, None)
            if not expected and self._returned:
                log.warning("%d basic.return(s) matched no publish; ignored", len(self._returned))
                self._returned.clear()
        await self._confirm(frame)

    def _match(self, covered: list[int]) -> None:
        returned, expected = self._returned, self._expected
        while returned:
            message = returned[0]
            ret = cast(Basic.Return, message.delivery)
            key = (ret.exchange or "", ret.routing_key or "", message.body)
            tag = next((t for t in covered if expected.get(t) == key), None)
            if tag is None:
                return  # its own ack is still to come
            returned.popleft()
            del expected[tag]
            confirmations = internals.confirmations(self._channel)
            confirmation = confirmations.pop(tag, None)
            confirmations[tag] = Returning()  # aiormq then ignores this tag's ack
            if confirmation is not None and not confirmation.done():
                confirmation.set_exception(PublishError(message, ret))
