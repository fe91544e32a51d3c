"""A session: what the app holds on one node — a consuming and a publishing connection."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from rabbitflow import names
from rabbitflow.errors import ChannelClosed, TopologyConflict
from rabbitflow.middleware.base import Middleware
from rabbitflow.runtime.consumer import Consumer
from rabbitflow.runtime.partitions import PartitionGroup
from rabbitflow.runtime.publisher import Publisher
from rabbitflow.runtime.request import Requests
from rabbitflow.settings import Settings
from rabbitflow.spec import ConsumerSpec
from rabbitflow.topology.applier import apply_plan
from rabbitflow.topology.compiler import Plan, compile_plan, retry_plan
from rabbitflow.transport.base import QueueInfo
from rabbitflow.transport.connection import Links

__all__ = ["Session"]

log = logging.getLogger("rabbitflow.runtime.session")


def _settled(consumer: Consumer) -> int:
    return consumer.settlement.settled


class Session:
    """Everything bound to one pair of connections. A lost connection ends the session; the
    runtime opens a new one on the next node, and nothing of the old one is reused."""

    def __init__(
        self,
        links: Links,
        settings: Settings,
        plan: Plan,
        specs: tuple[ConsumerSpec, ...],
        middleware: tuple[Middleware, ...] = (),
        app: Any = None,
    ) -> None:
        self.links = links
        self.app = app  # what handlers' parameters annotated `App` receive
        self.settings = settings
        self.plan = plan
        self._specs = specs
        self._middleware = middleware
        known = [exchange.name for exchange in plan.exchanges]
        self.publisher = Publisher(links.publish, known=known)  # the app's own publishes
        self.copies = Publisher(links.publish, known=known, repair=self._repair)  # retry, parked copies
        # app.request: published on the app's publisher, replies consumed on the consuming connection
        self.requests = Requests(links.consume, self.publisher)
        self.consumers: list[Consumer] = []
        self.partitioned: list[PartitionGroup] = []
        self._retry_queues: set[str] = set()
        self._refused: dict[str, TopologyConflict] = {}
        self._repairing: asyncio.Task[None] | None = None
        self._ending: asyncio.Future[None] | None = None

    @property
    def node(self) -> str:
        return self.links.node

    async def open(self) -> None:
        """Declare the whole plan before any consumer starts, then subscribe every consumer. What
        does not wait on another goes at once: the publishers' channels open while the plan is
        declared, and the consumers subscribe side by side (each on a channel of its own)."""
        await asyncio.gather(
            apply_plan(self.plan, self.links.publish), self.publisher.channel(), self.copies.channel()
        )
        await asyncio.gather(*(self._open_consumer(spec) for spec in self._specs))
        order = {spec.queue: i for i, spec in enumerate(self._specs)}
        self.consumers.sort(key=lambda c: order[c.spec.queue])  # health() lists them as declared

    async def _open_consumer(self, spec: ConsumerSpec) -> None:
        if spec.partitions is not None:
            await self._open_partitions(spec)
            return
        s = self.settings
        channel = await self.links.consume.channel()
        consumer = Consumer(
            spec,
            service=s.name,
            channel=channel,
            copies=self.copies,
            onward=self.publisher,
            publish_timeout=s.publish_timeout,
            ensure_retry_queue=self.ensure_retry_queue,
            redeclare=self._redeclare,
            on_lost=self._lost,
            prefetch=spec.prefetch or s.prefetch,
            concurrency=spec.concurrency or s.concurrency,
            handler_timeout=spec.handler_timeout or s.handler_timeout,
            breaker=spec.breaker or s.breaker,
            middleware=self._middleware,
            app=self.app,
        )
        await consumer.start()
        consumer.subscription.watch(self._probe, functools.partial(_settled, consumer))
        self.consumers.append(consumer)  # now, so that a session that fails to open stops it

    async def _open_partitions(self, spec: ConsumerSpec) -> None:
        s = self.settings
        group = PartitionGroup(
            spec,
            service=s.name,
            links=self.links,
            copies=self.copies,
            concurrency=spec.concurrency or s.concurrency,
            handler_timeout=spec.handler_timeout or s.handler_timeout,
            publish_timeout=s.publish_timeout,
            release_timeout=s.graceful_timeout,
            on_lost=self._lost,
            onward=self.publisher,
            middleware=self._middleware,
            app=self.app,
        )
        await group.start()
        self.partitioned.append(group)

    def _lost(self, reason: BaseException | None) -> None:
        """A consumer's channel is gone while the connection stays: end the session (close the
        consuming connection), and the runtime opens a new one with every consumer subscribed."""
        if self._ending is None:
            self._ending = asyncio.ensure_future(self.links.consume.close())

    async def _repair(self) -> None:
        """The broker refused a copy for a missing exchange or route (an operator deleted the
        service's exchange, say): declare the plan again, once for all the copies that ask."""
        if self._repairing is None or self._repairing.done():
            self._repairing = asyncio.ensure_future(apply_plan(self.plan, self.links.publish))
        await asyncio.shield(self._repairing)

    async def _probe(self, spec: ConsumerSpec) -> QueueInfo | None:
        """The passive declare of a consumer's queue, on a channel of its own; None: 404."""
        channel = await self.links.publish.channel()
        try:
            return await channel.declare_queue(spec.queue, passive=True)
        except ChannelClosed as exc:
            if exc.code == 404:
                return None
            raise
        finally:
            await channel.close()

    async def _redeclare(self, spec: ConsumerSpec) -> None:
        """A consumer the broker cancelled: its own part of the plan, declared again."""
        await apply_plan(compile_plan(self.settings.name, (spec,)), self.links.consume)

    async def ensure_retry_queue(self, spec: ConsumerSpec, delay: float) -> None:
        """Declare a retry queue for a `Retry(delay=...)` the policy did not plan for. A queue the
        broker refused (`TopologyConflict`) is refused again at once for the rest of the session."""
        name = names.retry_queue(spec.queue, delay)
        if name in self._retry_queues:
            return
        refused = self._refused.get(name)
        if refused is not None:
            # A new exception each time: re-raising one object would grow its traceback, and keep
            # every refused delivery's frames alive with it.
            raise TopologyConflict(
                str(refused), kind=refused.kind, name=refused.name, argument=refused.argument
            )
        try:
            await apply_plan(retry_plan(self.settings.name, spec, delay), self.links.publish)
        except TopologyConflict as exc:
            log.error("queue %s: cannot declare its retry queue %s: %s", spec.queue, name, exc)
            self._refused[name] = TopologyConflict(
                str(exc), kind=exc.kind, name=exc.name, argument=exc.argument
            )
            raise
        self._retry_queues.add(name)

    async def stop(self, graceful_timeout: float) -> None:
        await asyncio.gather(
            *(c.stop(graceful_timeout) for c in self.consumers),
            *(g.stop(graceful_timeout) for g in self.partitioned),
        )
        await asyncio.gather(self.publisher.close(), self.copies.close(), self.requests.close())

    async def abandon(self) -> None:
        self.requests.abandon()
        await asyncio.gather(*(c.abandon() for c in self.consumers), *(g.abandon() for g in self.partitioned))
