"""The consumer: one queue on one channel, from each delivery to its settlement.

Hot path: `_on_delivery` and `_handle` run once per message; the consume benchmark
(`benchmarks/`, scenarios consume and mixed) measures them against a plain aiormq loop. They
avoid per-message tasks, timers and allocations they do not need (no timeout scope without a
handler timeout, no semaphore when prefetch already bounds concurrency, no Message unless the
handler asks for one).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from . import copies, names
from .breaker import Breaker, BreakerState, Circuit, Switch
from .codec import DecodeError
from .errors import (
    ChannelClosed,
    ConnectionLost,
    TopologyConflict,
    TransportError,
    UnencodableMessage,
    Unroutable,
)
from .message import Message
from .middleware import Middleware
from .publisher import Publisher
from .retry import Decision, Outcome, decide
from .settlement import Settlement
from .spec import ConsumerSpec
from .transport.base import Channel, Delivery, persistent_copy

__all__ = ["Consumer"]

log = logging.getLogger("rabbitflow.consumer")

EnsureRetryQueue = Callable[[ConsumerSpec, float], Awaitable[None]]
Redeclare = Callable[[ConsumerSpec], Awaitable[None]]

# Park a message ourselves, with full headers, before the quorum queue's own backstop would.
PARK_AFTER_DELIVERIES = names.DELIVERY_LIMIT // 2
_CANCEL_GRACE = 5.0  # seconds cancelled handlers get to end before a stop or failover goes on


class Consumer:
    """Consumes `spec.queue` on `channel`: acks after the handler, retries and parks through
    copies on the session's copy publisher, and subscribes again when the broker cancels it."""

    def __init__(
        self,
        spec: ConsumerSpec,
        *,
        service: str,
        channel: Channel,
        copies: Publisher,
        ensure_retry_queue: EnsureRetryQueue,
        redeclare: Redeclare,
        on_lost: Callable[[BaseException | None], None] = lambda reason: None,
        prefetch: int,
        concurrency: int,
        handler_timeout: float | None,
        breaker: Breaker | None = None,
        middleware: tuple[Middleware, ...] = (),
    ) -> None:
        self.spec = spec
        self._dlx = names.dead_letter_exchange(service)
        self._parked = names.parked_queue(spec.queue)
        # The planned retry queues by delay, named once rather than on every failure.
        self._retry_queues = {d: names.retry_queue(spec.queue, d) for d in spec.policy.distinct_delays}
        self._channel = channel
        self._copies = copies
        self._ensure_retry_queue = ensure_retry_queue
        self._redeclare = redeclare
        self._on_lost = on_lost
        self._prefetch = prefetch
        self._timeout = handler_timeout
        self._middleware = middleware
        # Prefetch already bounds how many deliveries run at once; a semaphore only when tighter.
        self._limit = asyncio.Semaphore(concurrency) if concurrency < prefetch else None
        self.settlement = Settlement(channel, prefetch=prefetch)
        self._tag: str | None = None
        self.cancelled_since: float | None = None  # loop time the broker cancelled us
        self.resubscribed = 0
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pending: set[asyncio.Future[Any]] = set()  # copies awaiting the broker
        self._changing: asyncio.Task[None] | None = None  # the last subscription change
        self.circuit = Circuit(breaker) if breaker is not None else None
        self._switch = (
            Switch(self.circuit, spec.queue, pause=self._pause, consume=self._consume)
            if self.circuit is not None
            else None
        )
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def subscribed(self) -> bool:
        return self._tag is not None and self._channel.is_open and not self._stopping

    @property
    def running(self) -> int:
        """Handlers running now."""
        return len(self._tasks)

    @property
    def paused(self) -> bool:
        """The breaker holds it (open, or probing) on a live channel: not taking messages on
        purpose."""
        return (
            self.circuit is not None
            and self.circuit.state is not BreakerState.CLOSED
            and self._channel.is_open
            and not self._stopping
        )

    async def start(self, *, prefetch: int | None = None) -> None:
        if self._tag is not None:
            tag, self._tag = self._tag, None
            await self._channel.cancel(tag)  # one subscription at a time
        self._tag = await self._channel.consume(
            self.spec.queue,
            self._on_delivery,
            prefetch=self._prefetch if prefetch is None else prefetch,
            on_cancel=self._on_cancel,
        )
        self._channel.on_close(self._channel_closed)

    async def stop(self, timeout: float) -> None:
        """Take no new deliveries, let running handlers finish within `timeout`, then close."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._switch is not None:
            self._switch.quiet()
        if self._changing is not None:
            # Never cancelled: a cancelled basic.consume or basic.cancel makes aiormq close the
            # channel, and that would cancel every handler still running. Its steps see `_stopping`.
            await asyncio.wait({self._changing}, timeout=timeout)
        if self._tag is not None and self._channel.is_open:
            with contextlib.suppress(TransportError):
                await self._channel.cancel(self._tag)
        try:
            await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            log.warning(
                "queue %s: %d handler(s) still running after %.1fs; cancelling them, their messages "
                "go back to the queue",
                self.spec.queue,
                len(self._tasks),
                timeout,
            )
            await self._cancel_handlers()
        # Copies still waiting for their confirm (and copies sent again meanwhile): their originals
        # are acked once it comes.
        while self._pending and loop.time() < deadline + timeout:
            await asyncio.wait(set(self._pending), timeout=deadline + timeout - loop.time())
        for future in list(self._pending):
            future.cancel()
        await self.settlement.flush()
        await self._channel.close()

    async def abandon(self) -> None:
        """The session is gone: cancel running handlers; their messages come back anyway."""
        self._stopping = True
        if self._switch is not None:
            self._switch.quiet()
        if self._changing is not None:
            self._changing.cancel()  # its channel is gone or going with the session
        await self._cancel_handlers()
        for future in list(self._pending):
            future.cancel()
        # The consuming connection may be the one still up (the publishing one went): what is
        # acked already should not come back as a duplicate.
        await self.settlement.flush()

    async def _cancel_handlers(self) -> None:
        """Cancel running handlers and wait a little for them; one that swallows its cancellation
        is left behind (its delivery returns when the channel closes) rather than hold up a stop
        or a failover."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=_CANCEL_GRACE)
            if stuck:
                log.error(
                    "queue %s: %d handler(s) ignored their cancellation; leaving them behind",
                    self.spec.queue,
                    len(stuck),
                )

    def _channel_closed(self, reason: BaseException | None) -> None:
        """The consumer's channel went while the session goes on (a consumer timeout on 3.13+, a
        channel error): nothing would consume the queue again, so the session ends and the runtime
        opens a new one."""
        if not self._stopping:
            log.error("queue %s: the broker closed the consumer's channel (%s)", self.spec.queue, reason)
            self._on_lost(reason)

    # -- the subscription: one change at a time -------------------------------------------------

    def _then(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` after the subscription changes queued before it. Resubscribing after a
        broker cancel and the breaker's pause, probe and resume all go through here, so two never
        overlap on the channel."""
        previous = self._changing

        async def in_order() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            if not self._stopping and self._channel.is_open:
                await step()

        self._changing = asyncio.get_running_loop().create_task(in_order())

    def _pause(self) -> None:
        self._then(self._unsubscribe)

    def _consume(self, prefetch: int | None) -> None:
        self._then(lambda: self._subscribe(prefetch))

    async def _unsubscribe(self) -> None:
        tag, self._tag = self._tag, None
        if tag is not None:
            with contextlib.suppress(TransportError):
                await self._channel.cancel(tag)

    async def _subscribe(self, prefetch: int | None) -> None:
        """Subscribe with this prefetch (None: the consumer's own), declaring the consumer's
        topology again first if the broker cancelled it; keeps trying with a backoff."""
        failures = 0
        while not self._stopping and self._channel.is_open:
            try:
                if self.cancelled_since is not None:
                    await self._redeclare(self.spec)
                await self.start(prefetch=prefetch)
            except (TransportError, TopologyConflict) as exc:
                failures += 1
                log.error("queue %s: cannot subscribe: %s", self.spec.queue, exc)
                await asyncio.sleep(min(10.0, 0.2 * 2**failures))
                continue
            if self.cancelled_since is not None:
                self.resubscribed += 1
                self.cancelled_since = None
                log.info("queue %s: consuming again", self.spec.queue)
            return

    def _on_cancel(self) -> None:
        """basic.cancel from the broker: the queue was deleted, or (4.3) a consumer timeout or a
        leader move. Deliveries already made stay ours to settle; consuming starts again once the
        consumer's topology is declared again — unless the breaker holds it paused, in which
        case its probe declares it."""
        self._tag = None
        if self._stopping:
            return
        self.cancelled_since = asyncio.get_running_loop().time()
        circuit = self.circuit
        if circuit is not None and circuit.state is BreakerState.OPEN:
            log.warning("queue %s: the broker cancelled the paused consumer", self.spec.queue)
            return
        log.warning("queue %s: the broker cancelled the consumer; declaring it again", self.spec.queue)
        probing = circuit is not None and circuit.state is BreakerState.HALF_OPEN
        self._consume(1 if probing else None)

    # -- the hot path --------------------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> None:
        tag = delivery.delivery_tag
        settlement = self.settlement
        settlement.received(tag)
        if self._stopping:
            settlement.requeue(tag)
            return
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
                        settlement.requeue(tag)  # waited for a slot while stopping: never started
                        return
                    await self._handle(delivery)
        except asyncio.CancelledError:
            settlement.requeue(tag)  # a shutdown or a lost session cancelled the handler
            raise
        except Exception:
            # Not the handler's exceptions (those are retried or parked), but a fault on the way:
            # a bug of ours, or user code outside the handler. Reject it: the queue dead-letters
            # it to its parking queue, where nothing is lost.
            log.exception(
                "queue %s: internal error on delivery %d; rejecting it to %s",
                self.spec.queue,
                tag,
                self._parked,
            )
            settlement.reject(tag)
        except BaseException:
            # KeyboardInterrupt or SystemExit from our own code: end the delivery, then let it go.
            settlement.requeue(tag)
            raise
        finally:
            tasks.discard(task)
            if not tasks:
                self._idle.set()

    async def _handle(self, delivery: Delivery) -> None:
        """Run the handler once and carry out the decision; every path ends the delivery in
        `settlement`, at once or when its copy is answered."""
        spec = self.spec
        properties = delivery.properties
        headers = properties.headers or {}
        attempt = copies.attempt(delivery, headers, spec.queue, spec.policy.retries) if headers else 1
        try:
            body = spec.signature.read(delivery.body, properties.content_type)
        except DecodeError as exc:
            self._park(delivery, "decode-error", attempt, exc)
            return
        if delivery.redelivered and copies.delivery_count(headers) >= PARK_AFTER_DELIVERIES:
            self._park(delivery, "delivery-limit", attempt, None)
            return
        scope = None
        try:
            if self._timeout is None:
                await self._call(delivery, body, headers, attempt)
            else:
                async with (scope := asyncio.timeout(self._timeout)):
                    await self._call(delivery, body, headers, attempt)
        except BaseException as exc:
            # Any exception of the handler's, BaseExceptions included, is a failed attempt; only
            # a cancellation of our own (a shutdown, a lost session) is not.
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
                raise
            if scope is not None and scope.expired():
                exc = TimeoutError(f"handler still running after its handler_timeout of {self._timeout}s")
            if self._switch is not None:
                self._switch.attempted(exc)
            await self._fail(delivery, attempt, exc)
            return
        self.settlement.ack(delivery.delivery_tag)
        if self._switch is not None:
            self._switch.attempted(None)

    async def _call(self, delivery: Delivery, body: Any, headers: Mapping[str, Any], attempt: int) -> None:
        spec = self.spec
        signature = spec.signature
        if signature.message_param is None:
            await spec.handler(body)
            return
        message = self._message(delivery, headers, attempt)
        if signature.message_positional:
            await spec.handler(body, message)
        else:
            await spec.handler(body, **{signature.message_param: message})

    # -- the failure path ----------------------------------------------------------------------

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

    async def _fail(self, delivery: Delivery, attempt: int, exc: BaseException) -> None:
        for middleware in self._middleware:
            middleware.attempt_failed(self.spec.queue, attempt, exc)
        decision: Decision = decide(self.spec.policy, attempt, exc)
        if decision.outcome is Outcome.RETRY:
            log.info(
                "queue %s: message %s attempt %d failed with %s: %s; retrying in %ss",
                self.spec.queue,
                delivery.properties.message_id or "-",
                attempt,
                type(exc).__name__,
                copies.describe(exc)[:200],
                decision.delay,
            )
            await self._retry(delivery, attempt, decision.delay)
        else:
            log.warning(
                "queue %s: message %s attempt %d failed with %s: %s; parking it (%s)",
                self.spec.queue,
                delivery.properties.message_id or "-",
                attempt,
                type(exc).__name__,
                copies.describe(exc)[:200],
                decision.reason,
            )
            self._park(delivery, decision.reason, attempt, exc)

    async def _retry(self, delivery: Delivery, attempt: int, delay: float) -> None:
        queue = self._retry_queues.get(delay)
        if queue is None:
            queue = names.retry_queue(self.spec.queue, delay)
            try:
                await self._ensure_retry_queue(self.spec, delay)
            except ConnectionLost:
                self.settlement.requeue(delivery.delivery_tag)  # the session is ending
                return
            except (TopologyConflict, ChannelClosed) as refused:
                # No retry queue, no retry: park it with the broker's answer.
                self._park(delivery, "not-retryable", attempt, refused)
                return
        self._send_copy(delivery, queue, copies.retry_headers(delivery, attempt))

    def _park(self, delivery: Delivery, reason: str, attempt: int, exc: BaseException | None) -> None:
        headers = copies.park_headers(delivery, reason, attempt, self.spec.queue, exc)
        self._send_copy(delivery, self._parked, headers)

    # -- copies: the original ends when the broker answered its copy ---------------------------

    def _send_copy(self, delivery: Delivery, queue: str, headers: dict[str, Any]) -> None:
        """Publish the copy; the original is settled when the broker answers, without keeping the
        handler's task (or its concurrency slot) for it."""
        properties = persistent_copy(delivery.properties, headers)
        future = self._copies.send(delivery.body, self._dlx, queue, properties)
        self._pending.add(future)
        future.add_done_callback(functools.partial(self._copy_answered, delivery, queue, properties))

    def _copy_answered(
        self, delivery: Delivery, queue: str, properties: Any, future: asyncio.Future[None]
    ) -> None:
        self._pending.discard(future)
        if future.cancelled():
            self.settlement.requeue(delivery.delivery_tag)
            return
        failure = future.exception()
        if failure is None:
            self.settlement.ack(delivery.delivery_tag)
            return
        # Anything else is sent again under the publish rules (backoff after a nack, a fresh channel
        # after a neighbour's channel error, the topology re-declared once for a missing exchange).
        again = asyncio.ensure_future(self._copy_again(delivery, queue, properties, failure))
        self._pending.add(again)
        again.add_done_callback(self._pending.discard)

    async def _copy_again(
        self, delivery: Delivery, queue: str, properties: Any, failure: BaseException
    ) -> None:
        tag = delivery.delivery_tag
        try:
            try:
                await self._copies.publish(delivery.body, self._dlx, queue, properties, after=failure)
            except UnencodableMessage:
                lean = copies.lean(properties.headers or {})
                if lean is None:
                    raise
                # The producer's headers and ours do not fit a frame: drop our traceback and error
                # text (the first to go; x-rf-exception still says what failed) and try again.
                properties = persistent_copy(delivery.properties, lean)
                await self._copies.publish(delivery.body, self._dlx, queue, properties)
        except ConnectionLost:
            self.settlement.requeue(tag)  # the session is ending: the broker redelivers it
            return
        except asyncio.CancelledError:
            self.settlement.requeue(tag)
            raise
        except (ChannelClosed, Unroutable, UnencodableMessage) as refused:
            # The broker refuses this copy for good (a user_id it does not let us publish, say),
            # or it cannot be written: reject the original instead, which its queue dead-letters
            # to the parking queue with every property and header intact.
            log.error(
                "queue %s: message %s: copy to %s refused (%s); rejecting it to %s",
                self.spec.queue,
                delivery.properties.message_id or "-",
                queue,
                refused,
                self._parked,
            )
            self.settlement.reject(tag)
            return
        except Exception:
            # Not a refusal we know: back to the queue rather than a reject that could be lost.
            log.exception("queue %s: copy to %s failed; requeueing the message", self.spec.queue, queue)
            self.settlement.requeue(tag)
            return
        self.settlement.ack(tag)
