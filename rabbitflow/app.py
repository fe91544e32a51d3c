"""The App: consumers, lifecycle, publishing and failover for one service."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import signal
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, TypeVar

from .codec import outgoing
from .connection import ConnectionManager, Connector, Failover
from .consumer import ConsumerSpec, Handler, build_spec, check_name, check_positive
from .errors import ConfigError, PublishNacked, PublishTimeout, StateError
from .parking import ParkedMessage, peek, replay
from .session import Session
from .supervisor import SessionSettings, Supervisor
from .topology.applier import Difference, apply_plan, check_plan
from .topology.compiler import Plan, compile_plan
from .transport.base import ChannelClosed, Transport, TransportError
from .urls import Endpoint, parse_urls
from .worker import FailureHook

__all__ = ["App"]

log = logging.getLogger("rabbitflow")

H = TypeVar("H", bound=Handler)
T = TypeVar("T")
Lifespan = Callable[["App"], AbstractAsyncContextManager[Any]]


class State(enum.Enum):
    UNOPENED = "unopened"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    CLOSED = "closed"


class App:
    """A rabbitflow service.

    Args:
        name: the service's name; it prefixes the service's own retry exchange (`<name>.dlx`).
        url: one broker URL, a `;`-separated list of the cluster's nodes, or a list. Defaults to
            the environment variable RABBITFLOW_URL, then `amqp://guest:guest@localhost:5672/`.
            `memory://` selects the in-memory broker of `rabbitflow.testing`.
        failover: the order in which nodes are tried: "round-robin", "shuffle", or a function
            that takes the list of nodes and yields them forever.
        prefetch: unacknowledged deliveries per consumer (AMQP basic.qos), unless the consumer
            sets its own.
        concurrency: handlers of one consumer running at once, unless the consumer sets its own.
        graceful_timeout: seconds a stop waits for running handlers before cancelling them.
        heartbeat: AMQP heartbeat in seconds; a silent node is declared dead after about
            (heartbeat + 1) * 3 seconds.
        connect_timeout: seconds to wait for one node before trying the next.
        connect_budget: seconds `start()` keeps trying the cluster before `ConnectionFailed`.
        publish_timeout: default seconds `publish()` waits for a confirm, across reconnects.
        lifespan: `lifespan(app)` returns an async context manager for the service's own
            resources, entered before consuming starts and exited after the last handler finished.
        ssl_context: TLS settings for `amqps://` nodes (default: the system's trust store).
    """

    def __init__(
        self,
        name: str,
        url: str | Sequence[str] | None = None,
        *,
        failover: Failover = "round-robin",
        prefetch: int = 64,
        concurrency: int = 32,
        graceful_timeout: float = 30.0,
        heartbeat: int = 5,
        connect_timeout: float = 5.0,
        connect_budget: float = 30.0,
        publish_timeout: float = 10.0,
        lifespan: Lifespan | None = None,
        ssl_context: ssl.SSLContext | None = None,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ConfigError(f"App({name!r}): unknown option(s) {', '.join(sorted(unknown))}")
        try:
            self.name = check_name("name", name)
            self.endpoints: tuple[Endpoint, ...] = parse_urls(url)
            self.prefetch = check_positive("prefetch", prefetch, optional=False) or 1
            self.concurrency = check_positive("concurrency", concurrency, optional=False) or 1
            self.heartbeat = check_positive("heartbeat", heartbeat, optional=False) or 1
            for what, value in (
                ("graceful_timeout", graceful_timeout),
                ("connect_timeout", connect_timeout),
                ("connect_budget", connect_budget),
                ("publish_timeout", publish_timeout),
            ):
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    raise ConfigError(f"{what}={value!r}: expected a number of seconds > 0")
        except ConfigError as exc:
            raise ConfigError(f"App({name!r}): {exc}") from None
        self.graceful_timeout = float(graceful_timeout)
        self.connect_budget = float(connect_budget)
        self.publish_timeout = float(publish_timeout)
        self.session_timeout = max(10.0, 2 * float(connect_timeout))
        self.lifespan = lifespan
        self._consumers: dict[str, ConsumerSpec] = {}
        self._plan = compile_plan(self.name, ())
        self._manager = ConnectionManager(
            self.endpoints,
            failover=failover,
            connect_timeout=connect_timeout,
            heartbeat=self.heartbeat,
            name=self.name,
            ssl_context=ssl_context,
            connector=self._memory_connector() if self.endpoints[0].is_memory else None,
        )
        self._state = State.UNOPENED
        self._supervisor: Supervisor | None = None
        self._started = asyncio.Event()  # set once start() finished; lifespan code may publish earlier
        self._lifespan_stack: contextlib.AsyncExitStack | None = None
        # Message ids: 64 random bits per app instance and a counter; unique, and cheaper than uuid4.
        self._on_failure: FailureHook | None = None  # set by rabbitflow.testing.TestClient
        self._id_prefix = f"{uuid.uuid4().hex[:16]}-"
        self._ids = itertools.count(1)

    def use_url(self, url: str | Sequence[str]) -> None:
        """Point the app at other nodes before it starts (the CLI's `--url`)."""
        if self._state is not State.UNOPENED:
            raise StateError("the URL can only change before the app starts")
        self.endpoints = parse_urls(url)
        self._manager = self._manager.with_endpoints(
            self.endpoints,
            connector=self._memory_connector() if self.endpoints[0].is_memory else None,
        )

    def __repr__(self) -> str:
        nodes = ";".join(str(e) for e in self.endpoints)
        return f"App({self.name!r}, url={nodes!r}, state={self._state.value})"

    # -- declaring consumers ---------------------------------------------------------------

    def consumer(
        self,
        queue: str,
        *,
        exchange: str | None = None,
        exchange_type: str = "direct",
        routing_key: str | None = None,
        retries: int = 3,
        delay: float | Sequence[float] = 10.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        dont_retry: type[BaseException] | tuple[type[BaseException], ...] = (),
        queue_type: str = "quorum",
        prefetch: int | None = None,
        concurrency: int | None = None,
        **unknown: Any,
    ) -> Callable[[H], H]:
        """Register an async function as the consumer of `queue`.

        Args:
            queue: the queue's name, used verbatim.
            exchange: declare this durable exchange and bind the queue to it.
            exchange_type: "direct", "fanout", "topic" or "headers".
            routing_key: the binding key (default: the queue's name).
            retries: retries after the first attempt; the handler runs at most retries + 1 times.
            delay: seconds before a retry: a number, or a ladder [d1, d2, ...] where retry k
                waits d_k and the last value repeats. Each distinct delay is one TTL queue.
            retry_on: exceptions that are retried; others park the message at once.
            dont_retry: exceptions that are never retried, even when they match `retry_on`.
            queue_type: "quorum" (default; at-least-once dead-lettering) or "classic".
            prefetch: this consumer's prefetch (default: the app's).
            concurrency: handlers of this consumer running at once (default: the app's).

        Every option is checked here, when the module is imported: a bad value, an unknown
        option or a second consumer of the same queue raises `ConfigError`.
        """

        def register(handler: H) -> H:
            spec = build_spec(
                handler,
                queue,
                exchange=exchange,
                exchange_type=exchange_type,
                routing_key=routing_key,
                retries=retries,
                delay=delay,
                retry_on=retry_on,
                dont_retry=dont_retry,
                queue_type=queue_type,
                prefetch=prefetch,
                concurrency=concurrency,
                unknown=unknown,
            )
            if spec.queue in self._consumers:
                raise ConfigError(
                    f"@app.consumer({spec.queue!r}): queue {spec.queue!r} already has a consumer "
                    f"({self._consumers[spec.queue].handler_name}); one queue, one consumer"
                )
            plan = compile_plan(self.name, [*self._consumers.values(), spec])
            if self._state is not State.UNOPENED:
                raise StateError("consumers must be registered before the app starts")
            self._consumers[spec.queue] = spec
            self._plan = plan
            return handler

        return register

    @property
    def consumers(self) -> tuple[ConsumerSpec, ...]:
        return tuple(self._consumers.values())

    @property
    def plan(self) -> Plan:
        """The topology this service needs (pure; no broker involved)."""
        return self._plan

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state.value

    async def __aenter__(self) -> App:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Enter the lifespan, connect, declare the topology and start every consumer."""
        if self._state is not State.UNOPENED:
            raise StateError(f"App {self.name!r} is {self._state.value}; an app starts once")
        self._state = State.STARTING
        supervisor = Supervisor(
            self._manager,
            SessionSettings(
                self.name,
                self._plan,
                self.consumers,
                self.prefetch,
                self.concurrency,
                self.session_timeout,
                self._on_failure,
            ),
        )
        stack = contextlib.AsyncExitStack()
        try:
            if self.lifespan is not None:
                await stack.enter_async_context(self.lifespan(self))
            await supervisor.start(self.connect_budget)
        except BaseException:
            self._state = State.CLOSED
            self._started.set()  # publishes waiting for the start learn that it failed
            await stack.aclose()
            raise
        self._supervisor = supervisor
        self._lifespan_stack = stack
        self._state = State.RUNNING
        self._started.set()

    async def stop(self) -> None:
        """Stop taking messages, let running handlers finish (up to graceful_timeout), close."""
        if self._state is State.UNOPENED:
            self._state = State.CLOSED  # never started: it cannot start later either
        if self._state is not State.RUNNING:
            return
        self._state = State.STOPPING
        if self._supervisor is not None:
            await self._supervisor.stop(self.graceful_timeout)
        if self._lifespan_stack is not None:
            await self._lifespan_stack.aclose()
        self._state = State.CLOSED

    @property
    def reconnects(self) -> int:
        """How often the app failed over to a node since it started."""
        return self._supervisor.reconnects if self._supervisor is not None else 0

    def run(self) -> None:
        """Run until SIGINT or SIGTERM, then stop gracefully. Uses uvloop when it is installed."""
        try:
            import uvloop
        except ImportError:
            asyncio.run(self.serve())
        else:
            uvloop.run(self.serve())

    async def serve(self) -> None:
        """Start, wait for SIGINT/SIGTERM, stop: the body of `run()` for an existing loop."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        try:
            async with self:
                log.info(
                    "%s: consuming %d queue(s); stop with SIGTERM or Ctrl-C", self.name, len(self._consumers)
                )
                await stop.wait()
                log.info("%s: stopping", self.name)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def _current(self, deadline: float) -> Session:
        """The live session, waiting for the start (a publish from the lifespan) or a reconnect
        until `deadline` (loop time)."""
        if self._state is State.STARTING:
            remaining = deadline - asyncio.get_running_loop().time()
            await asyncio.wait_for(self._started.wait(), max(remaining, 0))
        supervisor = self._supervisor
        if self._state is not State.RUNNING or supervisor is None:
            raise StateError(f"App {self.name!r} is {self._state.value}; start it first")
        return await supervisor.wait_live(deadline)

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self,
        body: Any,
        *,
        exchange: str = "",
        routing_key: str,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        persistent: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Publish and return once the broker confirmed it.

        Raises `Unroutable` when no queue is bound for it, and `PublishTimeout` when no node
        confirmed it within `timeout` (reconnects included: a publish whose outcome a lost
        connection made unknown is sent again — duplicates are possible, loss is not).
        """
        data, properties = outgoing(
            body,
            message_id=message_id or f"{self._id_prefix}{next(self._ids):x}",
            content_type=content_type,
            headers=headers,
            correlation_id=correlation_id,
            reply_to=reply_to,
            persistent=persistent,
        )
        limit = self.publish_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        nacks = 0
        try:
            while True:
                supervisor = self._supervisor
                session = supervisor.live if supervisor is not None else None
                if session is None or self._state is not State.RUNNING:
                    session = await self._current(deadline)
                try:
                    async with asyncio.timeout_at(deadline):
                        if session.transport.blocked:
                            await session.transport.wait_unblocked()
                        await session.publish(data, exchange, routing_key, properties)
                    return
                except ChannelClosed:
                    raise
                except TransportError as exc:
                    log.info("publish to %r/%r interrupted (%s); sending again", exchange, routing_key, exc)
                    await asyncio.sleep(0)
                except PublishNacked as exc:
                    # The broker did not take it (a quorum queue without a leader during a failover,
                    # say): certainly not stored, so sending it again is safe.
                    nacks += 1
                    log.info("publish to %r/%r nacked (%s); sending again", exchange, routing_key, exc)
                    await asyncio.sleep(min(1.0, 0.02 * 2**nacks))
        except TimeoutError:
            raise PublishTimeout(
                f"publish to exchange {exchange!r} with routing key {routing_key!r} was not "
                f"confirmed within {limit}s ("
                + (
                    f"nacked {nacks} time(s) by the broker"
                    if nacks
                    else "nodes down or connection blocked by a resource alarm"
                )
                + ")"
            ) from None

    async def ensure(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        max_retries: int | None = 3,
        errback: Callable[[BaseException, int], Any] | None = None,
        timeout: float | None = None,
    ) -> T:
        """Run `fn(channel, *args)` on a fresh aio-pika channel of the current node; if the
        connection is lost meanwhile, wait for the failover and run it again on the new node
        (kombu's `ensure`). `errback(exc, retry_number)` is called before each retry."""
        loop = asyncio.get_running_loop()
        limit = self.connect_budget if timeout is None else timeout
        retries = 0
        while True:
            session = await self._current(loop.time() + limit)
            try:
                channel = await session.transport.native_channel()
                try:
                    return await fn(channel, *args)
                finally:
                    with contextlib.suppress(Exception):
                        await channel.close()
            except Exception as exc:
                if session.transport.is_open and not isinstance(exc, TransportError):
                    raise  # the operation failed on a healthy connection: not ours to retry
                retries += 1
                if max_retries is not None and retries > max_retries:
                    raise
                if errback is not None:
                    errback(exc, retries)
                log.info(
                    "%s: operation interrupted by %s; retry %d on the next node",
                    self.name,
                    type(exc).__name__,
                    retries,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(session.transport.wait_closed(), limit)

    async def declare(self) -> str:
        """Declare the plan on the first node that accepts, without consuming; returns the node."""
        async with self._operator_connection() as transport:
            await apply_plan(self._plan, transport)
            return transport.node

    async def check(self) -> tuple[str, list[Difference]]:
        """Compare the plan with a live node, changing nothing; returns the node and the differences."""
        async with self._operator_connection() as transport:
            return transport.node, await check_plan(self._plan, transport)

    async def parked(self, queue: str, *, limit: int = 100) -> list[ParkedMessage]:
        """Up to `limit` messages parked for the consumer of `queue`, head first; they stay parked."""
        async with self._operator_connection() as transport:
            return await peek(transport, queue, limit)

    async def replay(self, queue: str, *, limit: int | None = None) -> int:
        """Send parked messages of `queue` back to where they were first published, to start
        again at attempt 1; each leaves the parking queue only once its copy is confirmed."""
        async with self._operator_connection() as transport:
            return await replay(transport, queue, limit)

    @contextlib.asynccontextmanager
    async def _operator_connection(self) -> AsyncIterator[Transport]:
        """A connection of its own, to the first node that accepts, for one operator task; it
        works whether or not the app is running."""
        transport = await self._manager.connect(self.connect_budget)
        try:
            yield transport
        finally:
            await transport.close()

    def health(self) -> dict[str, Any]:
        """The connected node, the blocked state and the live consumers."""
        supervisor = self._supervisor
        session = supervisor.session if supervisor is not None else None
        connected = supervisor is not None and supervisor.live is not None
        return {
            "service": self.name,
            "state": self._state.value,
            "connected": connected,
            "node": session.transport.node if session is not None and connected else None,
            "blocked": bool(session is not None and session.transport.blocked),
            "consumers": len(self._consumers),
            "live_consumers": session.live_consumers if session is not None else 0,
            "reconnects": self.reconnects,
        }

    def _memory_connector(self) -> Connector:
        from .testing.memory import memory_connector

        return memory_connector(self)
