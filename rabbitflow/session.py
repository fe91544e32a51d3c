"""A session: what the app holds on one connection — the publisher channel and the workers."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence

from . import names
from .consumer import ConsumerSpec
from .errors import PublishNacked, TopologyConflict
from .topology.applier import apply_plan
from .topology.compiler import Plan, retry_plan
from .transport.base import Channel, Properties, Transport
from .worker import ConsumerWorker, FailureHook

__all__ = ["Session"]

log = logging.getLogger("rabbitflow.session")


class Session:
    """Everything bound to one connection. A lost connection ends the session; the app opens
    a new one on the next node, and nothing of the old one (channels, delivery tags) is reused."""

    def __init__(self, transport: Transport, service: str, on_failure: FailureHook | None = None) -> None:
        self.transport = transport
        self.service = service
        self._on_failure = on_failure
        self.workers: list[ConsumerWorker] = []
        self._publisher: Channel | None = None
        self._publisher_lock = asyncio.Lock()
        self._retry_queues: set[str] = set()
        self._refused: dict[str, TopologyConflict] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def open(
        self,
        plan: Plan,
        specs: Sequence[ConsumerSpec],
        *,
        prefetch: int,
        concurrency: int,
    ) -> None:
        """Declare the whole plan before any consumer starts, then subscribe every consumer."""
        await apply_plan(plan, self.transport)
        await self.publisher()
        for spec in specs:
            channel = await self.transport.channel()
            worker = ConsumerWorker(
                spec,
                service=self.service,
                channel=channel,
                publish=self.publish_nowait,
                ensure_retry_queue=self.ensure_retry_queue,
                prefetch=spec.prefetch or prefetch,
                concurrency=spec.concurrency or concurrency,
                on_failure=self._on_failure,
            )
            await worker.start()
            self.workers.append(worker)

    async def publisher(self) -> Channel:
        channel = self._publisher
        if channel is not None and channel.is_open:
            return channel
        async with self._publisher_lock:
            if self._publisher is None or not self._publisher.is_open:
                self._publisher = await self.transport.channel()
            return self._publisher

    async def publish(self, body: bytes, exchange: str, routing_key: str, properties: Properties) -> None:
        channel = self._publisher
        if channel is None or not channel.is_open:
            channel = await self.publisher()
        # Awaited directly, not through `_watched`: App.publish's path, a future and two callbacks
        # per message cheaper.
        try:
            await channel.publish(body, exchange=exchange, routing_key=routing_key, properties=properties)
        except PublishNacked:
            self._retire(channel)
            raise

    def publish_nowait(
        self, body: bytes, exchange: str, routing_key: str, properties: Properties
    ) -> asyncio.Future[None]:
        """The publish's confirm as a future, without a task when the publisher channel is open."""
        channel = self._publisher
        if channel is None or not channel.is_open:
            return asyncio.ensure_future(self.publish(body, exchange, routing_key, properties))
        return self._watched(channel, body, exchange, routing_key, properties)

    def _watched(
        self, channel: Channel, body: bytes, exchange: str, routing_key: str, properties: Properties
    ) -> asyncio.Future[None]:
        """Publish on `channel`; a nack retires it (see `_retire`)."""
        future = channel.publish_nowait(
            body, exchange=exchange, routing_key=routing_key, properties=properties
        )
        future.add_done_callback(functools.partial(self._retire_if_nacked, channel))
        return future

    def _retire_if_nacked(self, channel: Channel, future: asyncio.Future[None]) -> None:
        if not future.cancelled() and isinstance(future.exception(), PublishNacked):
            self._retire(channel)

    def _retire(self, channel: Channel) -> None:
        """Seen on 3.10 after a failover: a channel whose quorum-queue client lost its leader keeps
        nacking every publish; a fresh channel gets through. Publishes still in flight on the old
        one are sent again by their callers."""
        if self._publisher is channel:
            self._publisher = None
            task = asyncio.get_running_loop().create_task(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

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
            await apply_plan(retry_plan(self.service, spec, delay), self.transport)
        except TopologyConflict as exc:
            log.error("queue %s: cannot declare its retry queue %s: %s", spec.queue, name, exc)
            self._refused[name] = TopologyConflict(
                str(exc), kind=exc.kind, name=exc.name, argument=exc.argument
            )
            raise
        self._retry_queues.add(name)

    @property
    def live_consumers(self) -> int:
        return sum(worker.live for worker in self.workers)

    async def stop(self, graceful_timeout: float) -> None:
        await asyncio.gather(*(w.stop(graceful_timeout) for w in self.workers))
        if self._publisher is not None:
            await self._publisher.close()

    async def abandon(self) -> None:
        await asyncio.gather(*(w.abandon() for w in self.workers))
