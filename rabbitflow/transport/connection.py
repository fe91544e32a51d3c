"""The connection manager: rotates through the cluster's nodes until one accepts."""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from rabbitflow.errors import ConnectionFailed, LoginRefused
from rabbitflow.transport.base import Broker, Transport
from rabbitflow.urls import Endpoint, Failover, mask, strategy

__all__ = ["ConnectionManager", "Links"]

log = logging.getLogger("rabbitflow.transport.connection")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Links:
    """Two connections to one node. RabbitMQ blocks every connection that publishes during a
    resource alarm, acks included; a consuming connection that never publishes keeps acking."""

    consume: Transport
    publish: Transport

    @property
    def node(self) -> str:
        return self.consume.node

    @property
    def is_open(self) -> bool:
        return self.consume.is_open and self.publish.is_open

    async def wait_closed(self) -> BaseException | None:
        """Until either connection goes; returns why."""
        waits = [asyncio.ensure_future(t.wait_closed()) for t in (self.consume, self.publish)]
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        return done.pop().result()

    async def close(self) -> None:
        await asyncio.gather(self.consume.close(), self.publish.close())


class ConnectionManager:
    """Connects to the next node of the cluster; sleeps with jittered exponential backoff only
    after a whole cycle of nodes failed (as kombu does)."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        broker: Broker,
        *,
        failover: Failover = "round-robin",
        connect_timeout: float = 5.0,
        heartbeat: int = 5,
        name: str = "rabbitflow",
        backoff: tuple[float, float] = (0.2, 10.0),
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.endpoints = tuple(endpoints)
        self.broker = broker
        self._order = strategy(failover)(self.endpoints)
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat
        self._name = name
        self._backoff = backoff
        self._ssl_context = ssl_context

    async def _open(self, endpoint: Endpoint, timeout: float, role: str) -> Transport:
        return await self.broker.connect(
            endpoint,
            timeout=timeout,
            heartbeat=self._heartbeat,
            name=f"{self._name}:{role}",
            ssl_context=self._ssl_context,
        )

    async def connect_links(self, budget: float | None) -> Links:
        """A consuming and a publishing connection to the first node that accepts both."""

        async def both(endpoint: Endpoint, timeout: float) -> Links:
            consume = await self._open(endpoint, timeout, "consume")
            try:
                publish = await self._open(endpoint, timeout, "publish")
            except BaseException:
                await consume.close()
                raise
            return Links(consume, publish)

        return await self._cycle(budget, both)

    async def connect(self, budget: float | None) -> Transport:
        """A transport to the first node that accepts; `ConnectionFailed` once `budget` seconds
        are spent (None: keep trying). A refused login fails at once (`LoginRefused`)."""
        return await self._cycle(budget, lambda endpoint, timeout: self._open(endpoint, timeout, "operator"))

    async def _cycle(self, budget: float | None, open: Callable[[Endpoint, float], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        deadline = None if budget is None else loop.time() + budget
        failures: dict[str, str] = {}
        cycle = 0
        while True:
            refused: LoginRefused | None = None
            refusals = 0
            for _ in self.endpoints:
                endpoint = next(self._order)
                timeout = self._connect_timeout
                if deadline is not None:
                    timeout = min(timeout, deadline - loop.time())
                    if timeout <= 0:
                        raise self._failed(failures, budget)
                log.debug("connecting to %s (timeout %.1fs)", endpoint, timeout)
                try:
                    transport = await open(endpoint, timeout)
                except LoginRefused as exc:
                    # Nodes may have credentials of their own: the next one may accept.
                    refused, refusals = exc, refusals + 1
                    failures[str(endpoint)] = "login refused"
                    log.warning("%s refused the login", endpoint)
                    continue
                except Exception as exc:  # refused, timed out, TLS, auth: try the next node
                    reason = _reason(exc)
                    failures[str(endpoint)] = reason
                    log.warning("cannot connect to %s: %s", endpoint, reason)
                    continue
                log.info("connected to %s", endpoint)
                return transport
            if refused is not None and refusals == len(self.endpoints):
                raise refused  # every node refused it: trying again will not help
            cycle += 1
            pause = self.pause(cycle)
            if deadline is not None:
                pause = min(pause, deadline - loop.time())
                if pause <= 0:
                    raise self._failed(failures, budget)
            log.info("no node accepted a connection; trying again in %.1fs", pause)
            await asyncio.sleep(pause)

    def pause(self, failures: int) -> float:
        """The jittered exponential wait after `failures` failed rounds, within `backoff`."""
        low, high = self._backoff
        pause: float = min(high, low * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)
        return pause

    def _failed(self, failures: dict[str, str], budget: float | None) -> ConnectionFailed:
        tried = "; ".join(f"{node}: {reason}" for node, reason in failures.items()) or "none"
        return ConnectionFailed(
            f"no RabbitMQ node accepted a connection within {budget}s (tried {tried}); "
            "check that the broker runs and the URL list (url= or RABBITFLOW_URL) is right"
        )


def _reason(exc: BaseException) -> str:
    """Why a connect failed, in a few words, with any password in it masked."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        text = "timed out"
    return mask(f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text)
