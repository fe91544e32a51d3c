"""A consumer's subscription on its channel: one at a time, whoever changes it.

Four things change it: the start, a `basic.cancel` from the broker (subscribe again once the
consumer's topology is declared again), the breaker (pause, probe with a prefetch of 1, resume)
and the stop. They run one after another, never cancelled halfway: a cancelled basic.consume or
basic.cancel makes aiormq close the channel, which would cancel every handler still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from rabbitflow.breaker import BreakerState, Circuit
from rabbitflow.errors import ConnectionLost, TopologyConflict, TransportError
from rabbitflow.spec import ConsumerSpec
from rabbitflow.transport.base import Channel, OnDelivery, QueueInfo

__all__ = ["IDLE_PROBE", "Probe", "Redeclare", "Subscription"]

log = logging.getLogger("rabbitflow.runtime.consumer")

Redeclare = Callable[[ConsumerSpec], Awaitable[None]]
Probe = Callable[[ConsumerSpec], Awaitable[QueueInfo | None]]

# Seconds a subscribed consumer may go without a delivery before it asks the broker whether its
# queue (and its place on it) is still there.
IDLE_PROBE = 30.0


class Subscription:
    """The consumer tag of `spec.queue` on `channel`, and every change to it, in order."""

    def __init__(
        self,
        channel: Channel,
        spec: ConsumerSpec,
        *,
        on_delivery: OnDelivery,
        prefetch: int,
        redeclare: Redeclare,
        on_lost: Callable[[BaseException | None], None],
        circuit: Circuit | None,
    ) -> None:
        self._channel = channel
        self._spec = spec
        self._queue = spec.queue
        self._on_delivery = on_delivery
        self._prefetch = prefetch
        self._redeclare = redeclare
        self._on_lost = on_lost
        self._circuit = circuit
        self._tag: str | None = None
        self._changing: asyncio.Task[None] | None = None  # the last change queued
        self._watching: asyncio.Task[None] | None = None
        self._probe: Probe | None = None
        self.stopping = False
        self.cancelled_since: float | None = None  # loop time the broker cancelled it
        self.resubscribed = 0

    @property
    def subscribed(self) -> bool:
        return self._tag is not None and self._channel.is_open

    async def start(self, *, prefetch: int | None = None) -> None:
        if self._tag is not None:
            tag, self._tag = self._tag, None
            await self._channel.cancel(tag)
        self._tag = await self._channel.consume(
            self._queue,
            self._on_delivery,
            prefetch=self._prefetch if prefetch is None else prefetch,
            on_cancel=self._on_cancel,
        )
        log.debug(
            "queue %s: consuming (prefetch %d, consumer tag %s)",
            self._queue,
            self._prefetch if prefetch is None else prefetch,
            self._tag,
        )
        self._channel.on_close(self._channel_closed)

    def watch(self, probe: Probe, activity: Callable[[], int]) -> None:
        """Check an idle subscription against the broker every IDLE_PROBE seconds: `activity()`
        counts what the consumer settled, `probe(spec)` is the queue's passive declare (None: no
        such queue).

        RabbitMQ does not always tell a consumer that it lost its queue: on 3.10, a quorum queue
        deleted after its leader moved to the consumer's node leaves the consumer registered on
        its channel, without a basic.cancel, and it waits for deliveries that never come (seen
        in the chaos soak). A consumer nothing is delivered to looks exactly like an idle one;
        only asking tells them apart."""
        self._probe = probe
        self._watching = asyncio.get_running_loop().create_task(self._watch(probe, activity))

    async def _watch(self, probe: Probe, activity: Callable[[], int]) -> None:
        loop = asyncio.get_running_loop()
        seen, quiet_since = activity(), loop.time()
        while not self.stopping:
            # Looked at every few seconds, so the probe comes IDLE_PROBE after the last settlement
            # (not up to twice that, as fixed windows of IDLE_PROBE would have it).
            await asyncio.sleep(IDLE_PROBE / 6)
            now = activity()
            if now != seen or self._tag is None or not self._channel.is_open:
                seen, quiet_since = now, loop.time()
                continue  # busy, paused or resubscribing: nothing to ask
            if loop.time() - quiet_since < IDLE_PROBE:
                continue
            quiet_since = loop.time()
            try:
                info = await probe(self._spec)
            except (TransportError, TopologyConflict):
                continue  # the session's own watch will see a lost connection
            if self._tag is None or self.stopping:
                continue
            if info is None:
                self._lost_consumer("the queue is gone but the broker never cancelled the consumer")
            elif info.consumer_count == 0:
                self._lost_consumer("the queue has no consumer though ours is subscribed")
            elif self._circuit is None or self._circuit.state is BreakerState.CLOSED:
                # The queue is there with consumers, but ours may be a ghost on a queue deleted and
                # declared again meanwhile (by another app of the service): subscribe afresh. On
                # RabbitMQ 3.10 cancelling a ghost crashes its channel, and the session restarts.
                self._then(self._rearm)

    async def end(self, timeout: float) -> None:
        """The stop: let the change under way finish (within `timeout`), then cancel the tag."""
        self.stopping = True
        if self._watching is not None:
            self._watching.cancel()
        if self._changing is not None:
            await asyncio.wait({self._changing}, timeout=timeout)
        await self._unsubscribe()

    def abort(self) -> None:
        """The session is gone: its channel with it, so a change under way may be cancelled."""
        self.stopping = True
        if self._watching is not None:
            self._watching.cancel()
        if self._changing is not None:
            self._changing.cancel()

    def pause(self) -> None:
        self._then(self._unsubscribe)

    def consume(self, prefetch: int | None) -> None:
        self._then(lambda: self._subscribe(prefetch))

    def _then(self, step: Callable[[], Awaitable[None]]) -> None:
        previous = self._changing

        async def in_order() -> None:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            if not self.stopping and self._channel.is_open:
                await step()

        self._changing = asyncio.get_running_loop().create_task(in_order())

    async def _unsubscribe(self) -> None:
        tag, self._tag = self._tag, None
        if tag is not None:
            log.debug("queue %s: cancelling consumer tag %s", self._queue, tag)
        if tag is not None and self._channel.is_open:
            with contextlib.suppress(TransportError):
                await self._channel.cancel(tag)

    async def _subscribe(self, prefetch: int | None) -> None:
        """Subscribe with this prefetch (None: the consumer's own), declaring the consumer's
        topology again first if the broker cancelled it; keeps trying with a backoff."""
        failures = 0
        while not self.stopping and self._channel.is_open:
            try:
                if self.cancelled_since is not None:
                    await self._redeclare(self._spec)
                    if not await self._still_there():
                        continue
                await self.start(prefetch=prefetch)
            except (TransportError, TopologyConflict) as exc:
                failures += 1
                log.error("queue %s: cannot subscribe: %s", self._queue, exc)
                await asyncio.sleep(min(10.0, 0.2 * 2**failures))
                continue
            if self.cancelled_since is not None:
                self.resubscribed += 1
                self.cancelled_since = None
                log.info("queue %s: consuming again", self._queue)
            return

    async def _still_there(self) -> bool:
        """After a broker cancel and a declare: is the queue there a moment later? RabbitMQ 4.0
        cancels a deleted queue's consumers before the deletion is complete, and a declare then
        answers declare-ok for the queue on its way out; the basic.consume that follows gets 404,
        which closes the consumer's channel (and so the session). Seen on 4.0.5 (docs/compatibility.md)."""
        if self._probe is None or not self._channel.deletion_lag:
            return True
        await asyncio.sleep(self._channel.deletion_lag)
        if await self._probe(self._spec) is not None:
            return True
        log.info("queue %s: still being deleted; declaring it again", self._queue)
        return False

    async def _rearm(self) -> None:
        if self._tag is None:
            return
        try:
            await self.start()
        except TransportError as exc:
            log.info("queue %s: cannot subscribe afresh (%s)", self._queue, exc)

    def _on_cancel(self) -> None:
        """basic.cancel from the broker: the queue was deleted, or (4.3) a consumer timeout or a
        leader move. Deliveries already made stay the consumer's to settle; consuming starts again
        once the consumer's topology is declared again — unless the breaker holds it paused, and
        then its probe declares it."""
        self._lost_consumer("the broker cancelled the consumer")

    def _lost_consumer(self, why: str) -> None:
        self._tag = None
        if self.stopping:
            return
        self.cancelled_since = asyncio.get_running_loop().time()
        circuit = self._circuit
        if circuit is not None and circuit.state is BreakerState.OPEN:
            log.warning("queue %s: %s (paused by its breaker)", self._queue, why)
            return
        log.warning("queue %s: %s; declaring it again", self._queue, why)
        probing = circuit is not None and circuit.state is BreakerState.HALF_OPEN
        self.consume(1 if probing else None)

    def _channel_closed(self, reason: BaseException | None) -> None:
        """The channel went while the session goes on (a consumer timeout on 3.13+, a channel
        error): nothing would consume the queue again, so the session ends and the runtime opens
        a new one."""
        if not self.stopping:
            if isinstance(reason, ConnectionLost):  # the runtime says so once, at WARNING
                log.debug("queue %s: the consumer's channel went with its connection", self._queue)
            else:
                log.error("queue %s: the broker closed the consumer's channel (%s)", self._queue, reason)
            self._on_lost(reason)
