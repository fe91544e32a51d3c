"""Middleware: hooks around what a service consumes and publishes, for metrics, tracing and tests.

`App(middleware=[...])` calls each hook of each middleware, in the order given:

- `received(message)` once per delivery, before its body is decoded;
- `attempt(message, call_next)` around the handler call (the around-hooks nest: the first
  middleware is the outermost), returning the handler's result or raising its exception;
- `settled(message, outcome)` once the delivery's fate is decided: handled, retried (with its
  delay), or parked (with its reason);
- `publish(outgoing, call_next)` around each `app.publish`, before the body is on the wire and
  until the broker confirmed it; `outgoing.headers` may be changed there (a trace header).

A service with no middleware pays one test of an empty tuple per delivery and per publish.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from rabbitflow.message import Message
from rabbitflow.transport.base import Properties

__all__ = [
    "AttemptChain",
    "Fate",
    "Middleware",
    "Outcome",
    "Outgoing",
    "PublishChain",
    "attempt_chain",
    "overriding",
    "publish_chain",
    "tell_failed",
    "tell_received",
    "tell_settled",
]

log = logging.getLogger("rabbitflow.middleware.base")


class Fate(StrEnum):
    """What became of one delivery."""

    HANDLED = "handled"  # the handler returned: acked
    RETRIED = "retried"  # failed; attempt + 1 follows (via a retry queue, or in place when partitioned)
    PARKED = "parked"  # failed for good (or undecodable): sent to the parking queue
    DUPLICATE = "duplicate"  # an exactly_once consumer had handled it before: acked, not handled


@dataclass(frozen=True, slots=True)
class Outcome:
    """The fate of one delivery, as `Middleware.settled` sees it."""

    fate: Fate
    exception: BaseException | None = None  # what the handler (or the decoder) raised
    reason: str | None = None  # the parking reason (`x-rf-reason`): parked only
    delay: float | None = None  # seconds until the next attempt: retried only


@dataclass(slots=True)
class Outgoing:
    """One `app.publish` on its way to the broker. `headers` is the message's own table: a
    middleware may add to it (it is sent as it is when `call_next` runs)."""

    body: bytes
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    message_id: str | None
    content_type: str | None
    started: float = field(default_factory=time.perf_counter)


class Middleware:
    """Subclass and override the hooks you need.

    Hooks run on the event loop inside a delivery's or a publish's path: keep them quick and
    never block. An exception raised by `received` or `settled` is logged and ignored; one raised
    by `attempt` counts as the handler's (the attempt fails); one raised by `publish` is the
    publish's.
    """

    def received(self, message: Message) -> None:
        """A delivery arrived on `message.queue` (before decoding; `message.attempt` is known)."""

    async def attempt(self, message: Message, call_next: Callable[[], Awaitable[Any]]) -> Any:
        """Around one handler call: `return await call_next()` runs the handler (and the
        middlewares after this one)."""
        return await call_next()

    def settled(self, message: Message, outcome: Outcome) -> None:
        """The delivery's fate is decided; its ack follows (for a copy: once the broker
        confirmed it)."""

    def attempt_failed(self, queue: str, attempt: int, exception: BaseException) -> None:
        """A handler call on `queue` ended with `exception` (before it is retried or parked).
        Kept for existing middlewares; `settled` sees the same with the decision."""

    async def publish(self, outgoing: Outgoing, call_next: Callable[[], Awaitable[None]]) -> None:
        """Around one `app.publish`: `await call_next()` sends it and returns once the broker
        confirmed it (or raises `Unroutable`, `PublishTimeout`, ...)."""
        await call_next()


@functools.lru_cache(maxsize=256)
def overriding(middleware: tuple[Middleware, ...], hook: str) -> tuple[Middleware, ...]:
    """The middlewares whose class overrides `hook`: the base class's hooks do nothing, so a
    middleware that does not override one costs nothing on its path."""
    base = getattr(Middleware, hook)
    return tuple(m for m in middleware if getattr(type(m), hook, base) is not base)


# Built once per consumer and per publisher, not per call: the chains below nest the hooks the
# way starlette wraps its middleware around the app once.
Send = Callable[[], Awaitable[None]]
PublishChain = Callable[[bytes, str, str, Properties, Send], Awaitable[None]]
AttemptChain = Callable[[Message, Callable[[], Awaitable[Any]]], Awaitable[Any]]


def publish_chain(middleware: Sequence[Middleware]) -> PublishChain | None:
    """`chain(body, exchange, routing_key, properties, send)` runs `send()` inside every
    middleware's `publish` hook, the first one outermost; the headers the hooks leave on the
    `Outgoing` are the message's when `send` runs. None when no middleware overrides `publish`."""
    hooks = overriding(tuple(middleware), "publish")
    if not hooks:
        return None

    def wrap(hook: Middleware, inner: Callable[[Outgoing, Properties, Send], Awaitable[None]]) -> Any:
        async def layer(outgoing: Outgoing, properties: Properties, send: Send) -> None:
            await hook.publish(outgoing, lambda: inner(outgoing, properties, send))

        return layer

    async def innermost(outgoing: Outgoing, properties: Properties, send: Send) -> None:
        properties.headers = outgoing.headers or None
        await send()

    chain = innermost
    for hook in reversed(hooks):
        chain = wrap(hook, chain)
    outermost = chain

    async def run(body: bytes, exchange: str, routing_key: str, properties: Properties, send: Send) -> None:
        outgoing = Outgoing(
            body,
            exchange,
            routing_key,
            dict(properties.headers or {}),
            properties.message_id,
            properties.content_type,
        )
        await outermost(outgoing, properties, send)

    return run


def attempt_chain(middleware: Sequence[Middleware]) -> AttemptChain | None:
    """`chain(message, call)` runs `call()` (the handler) inside every middleware's `attempt`
    hook, the first one outermost. None when no middleware overrides `attempt`."""
    hooks = overriding(tuple(middleware), "attempt")
    if not hooks:
        return None

    def wrap(hook: Middleware, inner: AttemptChain) -> AttemptChain:
        async def layer(message: Message, call: Callable[[], Awaitable[Any]]) -> Any:
            return await hook.attempt(message, lambda: inner(message, call))

        return layer

    async def innermost(message: Message, call: Callable[[], Awaitable[Any]]) -> Any:
        return await call()

    chain: AttemptChain = innermost
    for hook in reversed(hooks):
        chain = wrap(hook, chain)
    return chain


def tell_received(middleware: Sequence[Middleware], message: Message) -> None:
    for item in middleware:
        try:
            item.received(message)
        except Exception:
            log.exception("queue %s: middleware %r failed in received()", message.queue, item)


def tell_settled(middleware: Sequence[Middleware], message: Message, outcome: Outcome) -> None:
    for item in middleware:
        try:
            item.settled(message, outcome)
        except Exception:
            log.exception("queue %s: middleware %r failed in settled()", message.queue, item)


def tell_failed(middleware: Sequence[Middleware], queue: str, attempt: int, exc: BaseException) -> None:
    for item in middleware:
        try:
            item.attempt_failed(queue, attempt, exc)
        except Exception:
            log.exception("queue %s: middleware %r failed in attempt_failed()", queue, item)
