"""An in-memory AMQP 0-9-1 broker on a virtual clock, for tests without RabbitMQ.

It behaves like RabbitMQ 3.10 where rabbitflow relies on it: exchanges and bindings, TTL with
head-of-queue expiry, dead-lettering with `x-death`, quorum delivery limits, prefetch,
ack/reject/requeue, mandatory returns and publisher confirms. `MemoryBroker(version="4.3")`
(or "3.13", "4.0") plays the documented differences of a later RabbitMQ instead: see
`_profile.py` and docs/compatibility.md. Time moves only when a test
calls `advance()` or `drain()`, so a 60 s retry delay costs nothing:

    broker = MemoryBroker()
    channel = await (await broker.connect()).channel()
    ...
    await broker.drain()  # deliver, expire and dead-letter until nothing is left to happen

A MemoryBroker is a `rabbitflow.transport.base.Broker`: hand it to an App with
`App(..., url="memory://", broker=MemoryBroker())` or `app.use_broker(broker)` before it starts.
An App with `url="memory://"` and no broker gets one that follows real time, so
`rabbitflow run app:app --url memory://` retries on schedule.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rabbitflow.transport.base import ConnectionLost, Delivery, OnDelivery, Properties
from rabbitflow.transport.memory.channel import MemoryChannel
from rabbitflow.transport.memory.connection import MemoryTransport
from rabbitflow.transport.memory.profile import VERSIONS, Profile, profile
from rabbitflow.transport.memory.queue import Consumer, MemoryQueue
from rabbitflow.transport.memory.routing import MemoryExchange
from rabbitflow.transport.memory.vhost import Dropped, Published, VHost

if TYPE_CHECKING:
    from rabbitflow.urls import Endpoint

__all__ = [
    "VERSIONS",
    "Dropped",
    "MemoryBroker",
    "MemoryChannel",
    "MemoryExchange",
    "MemoryQueue",
    "MemoryTransport",
    "Profile",
    "Published",
    "use_broker",
]

_log = logging.getLogger("rabbitflow.testing")

# Event-loop turns without broker activity that count as idle.
_QUIET_TURNS = 3


class _Budget:
    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self.left = max_steps


class MemoryBroker:
    """One vhost ("/") with its exchanges, queues and bindings, and a clock `now` in seconds."""

    def __init__(
        self,
        *,
        version: str = "3.10",
        epoch: datetime | None = None,
        realtime: bool = False,
        ack_grace: float = 0.05,
        consumer_timeout: float | None = None,
    ) -> None:
        """Create an empty broker (with the default and `amq.*` exchanges).

        version: the RabbitMQ whose behaviour to play: "3.10" (checked against a real 3.10 by the
            contract suite), "3.13", "4.0" (also 4.1 and 4.2) or "4.3"; anything else is a
            ValueError. `server_version` of its connections says "3.10.8", "3.13.7", "4.0.0", "4.3.0".
        consumer_timeout: seconds a consumer may hold a delivery unacked, as `consumer_timeout` in
            rabbitmq.conf (None: never; a real broker's default is 30 minutes, which `drain()` would
            otherwise jump to). A quorum queue's `x-consumer-timeout` argument (ms, 3.13+) wins.
            Up to 4.2 a timeout closes the channel (406); 4.3 sends the consumer basic.cancel
            (its `on_cancel`) and only quorum queues time out.

        epoch: the wall-clock time at `now == 0`, used for x-death `time` (default: now).
        realtime: let `now` also follow the event loop's clock from the first `connect()`, with
            timers expiring messages on schedule; `advance()` and `drain()` still jump ahead.
        ack_grace: real seconds `drain()` and `advance()` wait for acks while deliveries are
            unacked and nothing else happens (rabbitflow coalesces acks on a short timer); a
            consumer that holds messages on purpose costs this much per settle.
        """
        self.epoch = epoch or datetime.now(UTC).replace(microsecond=0)
        self.realtime = realtime
        self.ack_grace = ack_grace
        self.accepting = True  # False: connect() is refused, as by a node that is down
        self._offset = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._origin = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None
        self.profile: Profile = profile(version)
        self._vhost = VHost(self._clock, self.epoch, self._spawn, self.profile, consumer_timeout)
        self._vhost.after_pump = self._after_pump
        self._wake: asyncio.Event | None = None
        self._transports: list[MemoryTransport] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._errors: list[Exception] = []

    def __repr__(self) -> str:
        return (
            f"<MemoryBroker {self.version} now={self.now:g} queues={len(self.queues)} "
            f"connections={len(self._transports)}>"
        )

    @property
    def version(self) -> str:
        """The emulated RabbitMQ version ("3.10", "3.13", "4.0", "4.3")."""
        return self.profile.version

    # -- inspection ----------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """The virtual clock in seconds, from 0.0."""
        if self._loop is None:
            return self._offset
        return self._offset + self._loop.time() - self._origin

    @property
    def exchanges(self) -> dict[str, MemoryExchange]:
        return self._vhost.exchanges

    @property
    def queues(self) -> dict[str, MemoryQueue]:
        return self._vhost.queues

    @property
    def published(self) -> list[Published]:
        """Every publish the broker received, in order."""
        return self._vhost.published

    @property
    def dropped(self) -> list[Dropped]:
        """Every message that expired, was rejected or overflowed and was not dead-lettered."""
        return self._vhost.dropped

    def queue_names(self) -> list[str]:
        return sorted(self.queues)

    def messages(self, queue: str) -> list[tuple[Properties, bytes]]:
        """Copies of the messages ready in `queue`, head first (unacked ones are not listed)."""
        return self.queues[queue].messages()

    # -- connections ---------------------------------------------------------------------------

    async def connect(
        self,
        endpoint: Endpoint | None = None,
        *,
        timeout: float = 0.0,
        heartbeat: int = 0,
        name: str = "",
        ssl_context: ssl.SSLContext | None = None,
    ) -> MemoryTransport:
        """A connection, as `Broker.connect`; the endpoint and the options do not matter here."""
        if not self.accepting:
            raise ConnectionRefusedError("memory:// refuses connections (MemoryBroker.accepting is False)")
        if self.realtime and self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._origin = self._loop.time()
        transport = MemoryTransport(self._vhost)
        self._transports = [t for t in self._transports if t.is_open]
        self._transports.append(transport)
        await asyncio.sleep(0)
        return transport

    def disconnect_all(self) -> None:
        """Cut every connection as a network failure would: unacked messages return to their
        queues, running delivery callbacks are cancelled, `wait_closed()` returns ConnectionLost."""
        transports, self._transports = self._transports, []
        for transport in transports:
            transport._shutdown(ConnectionLost("connection to memory:// lost (MemoryBroker.disconnect_all)"))

    def lose_consumers(self, queue: str, *, delete: bool = False) -> int:
        """Forget the consumers of `queue` without a basic.cancel (and with `delete`, delete the
        queue too), as RabbitMQ 3.10 can after a quorum queue's leader moved: their channels wait
        for deliveries that never come. Returns how many consumers were lost."""
        q = self._vhost.queue(queue, None)
        lost = list(q.consumers)
        for consumer in lost:
            consumer.channel._forget_consumer(consumer.tag)
        if delete:
            self._vhost.remove_queue(q)
        return len(lost)

    # -- the clock -----------------------------------------------------------------------------

    async def advance(self, seconds: float, *, max_steps: int = 10_000) -> None:
        """Move the clock forward by `seconds`, one expiry at a time, settling after each."""
        if not seconds >= 0:
            raise ValueError(f"advance({seconds!r}): the clock only moves forward")
        target = self.now + seconds
        budget = _Budget(max_steps)
        await self._expire_until(target, budget)
        self._move_to(target)
        await self._settle(budget)

    async def drain(self, *, advance_clock: bool = True, max_steps: int = 10_000) -> None:
        """Run until idle: nothing deliverable and no delivery callback running. With
        `advance_clock`, also jump to each pending expiry until no queued message has a TTL.

        Exceptions raised by `on_delivery` callbacks are re-raised here (several as an
        ExceptionGroup). `max_steps` bounds the clock jumps and the rounds of deliveries in which
        no message was acked or dead-lettered, so a consumer that requeues forever fails the
        test instead of hanging it.
        """
        budget = _Budget(max_steps)
        if advance_clock:
            await self._expire_until(None, budget)
        else:
            await self._settle(budget)

    async def _expire_until(self, target: float | None, budget: _Budget) -> None:
        """Settle, then jump to each expiry due by `target` (None: every one) and settle again."""
        await self._settle(budget)
        while (due := self._vhost.next_expiry()) is not None and (target is None or due <= target + 1e-9):
            self._step(budget)
            self._move_to(due)
            self._vhost.expire_due()
            await self._settle(budget)

    def _clock(self) -> float:
        return self.now

    def _move_to(self, when: float) -> None:
        now = self.now
        if when > now:
            self._offset += when - now
            self._disarm()  # a pending timer was set for the old clock

    def _after_pump(self) -> None:
        if self.realtime:
            self._arm()
        if self._wake is not None:
            self._wake.set()

    def _arm(self) -> None:
        """Real time: keep one timer for the next expiry at the head of a queue."""
        due = self._vhost.next_expiry()
        if self._loop is None or due == self._timer_due:
            return
        self._disarm()
        if due is not None:
            self._timer_due = due
            self._timer = self._loop.call_at(self._origin + due - self._offset, self._fire)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_due = None

    def _fire(self) -> None:
        due = self._timer_due
        self._timer = self._timer_due = None
        if due is not None:
            self._move_to(due)  # the loop may fire a timer a hair early
        self._vhost.expire_due()

    # -- deliveries and idleness ---------------------------------------------------------------

    def _spawn(self, consumer: Consumer, delivery: Delivery) -> None:
        # Like aiormq: each delivery runs in its own task, which closing its channel cancels.
        task = asyncio.get_running_loop().create_task(
            self._invoke(consumer.on_delivery, delivery),
            name=f"memory-delivery:{consumer.queue.name}:{delivery.delivery_tag}",
        )
        channel_tasks = consumer.channel._tasks
        self._tasks.add(task)
        channel_tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(channel_tasks.discard)

    async def _invoke(self, on_delivery: OnDelivery, delivery: Delivery) -> None:
        try:
            await on_delivery(delivery)
        except Exception as exc:
            _log.error("on_delivery failed for delivery %d", delivery.delivery_tag, exc_info=exc)
            self._errors.append(exc)

    def _step(self, budget: _Budget) -> None:
        budget.left -= 1
        if budget.left < 0:
            self._raise_errors()
            raise RuntimeError(
                f"the memory broker did not settle within max_steps={budget.max_steps}: deliveries "
                "keep coming (a consumer that requeues forever?)"
            )

    async def _settle(self, budget: _Budget) -> None:
        """Wait until no delivery runs and nothing happened for a few event-loop turns."""
        if asyncio.current_task() in self._tasks:
            raise RuntimeError("drain() and advance() can't be awaited inside an on_delivery callback")
        vhost = self._vhost
        quiet = 0
        while True:
            vhost.pump()
            if self._tasks:
                progress = vhost.progress
                await asyncio.wait(set(self._tasks))
                if vhost.progress == progress:
                    self._step(budget)  # deliveries that settle nothing: a requeue loop?
                quiet = 0
                continue
            mark = vhost.activity
            await asyncio.sleep(0)
            if self._tasks or vhost.activity != mark:
                quiet = 0
                continue
            quiet += 1
            if quiet < _QUIET_TURNS:
                continue
            if not any(q.unacked_count for q in vhost.queues.values()) or not await self._woken():
                break
            quiet = 0
        self._raise_errors()

    async def _woken(self) -> bool:
        """Wait up to `ack_grace` for the next broker call (an ack on a timer); False if none came."""
        self._wake = asyncio.Event()
        try:
            await asyncio.wait_for(self._wake.wait(), self.ack_grace)
        except TimeoutError:
            return False
        finally:
            self._wake = None
        return True

    def _raise_errors(self) -> None:
        errors, self._errors = self._errors, []
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ExceptionGroup(f"{len(errors)} on_delivery callbacks failed", errors)


def use_broker(app: Any, broker: MemoryBroker) -> MemoryBroker:
    """`app.use_broker(broker)`, returning the broker; kept for tests written before that."""
    app.use_broker(broker)
    return broker
