"""Operator work on a service's topology and parking queues, on a connection of its own.

Used by `App.declare/check/parked/replay/purge/delete` and by the CLI; it works whether or not the
service runs, from any machine that reaches the broker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from . import names
from .compat import concerns
from .connection import ConnectionManager
from .errors import ChannelClosed, ConfigError
from .parking import ParkedMessage, peek, replay
from .topology.applier import Difference, apply_plan, check_plan
from .topology.compiler import Plan
from .transport.base import Transport

__all__ = ["Admin", "Inspection"]

log = logging.getLogger("rabbitflow.admin")


@dataclass(frozen=True, slots=True)
class Inspection:
    node: str
    server_version: str
    differences: list[Difference]
    concerns: list[str]


class Admin:
    """What an operator does to one service's objects; each call opens and closes a connection."""

    def __init__(self, plan: Plan, manager: ConnectionManager, *, budget: float) -> None:
        self.plan = plan
        self._manager = manager
        self._budget = budget

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Transport]:
        """A connection of its own, to the first node that accepts."""
        transport = await self._manager.connect(self._budget)
        try:
            yield transport
        finally:
            await transport.close()

    def _consumed(self, queue: str) -> str:
        """`queue` as the consumer's queue; its parking queue's name is accepted too."""
        consumed = {c.queue for c in self.plan.consumers}
        if queue not in consumed and queue.endswith(".parked") and queue[: -len(".parked")] in consumed:
            return queue[: -len(".parked")]
        if queue not in consumed:
            known = ", ".join(sorted(consumed)) or "none"
            raise ConfigError(
                f"queue {queue!r} has no consumer in service {self.plan.service!r} (its queues: {known})"
            )
        return queue

    async def declare(self) -> str:
        """Declare the plan without consuming; returns the node."""
        async with self.connection() as transport:
            await apply_plan(self.plan, transport)
            return transport.node

    async def check(self) -> tuple[str, list[Difference]]:
        """Compare the plan with a live node, changing nothing; returns the node and the differences."""
        report = await self.inspect()
        return report.node, report.differences

    async def inspect(self) -> Inspection:
        """`check`, plus the node's RabbitMQ version and what the plan relies on that this
        version does not do or does differently (`compat.concerns`)."""
        async with self.connection() as transport:
            differences = await check_plan(self.plan, transport)
            version = transport.server_version
        return Inspection(
            transport.node, version, differences, concerns(self.plan, version) if version else []
        )

    async def parked(self, queue: str, *, limit: int = 100) -> list[ParkedMessage]:
        """Up to `limit` messages parked for the consumer of `queue`, head first; they stay parked."""
        queue = self._consumed(queue)
        async with self.connection() as transport:
            return await peek(transport, queue, limit)

    async def replay(self, queue: str, *, limit: int | None = None) -> int:
        """Send parked messages of `queue` back; each leaves the parking queue only once its copy
        is confirmed. Returns how many were sent back."""
        queue = self._consumed(queue)
        async with self.connection() as transport:
            return await replay(transport, queue, limit)

    async def purge(self, queue: str) -> int:
        """Remove the messages parked for the consumer of `queue` (those there when it began)."""
        queue = self._consumed(queue)
        parked = names.parked_queue(queue)
        async with self.connection() as transport:
            channel = await transport.channel()
            try:
                count = (await channel.declare_queue(parked, passive=True)).message_count
                removed = 0
                while removed < count and (delivery := await channel.get(parked)) is not None:
                    await channel.ack(delivery.delivery_tag)
                    removed += 1
            finally:
                await channel.close()
        return removed

    async def delete(self, *, force: bool = False) -> list[str]:
        """Delete the service's queues and its own exchange (`<service>.dlx`; exchanges its
        consumers bind to may be shared, and stay). Refuses (ConfigError, deleting nothing) while a
        queue holds messages, unless `force`. Returns what was deleted."""
        async with self.connection() as transport:
            channel = await transport.channel()
            try:
                holding = []
                for queue in self.plan.queues:
                    try:
                        info = await channel.declare_queue(queue.name, passive=True)
                    except ChannelClosed:
                        channel = await transport.channel()  # a 404 closes the channel: not there
                        continue
                    if info.message_count:
                        holding.append(f"{queue.name} ({info.message_count})")
                if holding and not force:
                    raise ConfigError(
                        f"not deleting service {self.plan.service!r}: queues hold messages: "
                        f"{', '.join(holding)}; consume or purge them first, or force it"
                    )
                deleted = []
                for queue in self.plan.queues:
                    await channel.delete_queue(queue.name)
                    deleted.append(queue.name)
                own = names.dead_letter_exchange(self.plan.service)
                await channel.delete_exchange(own)
                deleted.append(own)
            finally:
                await channel.close()
        return deleted
