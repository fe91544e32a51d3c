"""The App: what a service declares — its settings, its consumers and their topology — and the
door to running it (`runtime.Runtime`) and operating it (`admin.Admin`)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import signal
import ssl
import time
import typing
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from rabbitflow import names
from rabbitflow.admin import Admin
from rabbitflow.breaker import Breaker
from rabbitflow.codec import check_size, outgoing, reader_for
from rabbitflow.errors import ConfigError, RequestTimeout, StateError
from rabbitflow.message import Message
from rabbitflow.middleware.base import Middleware, PublishChain, publish_chain
from rabbitflow.parking.message import ParkedMessage
from rabbitflow.registry import Registry
from rabbitflow.runtime import loops, partitions
from rabbitflow.runtime.failover import Runtime
from rabbitflow.runtime.publisher import NackCount, not_confirmed
from rabbitflow.runtime.request import ask, reply_message
from rabbitflow.runtime.results import ORIGIN, derived
from rabbitflow.runtime.session import Session
from rabbitflow.settings import Lifespan, Settings, default
from rabbitflow.spec import ConsumerSpec
from rabbitflow.topology.applier import Difference
from rabbitflow.transport.base import Broker, Delivery, Properties
from rabbitflow.transport.connection import ConnectionManager
from rabbitflow.urls import Failover, parse_urls

__all__ = ["App"]

if TYPE_CHECKING:
    from rabbitflow.sql import Outbox

log = logging.getLogger("rabbitflow")

T = TypeVar("T")


class State(enum.Enum):
    UNOPENED = "unopened"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    CLOSED = "closed"


def _default_broker(settings: Settings) -> Broker:
    """The broker behind the URL: the in-memory one for memory://, else a real RabbitMQ."""
    if settings.endpoints[0].is_memory:
        from rabbitflow.transport.memory.broker import (
            MemoryBroker,  # the one import of the test double, on request
        )

        return MemoryBroker(realtime=True)
    from rabbitflow.transport.amqp.broker import AmqpBroker

    return AmqpBroker()


