"""The supervisor: keeps one live session across failovers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from .connection import ConnectionManager
from .consumer import ConsumerSpec
from .session import Session
from .topology.compiler import Plan
from .transport.base import ConnectionLost, Transport
from .worker import FailureHook

__all__ = ["SessionSettings", "Supervisor"]

log = logging.getLogger("rabbitflow")


@dataclass(frozen=True, slots=True)
class SessionSettings:
    service: str
    plan: Plan
    consumers: Sequence[ConsumerSpec]
    prefetch: int
    concurrency: int
    timeout: float  # to declare the topology and subscribe on one node
    on_failure: FailureHook | None = None


class Supervisor:
    """Opens a session on the first node that accepts one; when its connection goes, abandons it
    and opens the next one elsewhere, re-declaring the topology and re-subscribing every consumer."""

    def __init__(self, manager: ConnectionManager, settings: SessionSettings) -> None:
        self._manager = manager
        self._settings = settings
        self.session: Session | None = None
        self.connected = asyncio.Event()
        self.reconnects = 0
        self._watch: asyncio.Task[None] | None = None

    @property
    def live(self) -> Session | None:
        """The session, if its connection is up right now."""
        session = self.session
        if session is not None and self.connected.is_set() and session.transport.is_open:
            return session
        return None

    async def start(self, budget: float) -> None:
        transport = await self._manager.connect(budget)
        try:
            self.session = await self._open(transport)
        except BaseException:
            await transport.close()
            raise
        self.connected.set()
        self._watch = asyncio.get_running_loop().create_task(
            self._follow(), name=f"rabbitflow:{self._settings.service}:supervisor"
        )

    async def stop(self, graceful_timeout: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        session, self.session = self.session, None
        self.connected.clear()
        if session is not None:
            await session.stop(graceful_timeout)
            await session.transport.close()

    async def wait_live(self, deadline: float) -> Session:
        """The live session, waiting for a reconnect until `deadline` (loop time); TimeoutError after."""
        loop = asyncio.get_running_loop()
        while (session := self.live) is None:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.connected.wait(), remaining)
        return session

    async def _open(self, transport: Transport) -> Session:
        """Declare and subscribe on `transport`. Bounded: a node whose quorum queues are still
        electing a leader can leave a declaration unanswered, and then the next node is better."""
        s = self._settings
        session = Session(transport, s.service, s.on_failure)
        try:
            async with asyncio.timeout(s.timeout):
                await session.open(s.plan, s.consumers, prefetch=s.prefetch, concurrency=s.concurrency)
        except TimeoutError:
            raise ConnectionLost(
                f"{transport.node} did not finish declaring the topology and subscribing within {s.timeout}s"
            ) from None
        return session

    async def _follow(self) -> None:
        """Wait for the connection to go; fail over to the next node and resubscribe."""
        service = self._settings.service
        while True:
            session = self.session
            assert session is not None
            reason = await session.transport.wait_closed()
            self.connected.clear()
            log.warning(
                "%s: connection to %s lost (%s); failing over",
                service,
                session.transport.node,
                reason or "closed",
            )
            await session.abandon()
            await session.transport.close()
            self.session = session = await self._reopen()
            self.reconnects += 1
            self.connected.set()
            log.info(
                "%s: resumed on %s with %d consumer(s)",
                service,
                session.transport.node,
                session.live_consumers,
            )

    async def _reopen(self) -> Session:
        """A new session on the next node that accepts one; keeps trying until it gets one."""
        failures = 0
        while True:
            transport = await self._manager.connect(None)
            try:
                return await self._open(transport)
            except asyncio.CancelledError:
                await transport.close()
                raise
            except Exception as exc:
                failures += 1
                log.error("%s: cannot resume on %s: %s", self._settings.service, transport.node, exc)
                await transport.close()
                # The node answered but the session failed (a conflict, a channel error): pause
                # before the next node, as the manager does after a failed cycle.
                await asyncio.sleep(self._manager.pause(failures))
