"""Where a handler's return value goes: to its consumer's `publish_to`, or back to the requester
as the reply (`reply_to`); nowhere when neither asks for it.

The publish is part of the attempt: the input is acked only once the broker confirmed it, and a
publish that fails is a failed attempt, retried or parked like any other.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Sequence
from typing import Any

from rabbitflow.codec import outgoing
from rabbitflow.middleware.base import Middleware, publish_chain
from rabbitflow.runtime.publisher import Publisher
from rabbitflow.transport.base import Delivery

__all__ = ["Answers"]


class Answers:
    """The return values of one consumer's handler, published on the session's publisher."""

    def __init__(
        self,
        target: tuple[str, str] | None,
        publisher: Publisher | None,
        *,
        timeout: float,
        middleware: Sequence[Middleware] = (),
    ) -> None:
        self._target = target
        self._publisher = publisher
        self._timeout = timeout
        self._chain = publish_chain(middleware)
        self._prefix = f"{uuid.uuid4().hex[:16]}-"
        self._ids = itertools.count(1)

    async def send(self, delivery: Delivery, result: Any) -> None:
        properties = delivery.properties
        if self._target is not None:
            exchange, routing_key = self._target
            correlation_id, mandatory = properties.correlation_id, True
        elif properties.reply_to:
            # A reply: the requester may have given up (its reply-to gone with it); that is no
            # reason to fail the attempt.
            exchange, routing_key = "", properties.reply_to
            correlation_id, mandatory = properties.correlation_id or properties.message_id, False
        else:
            return  # nobody asked for it
        data, answer = outgoing(
            result, message_id=f"{self._prefix}{next(self._ids):x}", correlation_id=correlation_id
        )
        publisher = self._publisher
        assert publisher is not None, "a consumer that answers needs the session's publisher"

        async def send() -> None:
            async with asyncio.timeout(self._timeout):
                await publisher.publish(data, exchange, routing_key, answer, mandatory=mandatory)

        if self._chain is not None:
            await self._chain(data, exchange, routing_key, answer, send)
        else:
            await send()
