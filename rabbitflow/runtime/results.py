"""Where a handler's return value goes: to its consumer's `publish_to`, or back to the requester
as the reply (`reply_to`); nowhere when neither asks for it. And the error reply a requester gets
at once when its request failed for good (parked), instead of waiting for its timeout.

The publish is part of the attempt: the input is acked only once the broker confirmed it, and a
publish that fails is a failed attempt, retried or parked like any other. A result over the
app's `max_message_size` can never be sent: the attempt is rejected (parked at once).

Correlation: every message published because of another (a result, a reply, `app.publish`
inside a handler: `ORIGIN` is set around the handler call, in a sync handler's thread too)
carries the input's correlation id (else its message id) and the headers `x-rf-origin-queue`
and `x-rf-origin-message-id`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

from rabbitflow import names
from rabbitflow.codec import check_size, outgoing
from rabbitflow.errors import Reject, UnencodableMessage
from rabbitflow.middleware.base import Middleware, publish_chain
from rabbitflow.runtime.publisher import Publisher
from rabbitflow.transport.base import Delivery, Properties

__all__ = ["ORIGIN", "Answers", "derived"]

log = logging.getLogger("rabbitflow.runtime.results")

# The delivery being handled and its queue, around the handler call.
ORIGIN: ContextVar[tuple[Delivery, str] | None] = ContextVar("rabbitflow.origin", default=None)


def derived(
    origin: tuple[Delivery, str] | None, headers: dict[str, Any] | None, correlation_id: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """The headers and correlation id of a message published because of `origin`'s delivery;
    what the publisher set itself wins."""
    if origin is None:
        return headers, correlation_id
    delivery, queue = origin
    p = delivery.properties
    out: dict[str, Any] = {names.ORIGIN_QUEUE: queue}
    if p.message_id:
        out[names.ORIGIN_MESSAGE_ID] = p.message_id
    if headers:
        out.update(headers)
    return out, correlation_id or p.correlation_id or p.message_id


class Answers:
    """The return values of one consumer's handler, published on the session's publisher."""

    def __init__(
        self,
        target: tuple[str, str] | None,
        publisher: Publisher | None,
        *,
        timeout: float,
        middleware: Sequence[Middleware] = (),
        queue: str = "",
        max_size: int = 16 * 1024 * 1024,
    ) -> None:
        self._target = target
        self._publisher = publisher
        self._timeout = timeout
        self._chain = publish_chain(middleware)
        self._queue = queue
        self._max_size = max_size
        self._prefix = f"{uuid.uuid4().hex[:16]}-"
        self._ids = itertools.count(1)
        self._errors: set[asyncio.Task[None]] = set()

    async def send(self, delivery: Delivery, result: Any) -> None:
        properties = delivery.properties
        if self._target is not None:
            exchange, routing_key = self._target
            mandatory = True
        elif properties.reply_to:
            # A reply: the requester may have given up (its reply queue gone with it); that is no
            # reason to fail the attempt.
            exchange, routing_key = "", properties.reply_to
            mandatory = False
        else:
            return  # nobody asked for it
        headers, correlation_id = derived((delivery, self._queue), None, None)
        data, answer = outgoing(
            result,
            message_id=f"{self._prefix}{next(self._ids):x}",
            correlation_id=correlation_id,
            headers=headers,
        )
        try:
            check_size(data, self._max_size, f"the result of queue {self._queue}'s handler")
        except UnencodableMessage as exc:
            raise Reject(str(exc)) from None  # it will never fit: no retry can help
        await self._publish(data, exchange, routing_key, answer, mandatory)

    async def _publish(
        self, data: bytes, exchange: str, routing_key: str, answer: Properties, mandatory: bool
    ) -> None:
        publisher = self._publisher
        assert publisher is not None, "a consumer that answers needs the session's publisher"

        async def send() -> None:
            async with asyncio.timeout(self._timeout):
                await publisher.publish(data, exchange, routing_key, answer, mandatory=mandatory)

        if self._chain is not None:
            await self._chain(data, exchange, routing_key, answer, send)
        else:
            await send()

    def failed(self, delivery: Delivery, reason: str, exc: BaseException | None) -> None:
        """The request `delivery` failed for good (it is being parked): tell its caller now, with an
        empty reply whose headers say why (`RequestFailed` on the caller's side)."""
        properties = delivery.properties
        if not properties.reply_to or self._publisher is None:
            return
        text = "" if exc is None else _text(exc)
        headers, correlation_id = derived((delivery, self._queue), None, None)
        assert headers is not None
        headers[names.ERROR_REPLY] = reason
        headers[names.ERROR] = text[:1000]
        if exc is not None:
            headers[names.EXCEPTION] = f"{type(exc).__module__}.{type(exc).__qualname__}"
        data, answer = outgoing(
            b"",
            message_id=f"{self._prefix}{next(self._ids):x}",
            correlation_id=correlation_id,
            headers=headers,
        )
        task = asyncio.ensure_future(self._error_reply(data, properties.reply_to, answer))
        self._errors.add(task)
        task.add_done_callback(self._errors.discard)

    async def _error_reply(self, data: bytes, reply_to: str, answer: Properties) -> None:
        try:
            await self._publish(data, "", reply_to, answer, False)
        except Exception as exc:  # the caller times out instead; the message is parked anyway
            log.info("queue %s: could not send an error reply to %s: %s", self._queue, reply_to, exc)


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "<str() failed>"