class App(Registry):
    """A rabbitflow service.

    Args:
        name: the service's name; it prefixes the service's own retry exchange (`<name>.dlx`).
        url: one broker URL, a `;`-separated list of the cluster's nodes, or a list. Defaults to
            the environment variable RABBITFLOW_URL, then `amqp://guest:guest@localhost:5672/`.
            `memory://` selects the in-memory broker of `rabbitflow.testing`.
        broker: where connections come from (default: a real RabbitMQ, or for `memory://` an
            in-memory broker following real time); pass a `rabbitflow.testing.MemoryBroker` to
            run on a virtual clock.
        failover: the order in which nodes are tried: "round-robin", "shuffle", or a function
            that takes the list of nodes and yields them forever.
        prefetch: unacknowledged deliveries per consumer (AMQP basic.qos), unless the consumer
            sets its own.
        concurrency: handlers of one consumer running at once, unless the consumer sets its own.
        handler_timeout: seconds a handler may run before it is cancelled and its attempt fails
            with TimeoutError (None: no limit), unless the consumer sets its own.
        breaker: the `Breaker` of every consumer that does not set its own (default: none).
        graceful_timeout: seconds a stop waits for running handlers before cancelling them.
        heartbeat: AMQP heartbeat in seconds; a silent node is declared dead after about
            (heartbeat + 1) * 3 seconds.
        connect_timeout: seconds to wait for one node before trying the next.
        connect_budget: seconds `start()` keeps trying the cluster before `ConnectionFailed`.
        publish_timeout: default seconds `publish()` waits for a confirm, across reconnects.
        lifespan: `lifespan(app)` returns an async context manager for the service's own
            resources, entered before consuming starts and exited after the last handler finished.
        middleware: `rabbitflow.Middleware` instances whose hooks see each attempt.
        ssl_context: TLS settings for `amqps://` nodes (default: the system's trust store).
        outbox: a `rabbitflow.sql.Outbox`: its relay runs while the app runs, publishing what
            transactions committed, and `exactly_once=True` consumers record their messages in
            its database (docs/effectively-once.md).
        max_message_size: the largest body in bytes `publish`, `request` and a handler's result
            may have (default 16 MiB, RabbitMQ 4.0's limit; 3.10 takes up to 512 MiB): a larger one
            raises `UnencodableMessage` before anything is sent.

    An option left out that is a plain value (failover, prefetch, concurrency, the timeouts,
    heartbeat) comes from RABBITFLOW_<OPTION> when that is set (docs/operations.md).
    """

    __rabbitflow_app__ = True  # a handler's parameter annotated `App` receives the running app

    def __init__(
        self,
        name: str,
        url: str | Sequence[str] | None = None,
        *,
        broker: Broker | None = None,
        failover: Failover = default("round-robin"),
        prefetch: int = default(64),
        concurrency: int = default(32),
        handler_timeout: float | None = None,
        breaker: Breaker | None = None,
        graceful_timeout: float = default(30.0),
        heartbeat: int = default(5),
        connect_timeout: float = default(5.0),
        connect_budget: float = default(30.0),
        publish_timeout: float = default(10.0),
        lifespan: Lifespan | None = None,
        middleware: Sequence[Middleware] = (),
        ssl_context: ssl.SSLContext | None = None,
        outbox: Outbox | None = None,
        max_message_size: int = 16 * 1024 * 1024,
        **unknown: Any,
    ) -> None:
        if unknown:
            raise ConfigError(f"App({name!r}): unknown option(s) {', '.join(sorted(unknown))}")
        self.settings = Settings.build(
            name,
            url,
            failover=failover,
            prefetch=prefetch,
            concurrency=concurrency,
            handler_timeout=handler_timeout,
            breaker=breaker,
            graceful_timeout=graceful_timeout,
            heartbeat=heartbeat,
            connect_timeout=connect_timeout,
            connect_budget=connect_budget,
            publish_timeout=publish_timeout,
            lifespan=lifespan,
            ssl_context=ssl_context,
            max_message_size=max_message_size,
        )
        self.outbox = outbox
        super().__init__(self.settings.name)
        self.middleware = tuple(middleware)
        for item in self.middleware:
            if not isinstance(item, Middleware):
                raise ConfigError(
                    f"App({name!r}): middleware {item!r} is not a rabbitflow.Middleware; subclass it "
                    "and override the hooks you need"
                )
        self._broker = broker
        self._state = State.UNOPENED
        self._runtime: Runtime | None = None
        self._started = asyncio.Event()  # set once start() finished; lifespan code may publish earlier
        self._lifespan_stack: contextlib.AsyncExitStack | None = None
        # Message ids: 64 random bits per app instance and a counter; unique, and cheaper than uuid4.
        self._id_prefix = f"{uuid.uuid4().hex[:16]}-"
        self._ids = itertools.count(1)

    @property
    def endpoints(self) -> tuple[Any, ...]:
        return self.settings.endpoints

    @property
    def broker(self) -> Broker:
        """Where the app's connections come from (made from the URL on first use)."""
        if self._broker is None:
            self._broker = _default_broker(self.settings)
        return self._broker

    def use_url(self, url: str | Sequence[str]) -> None:
        """Point the app at other nodes before it starts (the CLI's `--url`)."""
        self._unopened("the URL")
        endpoints = parse_urls(url)
        if endpoints[0].is_memory != self.settings.endpoints[0].is_memory:
            self._broker = None  # the URL chose another kind of broker
        self.settings = replace(self.settings, endpoints=endpoints)

    def use_broker(self, broker: Broker) -> None:
        """Hand the app the broker to connect through before it starts (a `MemoryBroker`, say)."""
        self._unopened("the broker")
        self._broker = broker

    def _accept(self, consumers: dict[str, ConsumerSpec]) -> None:
        if self.outbox is None:
            for spec in consumers.values():
                if spec.exactly_once:
                    raise ConfigError(
                        f"@{spec.decorator}.consumer({spec.queue!r}): exactly_once=True needs an "
                        f"outbox: App({self.name!r}, ..., outbox=Outbox(engine)) "
                        "(from rabbitflow.sql import Outbox)"
                    )
        super()._accept(consumers)

    @property
    def middleware(self) -> tuple[Middleware, ...]:
        """The app's middleware; settable before the app starts (the CLI adds its metrics)."""
        return self._middleware

    @middleware.setter
    def middleware(self, middleware: Sequence[Middleware]) -> None:
        self._middleware = tuple(middleware)
        self._publish_chain = publish_chain(self._middleware)  # built once, not per publish

    def _registering(self) -> None:
        if self._state is not State.UNOPENED:
            raise StateError("consumers must be registered before the app starts")

    def _unopened(self, what: str) -> None:
        if self._state not in (State.UNOPENED, State.CLOSED):
            raise StateError(f"{what} can only change while the app is not running")

    def __repr__(self) -> str:
        nodes = ";".join(str(e) for e in self.endpoints)
        return f"App({self.name!r}, url={nodes!r}, state={self._state.value})"

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
        """Enter the lifespan, connect, declare the topology and start every consumer. An app
        that stopped may start again."""
        if self._state not in (State.UNOPENED, State.CLOSED):
            raise StateError(f"App {self.name!r} is {self._state.value}; stop it before starting it again")
        self._state = State.STARTING
        self._started = asyncio.Event()
        runtime = Runtime(self.settings, self.plan, self.consumers, self.broker, self.middleware, app=self)
        stack = contextlib.AsyncExitStack()
        try:
            if self.settings.lifespan is not None:
                await stack.enter_async_context(self.settings.lifespan(self))
            if self.outbox is not None:
                self._bind_inbox(self.outbox)
            await runtime.start(self.settings.connect_budget)
            self._runtime = runtime
            if self.outbox is not None:
                await self.outbox.start(self)
        except BaseException:
            self._runtime = None
            with contextlib.suppress(Exception):
                await runtime.stop(self.settings.graceful_timeout)
            self._state = State.CLOSED
            self._started.set()  # publishes waiting for the start learn that it failed
            await stack.aclose()
            raise
        self._runtime = runtime
        self._lifespan_stack = stack
        self._state = State.RUNNING
        self._started.set()

    def _bind_inbox(self, outbox: Outbox) -> None:
        from rabbitflow.sql.inbox import bind

        for spec in self.consumers:
            if spec.exactly_once:
                bind(spec.handler, outbox.inbox)

    async def stop(self) -> None:
        """Stop taking messages, let running handlers finish (up to graceful_timeout), close."""
        if self._state is not State.RUNNING:
            return
        self._state = State.STOPPING
        try:
            if self.outbox is not None:
                await self.outbox.stop()  # its pass in progress still publishes through the runtime
            if self._runtime is not None:
                await self._runtime.stop(self.settings.graceful_timeout)
            if self._lifespan_stack is not None:
                await self._lifespan_stack.aclose()
        finally:
            self._runtime = None
            self._lifespan_stack = None
            self._state = State.CLOSED

    @property
    def reconnects(self) -> int:
        """How often the app failed over to a node since it started."""
        return self._runtime.reconnects if self._runtime is not None else 0

    def run(self, *, loop: str = "auto") -> None:
        """Run until SIGINT or SIGTERM, then stop gracefully: on uvloop when it is installed
        (`loop="auto"`), or on the loop named ("uvloop", "asyncio")."""
        loops.run(self.serve(), loop)

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
                    "%s: consuming %d queue(s) on the %s event loop; stop with SIGTERM or Ctrl-C",
                    self.name,
                    len(self._consumers),
                    loops.name(loop),
                )
                await stop.wait()
                log.info("%s: stopping", self.name)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    async def _running(self, deadline: float) -> Runtime:
        """The runtime, waiting for the start to finish (a publish from the lifespan) until
        `deadline` (loop time)."""
        if self._state is State.STARTING:
            remaining = deadline - asyncio.get_running_loop().time()
            await asyncio.wait_for(self._started.wait(), max(remaining, 0))
        runtime = self._runtime
        if self._state not in (State.RUNNING, State.STOPPING) or runtime is None:
            raise StateError(f"App {self.name!r} is {self._state.value}; start it first")
        return runtime

    # -- publishing ------------------------------------------------------------------------

    async def publish(
        self,
        body: Any,
        *,
        exchange: str = "",
        routing_key: str | None = None,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        persistent: bool = True,
        mandatory: bool = True,
        timeout: float | None = None,
        key: str | bytes | int | None = None,
    ) -> None:
        """Publish and return once the broker confirmed it.

        Raises `Unroutable` when no queue is bound for it (with `mandatory=False` the broker drops
        such a message instead: for events nobody may subscribe to yet), `ChannelClosed` when the
        broker refused it (a missing exchange: 404), and `PublishTimeout` when no node confirmed it within
        `timeout` (reconnects included: a publish whose outcome a lost connection made unknown is
        sent again — duplicates are possible, loss is not).

        `key` (or, without a routing key, the consumer's `partition_key` of the body) routes to
        the partition of that key on this app's partitioned consumer behind `exchange`.
        """
        if key is not None or routing_key is None:
            routing_key = partitions.route(self.consumers, exchange, routing_key, key, body)
        # Inside a handler: the message carries the input's correlation id and origin headers.
        headers, correlation_id = derived(ORIGIN.get(), headers, correlation_id)
        data, properties = outgoing(
            body,
            message_id=message_id or f"{self._id_prefix}{next(self._ids):x}",
            content_type=content_type,
            headers=headers,
            correlation_id=correlation_id,
            reply_to=reply_to,
            persistent=persistent,
        )
        check_size(data, self.settings.max_message_size, f"publish to {exchange!r}/{routing_key!r}")
        limit = self.settings.publish_timeout if timeout is None else timeout
        deadline = asyncio.get_running_loop().time() + limit
        nacks = NackCount()
        try:
            runtime = self._runtime or await self._running(deadline)
            if self._publish_chain is None:
                await runtime.on_live(
                    deadline, _publish, data, exchange, routing_key, properties, nacks, mandatory
                )
            else:
                await self._publish_chain(
                    data,
                    exchange,
                    routing_key,
                    properties,
                    lambda: runtime.on_live(
                        deadline, _publish, data, exchange, routing_key, properties, nacks, mandatory
                    ),
                )
        except TimeoutError:
            raise not_confirmed(exchange, routing_key, limit, nacks) from None

    def publish_sync(self, body: Any, **options: Any) -> None:
        """`publish` from a sync handler (a `def`, run in a worker thread): runs `app.publish` on
        the app's event loop and waits for its confirm; same options, same errors. Only from a
        thread that rabbitflow (anyio) started: elsewhere use `asyncio.run_coroutine_threadsafe`."""
        import anyio.from_thread

        origin = ORIGIN.get()  # the thread's context: the delivery its handler is handling

        async def publish() -> None:
            ORIGIN.set(origin)  # this task's own context
            await self.publish(body, **options)

        anyio.from_thread.run(publish)

    @typing.overload
    async def request(
        self,
        body: Any,
        *,
        exchange: str = "",
        routing_key: str,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
        response_type: None = None,
    ) -> Message: ...

    @typing.overload
    async def request(
        self,
        body: Any,
        *,
        exchange: str = "",
        routing_key: str,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
        response_type: type[T],
    ) -> T: ...

    async def request(
        self,
        body: Any,
        *,
        exchange: str = "",
        routing_key: str,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
        response_type: Any = None,
    ) -> Any:
        """Publish a request and return the reply: what the consumer's handler returned (any
        rabbitflow consumer answers a message that has `reply_to`), as a `Message`, or with
        `response_type` (a pydantic model, dataclass, TypedDict, `dict`, `str`, ... as a handler's
        body annotation) decoded and validated as that type. Concurrent requests share one reply
        queue; none waits for another, and one request's failure reaches its caller alone.

        The request expires with its timeout: it carries its deadline in an `x-rf-deadline`
        header, and a rabbitflow consumer drops (acks, logs) a request whose caller gave up instead
        of handling it, retries included. (No AMQP expiration: the queues of rabbitflow consumers
        dead-letter expired messages to their parking queue.)

        Raises `RequestTimeout` when no reply came within `timeout` (the app's publish_timeout by
        default), `RequestFailed` when the responder failed it for good (rejected, retries
        exhausted, undecodable: it answers at once), `DecodeError` for a reply that is no valid
        `response_type`, `Unroutable` when no queue takes the request, `ChannelClosed` for a
        missing exchange, `UnencodableMessage` for a body over `max_message_size`. A request whose
        connection was lost before its reply is sent again on the next node (the handler may see
        it twice, as with any at-least-once delivery).
        """
        read = None if response_type is None else reader_for(response_type)
        limit = self.settings.publish_timeout if timeout is None else timeout
        headers, _ = derived(ORIGIN.get(), headers, None)  # its correlation id matches the reply
        headers = dict(headers or {})
        headers[names.DEADLINE] = int((time.time() + limit) * 1000)
        data, properties = outgoing(
            body,
            message_id=message_id or f"{self._id_prefix}{next(self._ids):x}",
            content_type=content_type,
            headers=headers,
        )
        check_size(data, self.settings.max_message_size, f"request to {exchange!r}/{routing_key!r}")
        deadline = asyncio.get_running_loop().time() + limit
        try:
            runtime = self._runtime or await self._running(deadline)
            reply = await runtime.on_live(
                deadline, _ask, data, exchange, routing_key, properties, self._publish_chain
            )
        except TimeoutError:
            raise RequestTimeout(
                f"no reply to the request to exchange {exchange!r} with routing key {routing_key!r} "
                f"within {limit}s"
            ) from None
        message = reply_message(reply)
        if read is None:
            return message
        return read(message.body, message.content_type)

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
        limit = self.settings.connect_budget if timeout is None else timeout
        runtime = await self._running(asyncio.get_running_loop().time() + limit)
        return await runtime.ensure(fn, *args, max_retries=max_retries, errback=errback, timeout=limit)

    # -- operating -------------------------------------------------------------------------

    def admin(self) -> Admin:
        """Operator work on this service's objects, on connections of its own."""
        s = self.settings
        manager = ConnectionManager(
            s.endpoints,
            self.broker,
            failover=s.failover,
            connect_timeout=s.connect_timeout,
            heartbeat=s.heartbeat,
            name=s.name,
            ssl_context=s.ssl_context,
        )
        return Admin(self.plan, manager, budget=s.connect_budget)

    async def declare(self) -> str:
        """Declare the plan on the first node that accepts, without consuming; returns the node."""
        return await self.admin().declare()

    async def check(self) -> tuple[str, list[Difference]]:
        """Compare the plan with a live node, changing nothing; returns the node and the differences."""
        return await self.admin().check()

    async def parked(self, queue: str, *, limit: int = 100) -> list[ParkedMessage]:
        """Up to `limit` messages parked for the consumer of `queue`, head first; they stay parked."""
        return await self.admin().parked(queue, limit=limit)

    async def replay(self, queue: str, *, limit: int | None = None) -> int:
        """Send parked messages of `queue` back to it (never to the other queues bound where they
        were first published), to start again at attempt 1; each leaves the parking queue only
        once its copy is confirmed, and only those parked when it began are taken."""
        return (await self.admin().replay_parked(queue, limit=limit)).done

    def health(self) -> dict[str, Any]:
        """The truth about the running service: connected node, blocked state, and per consumer
        whether it is subscribed, its deliveries in flight, the age of its oldest unsettled one
        and the time of its last settled one. `healthy` is false while the app is not running,
        not connected, or any consumer is cancelled or stalled."""
        runtime = self._runtime
        report: dict[str, Any] = {"service": self.name, "state": self._state.value}
        if runtime is None:
            report.update(
                connected=False,
                node=None,
                blocked=False,
                server_version=None,
                reconnects=0,
                healthy=False,
                consumers=[],
            )
        else:
            report.update(runtime.health())
            report["healthy"] = report["healthy"] and self._state is State.RUNNING
        report["live_consumers"] = sum(c["subscribed"] for c in report["consumers"])
        return report


async def _publish(
    session: Session,
    body: bytes,
    exchange: str,
    routing_key: str,
    properties: Properties,
    nacks: NackCount,
    mandatory: bool,
) -> None:
    await session.publisher.publish(body, exchange, routing_key, properties, tally=nacks, mandatory=mandatory)


async def _ask(
    session: Session,
    body: bytes,
    exchange: str,
    routing_key: str,
    properties: Properties,
    chain: PublishChain | None,
) -> Delivery:
    return await ask(session.requests, body, exchange, routing_key, properties, chain)
