"""Calling a consumer's handler once: what a plain consumer (`consumer.py`) and a partitioned one
(`partitions.py`) share, so that both call every kind of handler the same way.

One attempt: the delivery is marked for the log fields (`logs.delivering`), middleware hears it
(`received`), the handler runs inside the middleware's `attempt` chain with `ORIGIN` set (what it
publishes comes from this delivery), its dependencies and `App` parameters resolved and a plain
`def` in a worker thread; its return value goes to `publish_to` or back to the requester
(`Answers`) before the attempt counts as done. What becomes of the delivery then (ack, retry,
park) is the caller's: it tells middleware through `failed` and `settled`.

A `Message` is built only when someone reads it: a middleware hook, the handler's `Message`
parameter, or a dependency that takes one. The plain `async def handler(body)` without middleware
pays for none of this (the consume benchmark measures that path).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Mapping
from typing import Any

from rabbitflow import logs, names
from rabbitflow.message import DUPLICATE, Message
from rabbitflow.middleware.base import (
    Fate,
    Middleware,
    Outcome,
    attempt_chain,
    overriding,
    tell_failed,
    tell_received,
    tell_settled,
)
from rabbitflow.runtime.publisher import Publisher
from rabbitflow.runtime.results import ORIGIN, Answers
from rabbitflow.runtime.threads import Threads
from rabbitflow.spec import ConsumerSpec
from rabbitflow.transport.base import Delivery

__all__ = ["Invocation", "expired", "threads_for"]

_MAX_SIZE = 16 * 1024 * 1024  # Settings.max_message_size's default, for an app without settings


def expired(headers: Mapping[str, Any]) -> bool:
    """Is this request's deadline (the `x-rf-deadline` header, Unix time in ms) past? Its caller
    has given up then, and nobody would read the answer."""
    deadline = headers.get(names.DEADLINE)
    if isinstance(deadline, bool) or not isinstance(deadline, int | float):
        return False
    return time.time() * 1000 > deadline


def threads_for(spec: ConsumerSpec, concurrency: int) -> Threads | None:
    """The worker threads of a plain `def` handler, as many at once as its handlers may run."""
    return Threads(spec.queue, concurrency) if spec.signature.sync else None


class Invocation:
    """`spec`'s handler, called once per attempt. `Message.queue`, the log fields and
    `x-rf-origin-queue` name the consumer's queue as declared (a partitioned consumer's too, not
    the partition's)."""

    def __init__(
        self,
        spec: ConsumerSpec,
        *,
        app: Any,
        middleware: tuple[Middleware, ...],
        onward: Publisher | None,
        publish_timeout: float,
        threads: Threads | None,
    ) -> None:
        self.spec = spec
        self.queue = spec.queue
        self._app = app  # what a handler's parameter annotated `App` receives
        self._threads = threads
        max_size = getattr(getattr(app, "settings", None), "max_message_size", _MAX_SIZE)
        self.answers = Answers(
            spec.publish_to,
            onward,
            timeout=publish_timeout,
            middleware=middleware,
            queue=spec.queue,
            max_size=max_size,
        )
        self._on_received = overriding(middleware, "received")
        self._attempt_chain = attempt_chain(middleware)
        self._on_settled = overriding(middleware, "settled")
        self._on_failed = overriding(middleware, "attempt_failed")
        # A Message for the hooks only when one of them looks at it.
        self.observed = bool(self._on_received or self._attempt_chain or self._on_settled)

    def received(self, delivery: Delivery, headers: Mapping[str, Any], attempt: int) -> Message | None:
        """Attempt `attempt` of `delivery` begins: the log fields, and middleware's `received`.
        The Message the hooks see (None when no hook looks)."""
        properties = delivery.properties
        logs.delivering(self.queue, properties.message_id, properties.correlation_id, attempt)
        if not self.observed:
            return None
        message = Message.of(delivery, headers, attempt, self.queue)
        tell_received(self._on_received, message)
        return message

    async def call(
        self,
        delivery: Delivery,
        body: Any,
        headers: Mapping[str, Any],
        attempt: int,
        message: Message | None,
    ) -> Any:
        """Call the handler once and send its result where it goes; returns the result (the
        attempt failed if this raises)."""
        spec = self.spec
        signature = spec.signature
        token = ORIGIN.set((delivery, self.queue))  # what the handler publishes comes from here
        try:
            if message is not None:
                if self._attempt_chain is None:
                    result = await self._run(body, message)
                else:
                    result = await self._attempt_chain(message, functools.partial(self._run, body, message))
            elif not signature.plain:
                needs = signature.needs
                if signature.message_param is None and (needs is None or not needs.needs_message):
                    result = await self._invoke(body, None)
                else:
                    result = await self._invoke(body, Message.of(delivery, headers, attempt, self.queue))
            elif signature.message_param is None:
                result = await spec.handler(body)
            else:
                message = Message.of(delivery, headers, attempt, self.queue)
                if signature.message_positional:
                    result = await spec.handler(body, message)
                else:
                    result = await spec.handler(body, **{signature.message_param: message})
        finally:
            ORIGIN.reset(token)
        if result is not None and result is not DUPLICATE:
            await self.answers.send(delivery, result)
        return result

    async def _run(self, body: Any, message: Message | None) -> Any:
        spec = self.spec
        signature = spec.signature
        if not signature.plain:
            return await self._invoke(body, message)
        if signature.message_param is None:
            return await spec.handler(body)
        if signature.message_positional:
            return await spec.handler(body, message)
        return await spec.handler(body, **{signature.message_param: message})

    async def _invoke(self, body: Any, message: Message | None) -> Any:
        """A handler with dependencies, or a sync one: resolve what it needs, call it (a `def` in
        a worker thread), then end the generator dependencies with the attempt's outcome."""
        signature = self.spec.signature
        needs = signature.needs
        args: tuple[Any, ...] = (body,)
        kwargs: dict[str, Any] = {}
        if signature.message_param is not None:
            if signature.message_positional:
                args = (body, message)
            else:
                kwargs[signature.message_param] = message
        if needs is None:
            return await self._invoke_handler(args, kwargs)
        if not needs.has_teardown:
            kwargs.update(await needs.resolve(message, self._app, None))
            return await self._invoke_handler(args, kwargs)
        exits = contextlib.AsyncExitStack()
        try:
            kwargs.update(await needs.resolve(message, self._app, exits))
            result = await self._invoke_handler(args, kwargs)
        except BaseException as exc:
            # The teardowns see the exception; one may not turn a failed attempt into a success.
            await exits.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        await exits.aclose()
        return result

    async def _invoke_handler(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        handler = self.spec.handler
        if self._threads is None:
            return await handler(*args, **kwargs)
        return await self._threads.run(handler, args, kwargs)

    def failed(self, attempt: int, exc: BaseException) -> None:
        """The handler call of `attempt` raised `exc` (middleware's `attempt_failed`)."""
        tell_failed(self._on_failed, self.queue, attempt, exc)

    def settled(
        self,
        message: Message | None,
        fate: Fate,
        exception: BaseException | None = None,
        *,
        reason: str | None = None,
        delay: float | None = None,
    ) -> None:
        """The delivery's fate is decided (middleware's `settled`; nothing without a Message)."""
        if message is not None:
            tell_settled(self._on_settled, message, Outcome(fate, exception, reason=reason, delay=delay))

    def refused(self, delivery: Delivery, reason: str, exc: BaseException | None) -> None:
        """The request `delivery` is parked: its caller learns it now, not at its timeout."""
        if delivery.properties.reply_to:
            self.answers.failed(delivery, reason, exc)
