"""The consumer runtime: one consumer of one queue on one channel, carrying out decisions."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from . import names
from .acks import Acker
from .codec import DecodeError
from .consumer import ConsumerSpec
from .errors import PublishNacked, TopologyConflict
from .message import Message
from .retry import Decision, Outcome, decide
from .topology.compiler import DELIVERY_LIMIT
from .transport.base import (
    Channel,
    ChannelClosed,
    ConnectionLost,
    Delivery,
    Properties,
    TransportError,
    persistent_copy,
)

__all__ = ["ConsumerWorker", "Publish"]

log = logging.getLogger("rabbitflow.worker")

# (body, exchange, routing_key, properties) -> the broker's confirm, as a future
Publish = Callable[[bytes, str, str, Properties], "asyncio.Future[None]"]
EnsureRetryQueue = Callable[[ConsumerSpec, float], Awaitable[None]]
# (queue, attempt, exception) for every handler call that raised; the test client listens here.
FailureHook = Callable[[str, int, BaseException], None]

# Park a message ourselves, with full headers, before the quorum queue's own backstop would.
PARK_AFTER_DELIVERIES = DELIVERY_LIMIT // 2
_MAX_ERROR = 1000
_MAX_TRACEBACK = 4000


_second: tuple[int, str] = (0, "")


def _now() -> str:
    """ISO 8601 UTC with milliseconds; the formatting of the current second is reused."""
    global _second
    now = time.time()
    whole = int(now)
    if _second[0] != whole:
        _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


class ConsumerWorker:
    """Consumes `spec.queue` on `channel`; acks after the handler, retries and parks through copies."""

    def __init__(
        self,
        spec: ConsumerSpec,
        *,
        service: str,
        channel: Channel,
        publish: Publish,
        ensure_retry_queue: EnsureRetryQueue,
        prefetch: int,
        concurrency: int,
        on_failure: FailureHook | None = None,
    ) -> None:
        self.spec = spec
        self._on_failure = on_failure
        self._dlx = names.dead_letter_exchange(service)
        self._parked = names.parked_queue(spec.queue)
        self._retry_prefix = names.retry_prefix(spec.queue)
        # The planned retry queues by delay, named once rather than on every failure.
        self._retry_queues = {d: names.retry_queue(spec.queue, d) for d in spec.policy.distinct_delays}
        self._channel = channel
        self._publish = publish
        self._ensure_retry_queue = ensure_retry_queue
        self._prefetch = prefetch
        # Prefetch already bounds how many deliveries run at once; a semaphore only when tighter.
        self._limit = asyncio.Semaphore(concurrency) if concurrency < prefetch else None
        self._acker = Acker(channel, prefetch=prefetch)
        self._tag: str | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending: set[asyncio.Future[Any]] = set()  # copies awaiting the broker, and their rejects
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def live(self) -> bool:
        return self._tag is not None and self._channel.is_open and not self._stopping

    async def start(self) -> None:
        self._tag = await self._channel.consume(self.spec.queue, self._on_delivery, prefetch=self._prefetch)

    async def stop(self, timeout: float) -> None:
        """Take no new deliveries, let running handlers finish within `timeout`, then close."""
        self._stopping = True
        if self._tag is not None and self._channel.is_open:
            with contextlib.suppress(TransportError):
                await self._channel.cancel(self._tag)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning(
                "queue %s: %d handler(s) still running after %.1fs; cancelling them, the broker "
                "redelivers their messages",
                self.spec.queue,
                len(self._tasks),
                timeout,
            )
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pending:
            # Copies still waiting for their confirm: their originals are acked once it comes.
            await asyncio.wait(set(self._pending), timeout=timeout)
        await self._acker.flush()
        await self._channel.close()

    async def abandon(self) -> None:
        """The connection is gone: cancel running handlers; their messages come back anyway."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the hot path --------------------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> None:
        if self._stopping:
            return  # not acked: requeued when the channel closes
        tag = delivery.delivery_tag
        self._acker.track(tag)
        task = asyncio.current_task()
        assert task is not None
        tasks = self._tasks
        if not tasks:
            self._idle.clear()
        tasks.add(task)
        try:
            if self._limit is None:
                await self._handle(delivery)
            else:
                async with self._limit:
                    if self._stopping:
                        return  # waited for a slot while stopping: never started, so requeued
                    await self._handle(delivery)
        except Exception:
            # Not the handler's exceptions (those are retried or parked), but a fault on the way:
            # a bug of ours, or user code outside the handler (a dataclass's __post_init__ raising
            # something other than ValueError or TypeError, say). An unsettled delivery would hold
            # back every later ack of this channel, so reject it: the queue dead-letters it to its
            # parking queue, where nothing is lost.
            log.exception(
                "queue %s: internal error on delivery %d; rejecting it to %s",
                self.spec.queue,
                tag,
                self._parked,
            )
            await self._reject(tag, requeue=False)
        finally:
            tasks.discard(task)
            if not tasks:
                self._idle.set()

    async def _handle(self, delivery: Delivery) -> None:
        spec = self.spec
        properties = delivery.properties
        headers = properties.headers or {}
        attempt = self._attempt(delivery, headers) if headers else 1
        try:
            body = spec.signature.read(delivery.body, properties.content_type)
        except DecodeError as exc:
            await self._park(delivery, "decode-error", attempt, exc)
            return
        if delivery.redelivered and _delivery_count(headers) >= PARK_AFTER_DELIVERIES:
            await self._park(delivery, "delivery-limit", attempt, None)
            return
        try:
            signature = spec.signature
            if signature.message_param is None:
                await spec.handler(body)
            else:
                message = self._message(delivery, headers, attempt)
                if signature.message_positional:
                    await spec.handler(body, message)
                else:
                    await spec.handler(body, **{signature.message_param: message})
        except Exception as exc:
            await self._fail(delivery, attempt, exc)
            return
        self._acker.settle(delivery.delivery_tag)

    # -- the failure path ----------------------------------------------------------------------

    def _attempt(self, delivery: Delivery, headers: Mapping[str, Any]) -> int:
        """Which attempt this is. rabbitflow's header counts only on a copy that came back through
        one of this queue's retry queues; a forged header on any other message is ignored."""
        if not self._came_back(delivery, headers):
            return 1
        value = headers.get(names.ATTEMPT)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return min(value, self.spec.policy.retries + 1)
        return 1

    def _came_back(self, delivery: Delivery, headers: Mapping[str, Any]) -> bool:
        if delivery.exchange != "" or delivery.routing_key != self.spec.queue:
            return False
        # The broker's own newest death record: 3.13+ writes x-last-death-*, older ones only x-death.
        last_queue = headers.get("x-last-death-queue")
        if last_queue is None:
            deaths = headers.get("x-death")
            if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
                return False
            last_queue, reason = deaths[0].get("queue"), deaths[0].get("reason")
        else:
            reason = headers.get("x-last-death-reason")
        return (
            reason == "expired" and isinstance(last_queue, str) and last_queue.startswith(self._retry_prefix)
        )

    def _message(self, delivery: Delivery, headers: Mapping[str, Any], attempt: int) -> Message:
        p = delivery.properties
        return Message(
            body=delivery.body,
            headers=headers,
            attempt=attempt,
            message_id=p.message_id,
            routing_key=delivery.routing_key,
            exchange=delivery.exchange,
            redelivered=delivery.redelivered,
            content_type=p.content_type,
            correlation_id=p.correlation_id,
            reply_to=p.reply_to,
            queue=self.spec.queue,
        )

    async def _fail(self, delivery: Delivery, attempt: int, exc: Exception) -> None:
        if self._on_failure is not None:
            self._on_failure(self.spec.queue, attempt, exc)
        decision: Decision = decide(self.spec.policy, attempt, exc)
        if decision.outcome is Outcome.RETRY:
            log.info(
                "queue %s: attempt %d failed with %s; retrying in %ss",
                self.spec.queue,
                attempt,
                type(exc).__name__,
                decision.delay,
            )
            await self._retry(delivery, attempt, decision.delay)
        else:
            log.warning(
                "queue %s: attempt %d failed with %s: %s; parking the message (%s)",
                self.spec.queue,
                attempt,
                type(exc).__name__,
                _describe(exc),
                decision.reason,
            )
            await self._park(delivery, decision.reason, attempt, exc)

    def _copy_headers(
        self, delivery: Delivery, attempt: int, now: str, drop: tuple[str, ...]
    ) -> dict[str, Any]:
        """The headers of a copy: the delivery's without the broker's (and `drop`), plus where the
        message was first published and when it first failed. A later attempt is a copy that came
        back through a retry queue and carries both already."""
        headers = delivery.properties.headers or {}
        copy = names.without(headers, names.BROKER_HEADERS, drop)
        if attempt > 1:
            copy[names.ORIGINAL_EXCHANGE] = str(headers.get(names.ORIGINAL_EXCHANGE, ""))
            copy[names.ORIGINAL_ROUTING_KEY] = str(
                headers.get(names.ORIGINAL_ROUTING_KEY, delivery.routing_key)
            )
            copy[names.FIRST_FAILURE] = headers.get(names.FIRST_FAILURE) or now
        else:
            copy[names.ORIGINAL_EXCHANGE] = delivery.exchange
            copy[names.ORIGINAL_ROUTING_KEY] = delivery.routing_key
            copy[names.FIRST_FAILURE] = now
        return copy

    async def _retry(self, delivery: Delivery, attempt: int, delay: float) -> None:
        queue = self._retry_queues.get(delay)
        if queue is None:
            queue = names.retry_queue(self.spec.queue, delay)
            try:
                await self._ensure_retry_queue(self.spec, delay)
            except ConnectionLost:
                return  # not settled: the broker redelivers it on the next connection
            except (TopologyConflict, ChannelClosed) as refused:
                # No retry queue, no retry: park it with the broker's answer rather than
                # leaving it unsettled, which would hold every later ack of this channel back.
                await self._park(delivery, "not-retryable", attempt, refused)
                return
        copy = self._copy_headers(delivery, attempt, _now(), drop=())
        copy[names.ATTEMPT] = attempt + 1
        self._send_copy(delivery, queue, copy)

    async def _park(self, delivery: Delivery, reason: str, attempt: int, exc: BaseException | None) -> None:
        now = _now()
        copy = self._copy_headers(delivery, attempt, now, drop=names.RABBITFLOW_HEADERS)
        copy[names.REASON] = reason
        copy[names.ATTEMPTS] = attempt
        copy[names.QUEUE] = self.spec.queue
        copy[names.LAST_FAILURE] = now
        if exc is not None:
            copy[names.EXCEPTION] = f"{type(exc).__module__}.{type(exc).__qualname__}"
            copy[names.ERROR] = _describe(exc)[:_MAX_ERROR]
            tb = "".join(traceback.format_exception(exc))
            copy[names.TRACEBACK] = tb[-_MAX_TRACEBACK:]
        elif reason == "delivery-limit":
            count = _delivery_count(delivery.properties.headers or {})
            copy[names.ERROR] = (
                f"delivered {count + 1} times without being settled (a handler that crashes its worker?)"
            )
        self._send_copy(delivery, self._parked, copy)

    def _send_copy(self, delivery: Delivery, queue: str, headers: dict[str, Any]) -> None:
        """Publish the copy; the original is settled when the broker answers, without keeping the
        handler's task alive for it."""
        properties = persistent_copy(delivery.properties, headers)
        future = self._publish(delivery.body, self._dlx, queue, properties)
        self._pending.add(future)
        future.add_done_callback(functools.partial(self._copy_answered, delivery.delivery_tag, queue))

    def _copy_answered(self, tag: int, queue: str, future: asyncio.Future[None]) -> None:
        """Nothing is lost whatever the answer: confirmed → ack the original; unconfirmed → it
        stays unacked and comes back; nacked → requeued; unroutable → rejected, which the queue
        dead-letters to its parking queue."""
        self._pending.discard(future)
        exc = ConnectionLost("cancelled") if future.cancelled() else future.exception()
        if exc is None:
            self._acker.settle(tag)
            return
        if isinstance(exc, TransportError):
            log.warning(
                "queue %s: copy to %s not confirmed (%s); the broker will redeliver",
                self.spec.queue,
                queue,
                exc,
            )
            return
        requeue = isinstance(exc, PublishNacked)  # not taken (a quorum queue between leaders)
        log.warning(
            "queue %s: copy to %s refused (%s); %s",
            self.spec.queue,
            queue,
            exc,
            "requeueing the message" if requeue else f"rejecting the message to {self._parked}",
        )
        task = asyncio.get_running_loop().create_task(self._reject(tag, requeue=requeue))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _reject(self, tag: int, *, requeue: bool) -> None:
        try:
            await self._channel.reject(tag, requeue=requeue)
        except TransportError:
            return
        self._acker.settle(tag, ack=False)


def _describe(exc: BaseException) -> str:
    """`str(exc)`, or what can be said of an exception whose `__str__` itself fails."""
    try:
        return str(exc)
    except Exception as failure:
        return f"<{type(exc).__name__}: str() failed with {type(failure).__name__}>"


def _delivery_count(headers: Mapping[str, Any]) -> int:
    value = headers.get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0
