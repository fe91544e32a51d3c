"""The consumer: one queue on one channel, from each delivery to its settlement.

Hot path: `_on_delivery`, `_handle` and the handler call (`Invocation.call`, shared with
partitioned consumers) run once per message; the consume benchmark (`benchmarks/`, scenarios
consume and mixed) measures them against a plain aiormq loop. They avoid per-message tasks,
timers and allocations they do not need (no timeout scope without a handler timeout, no
semaphore when prefetch already bounds concurrency, no Message unless the handler asks for one).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from rabbitflow import names
from rabbitflow.breaker import Breaker, BreakerState, Circuit, Switch
from rabbitflow.errors import (
    ChannelClosed,
    ConnectionLost,
    DecodeError,
    TopologyConflict,
)
from rabbitflow.message import DUPLICATE, Message
from rabbitflow.middleware.base import Fate, Middleware
from rabbitflow.retry import Action, Decision, decide
from rabbitflow.runtime import copies
from rabbitflow.runtime.copies import Copier
from rabbitflow.runtime.invocation import Invocation, expired, threads_for
from rabbitflow.runtime.publisher import Publisher
from rabbitflow.runtime.quarantine import delivery_key, quarantine_from_env
from rabbitflow.runtime.settlement import Settlement
from rabbitflow.runtime.subscription import Redeclare, Subscription
from rabbitflow.spec import ConsumerSpec
from rabbitflow.transport.base import Channel, Delivery

__all__ = ["Consumer"]

log = logging.getLogger("rabbitflow.runtime.consumer")

EnsureRetryQueue = Callable[[ConsumerSpec, float], Awaitable[None]]

# Park a message ourselves, with full headers, before the quorum queue's own backstop would.
PARK_AFTER_DELIVERIES = names.DELIVERY_LIMIT // 2
_CANCEL_GRACE = 1.0  # seconds cancelled handlers get to end before a stop or failover goes on


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
        onward: Publisher | None = None,
        publish_timeout: float = 10.0,
        ensure_retry_queue: EnsureRetryQueue,
        redeclare: Redeclare,
        on_lost: Callable[[BaseException | None], None] = lambda reason: None,
        prefetch: int,
        concurrency: int,
        handler_timeout: float | None,
        breaker: Breaker | None = None,
        middleware: tuple[Middleware, ...] = (),
        app: Any = None,
    ) -> None:
        self.spec = spec
        self._invocation = invocation = Invocation(
            spec,
            app=app,
            middleware=middleware,
            onward=onward,
            publish_timeout=publish_timeout,
            threads=threads_for(spec, concurrency),
        )
        self._call = invocation.call  # bound once: the hot path calls it per message
        self._observed = invocation.observed
        self._dlx = names.dead_letter_exchange(service)
        self._parked = names.parked_queue(spec.queue)
        # The planned retry queues by delay, named once rather than on every failure.
        self._retry_queues = {d: names.retry_queue(spec.queue, d) for d in spec.policy.distinct_delays}
        self._channel = channel
        self._ensure_retry_queue = ensure_retry_queue
        self._timeout = handler_timeout
        # Prefetch already bounds how many deliveries run at once; a semaphore only when tighter.
        self._limit = asyncio.Semaphore(concurrency) if concurrency < prefetch else None
        self.settlement = Settlement(channel, prefetch=prefetch)
        self._copier = Copier(copies, self.settlement, queue=spec.queue, dlx=self._dlx, parked=self._parked)
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.circuit = Circuit(breaker) if breaker is not None else None
        self.subscription = Subscription(
            channel,
            spec,
            on_delivery=self._on_delivery,
            prefetch=prefetch,
            redeclare=redeclare,
            on_lost=on_lost,
            circuit=self.circuit,
        )
        self._switch = (
            Switch(self.circuit, spec.queue, pause=self.subscription.pause, consume=self.subscription.consume)
            if self.circuit is not None
            else None
        )
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._idle.set()
        # The crash journal (`RABBITFLOW_CRASH_JOURNAL`, set by `run --workers`): a message that
        # kills its worker is found and parked alone.
        self._quarantine = quarantine_from_env()

    @property
    def subscribed(self) -> bool:
        return self.subscription.subscribed and not self._stopping

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

    async def start(self) -> None:
        await self.subscription.start()

    async def stop(self, timeout: float) -> None:
        """Take no new deliveries, let running handlers finish within `timeout`, then close."""
        self._stopping = True
        self.subscription.stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._switch is not None:
            self._switch.quiet()
        await self.subscription.end(timeout)
        try:
            if not self._idle.is_set():  # (a deadline already past would time out even when idle)
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
        while self._copier.pending and loop.time() < deadline + timeout:
            await asyncio.wait(set(self._copier.pending), timeout=deadline + timeout - loop.time())
        for future in list(self._copier.pending):
            future.cancel()
        await self.settlement.flush()
        await self._channel.close()

    async def abandon(self) -> None:
        """The session is gone: cancel running handlers; their messages come back anyway."""
        self._stopping = True
        self.subscription.stopping = True
        if self._switch is not None:
            self._switch.quiet()
        self.subscription.abort()
        await self._cancel_handlers()
        for future in list(self._copier.pending):
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

    # -- the hot path --------------------------------------------------------------------------

    async def _on_delivery(self, delivery: Delivery) -> None:
        tag = delivery.delivery_tag
        settlement = self.settlement
        settlement.received(tag)
        if self._stopping:
            settlement.requeue(tag)
            return
        task = asyncio.current_task(self._loop)  # with the loop: no getpid() per call on 3.11
        assert task is not None
        tasks = self._tasks
        if not tasks:
            self._idle.clear()
        tasks.add(task)
        handle = self._handle if self._quarantine is None else self._handle_journaled
        try:
            if self._limit is None:
                await handle(delivery)
            else:
                async with self._limit:
                    if self._stopping:
                        settlement.requeue(tag)  # waited for a slot while stopping: never started
                        return
                    await handle(delivery)
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

    async def _handle_journaled(self, delivery: Delivery) -> None:
        """`_handle` in the crash journal: a suspect runs alone, a convicted killer is parked."""
        quarantine = self._quarantine
        assert quarantine is not None
        key = delivery_key(self.spec.queue, delivery)
        alone = False
        if delivery.redelivered:
            convictions, alone = quarantine.verdict(key)
            if convictions >= quarantine.convictions:
                self._park_killer(delivery, convictions)
                return
        async with quarantine.running(key, alone=alone):
            if alone:
                log.warning(
                    "queue %s: message %s was running when a worker died; running it alone",
                    self.spec.queue,
                    delivery.properties.message_id or "-",
                )
            await self._handle(delivery)

    def _park_killer(self, delivery: Delivery, convictions: int) -> None:
        spec = self.spec
        headers = delivery.properties.headers or {}
        attempt = copies.attempt(delivery, headers, spec.queue, spec.policy.retries) if headers else 1
        message = Message.of(delivery, headers, attempt, spec.queue) if self._observed else None
        why = f"its handler killed the worker process {convictions} time(s) while running alone"
        self._park_unread(delivery, "worker-crash", attempt, None, message, why)

    async def _handle(self, delivery: Delivery) -> None:
        """Run the handler once and carry out the decision; every path ends the delivery in
        `settlement`, at once or when its copy is answered."""
        spec = self.spec
        properties = delivery.properties
        headers = properties.headers or {}
        attempt = copies.attempt(delivery, headers, spec.queue, spec.policy.retries) if headers else 1
        if headers and names.DEADLINE in headers and expired(headers):
            # The caller of this request has given up: nobody would read the answer.
            log.info(
                "queue %s: request %s expired before its attempt %d (its caller gave up); dropping it",
                spec.queue,
                properties.message_id or "-",
                attempt,
            )
            self.settlement.ack(delivery.delivery_tag)
            return
        message = self._invocation.received(delivery, headers, attempt)
        try:
            if delivery.undecodable is not None:  # properties the client cannot decode
                raise DecodeError(f"its properties: {delivery.undecodable}")
            body = spec.signature.read(delivery.body, properties.content_type)
        except DecodeError as exc:
            why = f"cannot be decoded: {copies.describe(exc)[:200]}"
            self._park_unread(delivery, "decode-error", attempt, exc, message, why)
            return
        if delivery.redelivered and copies.delivery_count(headers) >= PARK_AFTER_DELIVERIES:
            count = copies.delivery_count(headers)
            self._park_unread(delivery, "delivery-limit", attempt, None, message, f"delivered {count} times")
            return
        scope = None
        try:
            if self._timeout is None:
                result = await self._call(delivery, body, headers, attempt, message)
            else:
                async with (scope := asyncio.timeout(self._timeout)):
                    result = await self._call(delivery, body, headers, attempt, message)
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
            await self._fail(delivery, attempt, exc, message)
            return
        self.settlement.ack(delivery.delivery_tag)
        if self._switch is not None:
            self._switch.attempted(None)
        if message is not None:
            self._invocation.settled(message, Fate.DUPLICATE if result is DUPLICATE else Fate.HANDLED)

    # -- the failure path ----------------------------------------------------------------------

    async def _fail(
        self, delivery: Delivery, attempt: int, exc: BaseException, message: Message | None
    ) -> None:
        self._invocation.failed(attempt, exc)
        decision: Decision = decide(self.spec.policy, attempt, exc)
        retry = decision.action is Action.RETRY
        log.log(
            logging.INFO if retry else logging.WARNING,
            "queue %s: message %s attempt %d failed with %s: %s; %s",
            self.spec.queue,
            delivery.properties.message_id or "-",
            attempt,
            type(exc).__name__,
            copies.describe(exc)[:200],
            f"retrying in {decision.delay}s" if retry else f"parking it ({decision.reason})",
        )
        if not retry:
            self._park(delivery, decision.reason, attempt, exc, message)
            return
        self._invocation.settled(message, Fate.RETRIED, exc, delay=decision.delay)
        await self._retry(delivery, attempt, decision.delay)

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
        self._copier.send(delivery, queue, copies.retry_headers(delivery, attempt))

    def _park_unread(
        self,
        delivery: Delivery,
        reason: str,
        attempt: int,
        exc: BaseException | None,
        message: Message | None,
        why: str,
    ) -> None:
        """Park a delivery its handler never saw (undecodable, or delivered too often)."""
        message_id = delivery.properties.message_id or "-"
        log.warning(
            "queue %s: message %s attempt %d: %s; parking it (%s)",
            self.spec.queue,
            message_id,
            attempt,
            why,
            reason,
        )
        self._park(delivery, reason, attempt, exc, message)

    def _park(
        self,
        delivery: Delivery,
        reason: str,
        attempt: int,
        exc: BaseException | None,
        message: Message | None = None,
    ) -> None:
        self._invocation.settled(message, Fate.PARKED, exc, reason=reason)
        self._invocation.refused(delivery, reason, exc)  # the caller learns it now, not at its timeout
        headers = copies.park_headers(delivery, reason, attempt, self.spec.queue, exc)
        self._copier.send(delivery, self._parked, headers)
