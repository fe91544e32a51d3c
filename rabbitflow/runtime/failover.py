"""The runtime: a running App's sessions across failovers, and the truth about them (`health`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from rabbitflow.errors import ConnectionLost, TransportError
from rabbitflow.middleware.base import Middleware
from rabbitflow.runtime.consumer import Consumer
from rabbitflow.runtime.session import Session
from rabbitflow.settings import Settings
from rabbitflow.spec import ConsumerSpec
from rabbitflow.topology.compiler import Plan
from rabbitflow.transport.base import Broker
from rabbitflow.transport.connection import ConnectionManager, Links

__all__ = ["Runtime"]

log = logging.getLogger("rabbitflow")

T = TypeVar("T")

# A session that dies sooner than this after it opened counts as a failed connect: the next one
# waits with the manager's backoff (a message that kills the connection must not loop at once).
_SHORT_LIVED = 2.0


def session_timeout(settings: Settings, plan: Plan, consumers: int) -> float:
    """Seconds one node gets to declare the plan and subscribe every consumer: it grows with the
    topology (a quorum queue's declaration takes tens of ms on a busy node)."""
    base = max(10.0, 2 * settings.connect_timeout)
    return (
        base + 0.05 * len(plan.queues) + 0.01 * (len(plan.exchanges) + len(plan.bindings)) + 0.02 * consumers
    )


class Runtime:
    """Opens a session on the first node that accepts one; when either of its connections goes,
    abandons it and opens the next one elsewhere, re-declaring the topology and re-subscribing
    every consumer."""

    def __init__(
        self,
        settings: Settings,
        plan: Plan,
        specs: tuple[ConsumerSpec, ...],
        broker: Broker,
        middleware: tuple[Middleware, ...] = (),
        app: Any = None,
    ) -> None:
        self.settings = settings
        self.app = app
        self.plan = plan
        self._specs = specs
        self._middleware = middleware
        self.manager = ConnectionManager(
            settings.endpoints,
            broker,
            failover=settings.failover,
            connect_timeout=settings.connect_timeout,
            heartbeat=settings.heartbeat,
            name=settings.name,
            ssl_context=settings.ssl_context,
        )
        self.timeout = session_timeout(settings, plan, len(specs))
        self.session: Session | None = None
        self._up = asyncio.Event()
        self.reconnects = 0
        self._watch: asyncio.Task[None] | None = None

    @property
    def live(self) -> Session | None:
        """The session, if both its connections are up right now."""
        session = self.session
        if session is not None and self._up.is_set() and session.links.is_open:
            return session
        return None

    async def start(self, budget: float) -> None:
        links = await self.manager.connect_links(budget)
        try:
            self.session = await self._open(links)
        except BaseException:
            await links.close()
            raise
        self._up.set()
        self._watch = asyncio.get_running_loop().create_task(
            self._follow(), name=f"rabbitflow:{self.settings.name}:runtime"
        )

    async def stop(self, graceful_timeout: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        session = self.session
        if session is not None:
            await session.stop(graceful_timeout)  # still live: finishing handlers may publish
            self._up.clear()
            self.session = None
            await session.links.close()

    async def wait_live(self, deadline: float) -> Session:
        """The live session, waiting for a reconnect until `deadline` (loop time); TimeoutError after."""
        loop = asyncio.get_running_loop()
        while (session := self.live) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._up.wait(), remaining)
        return session

    async def on_live(self, deadline: float, operation: Callable[..., Awaitable[T]], *args: Any) -> T:
        """`operation(session, *args)` on the live session, and again on the next one each time a lost
        connection interrupts it, until it returns; TimeoutError at `deadline` (loop time). The one
        deadline loop of `app.publish` and `app.request`: an interrupted publish's outcome is
        unknown, so it is sent again (duplicates possible, loss not)."""
        async with asyncio.timeout_at(deadline):
            while True:
                session = self.live or await self.wait_live(deadline)
                try:
                    return await operation(session, *args)
                except ConnectionLost as exc:
                    log.info("%s: interrupted (%s); again on the next session", self.settings.name, exc)
                    await asyncio.sleep(0)

    async def _open(self, links: Links) -> Session:
        """Declare and subscribe on `links`. Bounded: a node whose quorum queues are still
        electing a leader can leave a declaration unanswered, and then the next node is better."""
        session = Session(links, self.settings, self.plan, self._specs, self._middleware, self.app)
        try:
            async with asyncio.timeout(self.timeout):
                await session.open()
        except TimeoutError:
            await session.abandon()
            raise ConnectionLost(
                f"{links.node} did not finish declaring the topology and subscribing within "
                f"{self.timeout:.0f}s"
            ) from None
        except BaseException:
            await session.abandon()
            raise
        return session

    async def _follow(self) -> None:
        """Wait for a connection to go; fail over to the next node and resubscribe."""
        name = self.settings.name
        loop = asyncio.get_running_loop()
        short_lived = 0
        while True:
            session = self.session
            assert session is not None
            opened = loop.time()
            reason = await session.links.wait_closed()
            self._up.clear()
            log.warning(
                "%s: connection to %s lost (%s); failing over", name, session.node, reason or "closed"
            )
            await session.abandon()
            await session.links.close()
            short_lived = short_lived + 1 if loop.time() - opened < _SHORT_LIVED else 0
            if short_lived:
                pause = self.manager.pause(short_lived)
                log.info("%s: the last session lasted under %.0fs; waiting %.1fs", name, _SHORT_LIVED, pause)
                await asyncio.sleep(pause)
            self.session = session = await self._reopen()
            self.reconnects += 1
            self._up.set()
            log.info("%s: resumed on %s with %d consumer(s)", name, session.node, len(session.consumers))

    async def _reopen(self) -> Session:
        """A new session on the next node that accepts one; keeps trying until it gets one."""
        failures = 0
        while True:
            try:
                links = await self.manager.connect_links(None)
            except Exception as exc:  # a refused login, say: keep trying, loudly
                failures += 1
                log.error("%s: cannot connect: %s", self.settings.name, exc)
                await asyncio.sleep(self.manager.pause(failures))
                continue
            try:
                return await self._open(links)
            except asyncio.CancelledError:
                await links.close()
                raise
            except Exception as exc:
                failures += 1
                log.error("%s: cannot resume on %s: %s", self.settings.name, links.node, exc)
                await links.close()
                # The node answered but the session failed (a conflict, a channel error): pause
                # before the next node, as the manager does after a failed cycle.
                await asyncio.sleep(self.manager.pause(failures))

    async def ensure(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        max_retries: int | None,
        errback: Callable[[BaseException, int], Any] | None,
        timeout: float,
    ) -> T:
        """`App.ensure`: `fn(channel, *args)` on a fresh aio-pika channel, run again on the next
        node when the connection goes meanwhile."""
        loop = asyncio.get_running_loop()
        limit = timeout
        retries = 0
        while True:
            deadline = loop.time() + limit
            session = await self.wait_live(deadline)
            transport = session.links.publish
            try:
                channel = await transport.native_channel()
                try:
                    return await fn(channel, *args)
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
            except Exception as exc:
                if transport.is_open and not isinstance(exc, TransportError):
                    raise  # the operation failed on a healthy connection: not ours to retry
                retries += 1
                if max_retries is not None and retries > max_retries:
                    raise
                if errback is not None:
                    errback(exc, retries)
                log.info(
                    "%s: operation interrupted by %s; retry %d on the next node",
                    self.settings.name,
                    type(exc).__name__,
                    retries,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(transport.wait_closed(), limit)

    # -- health ----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        session = self.live
        consumers = [self._consumer_health(c) for c in session.consumers] if session is not None else []
        partitioned = [g.health() for g in session.partitioned] if session is not None else []
        return {
            "connected": session is not None,
            "node": session.node if session is not None else None,
            "blocked": bool(session is not None and session.links.publish.blocked),
            "server_version": session.links.consume.server_version if session is not None else None,
            "reconnects": self.reconnects,
            "healthy": session is not None and all(c["healthy"] for c in consumers + partitioned),
            "consumers": consumers,
            "partitioned": partitioned,  # ordered partitions: this replica's share of each
        }

    def _consumer_health(self, consumer: Consumer) -> dict[str, Any]:
        loop_now = asyncio.get_running_loop().time()
        settlement = consumer.settlement
        oldest = settlement.oldest()
        last = settlement.last_settled
        bound = self.settings.stall_after(consumer.spec.handler_timeout)
        # Stalled: holding deliveries, and nothing settled since the oldest of them arrived for
        # longer than the bound.
        progress = max(oldest or 0.0, last or 0.0)
        stalled = oldest is not None and loop_now - progress > bound
        return {
            "queue": consumer.spec.queue,
            "subscribed": consumer.subscribed,
            "cancelled_since": _wall(consumer.subscription.cancelled_since, loop_now),
            "resubscribed": consumer.subscription.resubscribed,
            "in_flight": settlement.held,
            "running": consumer.running,
            "oldest_unsettled_age": None if oldest is None else round(loop_now - oldest, 3),
            "last_settled": _wall(last, loop_now),
            "settled": settlement.settled,
            "stalled": stalled,
            "stall_after": bound,
            "breaker": _breaker(consumer, loop_now),
            # A consumer its breaker paused is where it should be while its downstream is down.
            "healthy": (consumer.subscribed or consumer.paused) and not stalled,
        }


def _breaker(consumer: Consumer, loop_now: float) -> dict[str, Any] | None:
    circuit = consumer.circuit
    if circuit is None:
        return None
    return {
        "state": circuit.state.value,
        "since": _wall(circuit.opened_at, loop_now),
        "reason": circuit.reason or None,  # None once closed again
        "last_trip": circuit.last_trip or None,
        "trips": circuit.trips,
    }


def _wall(loop_time: float | None, loop_now: float) -> str | None:
    """A loop time as ISO 8601 UTC wall-clock time."""
    if loop_time is None:
        return None
    when = time.time() - (loop_now - loop_time)
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
