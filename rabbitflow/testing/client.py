"""The test client: run an App on the in-memory broker, on a virtual clock."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from unittest.mock import MagicMock

from rabbitflow import names
from rabbitflow.app import App
from rabbitflow.codec import decode, outgoing
from rabbitflow.errors import ConfigError, DecodeError, Reject, RequestTimeout, Retry
from rabbitflow.message import Message
from rabbitflow.middleware.base import Middleware
from rabbitflow.transport.base import Channel, Properties
from rabbitflow.transport.memory.broker import MemoryBroker

__all__ = ["Call", "Failure", "Parked", "Sent", "TestClient"]


@dataclass(frozen=True, slots=True)
class Sent:
    """A message the app published, as the broker received it."""

    exchange: str
    routing_key: str
    body: Any
    raw: bytes
    headers: Mapping[str, Any]
    message_id: str | None
    time: float  # virtual seconds since the client started


@dataclass(frozen=True, slots=True)
class Parked:
    """A message in a parking queue, with the reason rabbitflow gave it."""

    body: Any
    raw: bytes
    headers: Mapping[str, Any]
    message_id: str | None
    reason: str
    attempts: int
    exception: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Failure:
    """One handler call that raised, at virtual time `time`."""

    queue: str
    attempt: int
    exception: BaseException
    time: float


@dataclass(frozen=True, slots=True)
class Call:
    """One handler call (one attempt): what it got and how it ended."""

    queue: str
    body: Any  # decoded as the handler's first parameter asked
    message: Message
    attempt: int
    result: Any  # what the handler returned (None when it raised)
    exception: BaseException | None  # what it raised, Retry and Reject included
    time: float  # virtual seconds when it began

    @property
    def ok(self) -> bool:
        return self.exception is None


class _Recorder(Middleware):
    """What the client listens with: the middleware seam any user has."""

    def __init__(self, client: TestClient) -> None:
        self._client = client

    async def attempt(self, message: Message, call_next: Callable[[], Awaitable[Any]]) -> Any:
        client = self._client
        started = client.broker.now
        spec = client._specs.get(message.queue)
        try:
            body = message.body if spec is None else spec.signature.read(message.body, message.content_type)
        except DecodeError:
            body = message.body
        client._mock(message.queue)(body)
        try:
            result = await call_next()
        except BaseException as exc:
            client._calls.append(Call(message.queue, body, message, message.attempt, None, exc, started))
            raise
        client._calls.append(Call(message.queue, body, message, message.attempt, result, None, started))
        return result

    def attempt_failed(self, queue: str, attempt: int, exception: BaseException) -> None:
        self._client._record(queue, attempt, exception)


_WALL_LIMIT = 3600.0  # real seconds a client.request may take: its own timeout is virtual


def _decoded(properties: Properties, raw: bytes) -> Any:
    try:
        return decode(raw, properties.content_type)
    except DecodeError:
        return raw


class TestClient:
    """Drive an App on an in-memory broker whose clock only moves when the test says so.

        async with TestClient(app) as client:
            await client.publish({"id": 1}, routing_key="orders.created")
            await client.drain()                 # run until idle, jumping over retry delays
            assert client.parked("orders.created")[0].reason == "exhausted"

    `raise_errors=True` re-raises the first exception a handler raised from `drain()` /
    `advance()` (Retry and Reject excepted); either way every one is in `client.failures`.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, app: App, *, broker: MemoryBroker | None = None, raise_errors: bool = False) -> None:
        if not app.endpoints[0].is_memory:
            raise ConfigError(
                f"TestClient needs App({app.name!r}, url='memory://'); this app points at "
                f"{app.endpoints[0]}. Create the app with url='memory://' (or RABBITFLOW_URL=memory://)"
            )
        self.app = app
        self.broker = broker or MemoryBroker()
        self.raise_errors = raise_errors
        self.failures: list[Failure] = []
        self._raised = 0
        self._channel: Channel | None = None
        self._own_ids: set[str] = set()
        self._ids = itertools.count(1)
        self._calls: list[Call] = []
        self._mocks: dict[str, MagicMock] = {}
        self._specs = {spec.queue: spec for spec in app.consumers}

    async def __aenter__(self) -> TestClient:
        self.app.use_broker(self.broker)
        self.app.middleware = (*self.app.middleware, _Recorder(self))
        await self.app.start()
        transport = await self.broker.connect()
        self._channel = await transport.channel()
        await self.broker.drain(advance_clock=False)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.app.stop()
        self.app.middleware = tuple(m for m in self.app.middleware if not isinstance(m, _Recorder))

    def calls(self, queue: str | None = None) -> list[Call]:
        """Every handler call (of the consumer of `queue`), oldest first: its decoded body, the
        Message, the attempt and the outcome."""
        return [c for c in self._calls if queue is None or c.queue == queue]

    def mock(self, queue: str) -> MagicMock:
        """A `MagicMock` called with the decoded body on each handler call of `queue`'s consumer,
        as FastStream's `handler.mock`: `client.mock("orders").assert_called_once_with({...})`."""
        return self._mock(queue)

    def _mock(self, queue: str) -> MagicMock:
        found = self._mocks.get(queue)
        if found is None:
            found = self._mocks[queue] = MagicMock(name=f"handler of {queue}")
        return found

    async def request(
        self,
        body: Any,
        *,
        exchange: str = "",
        routing_key: str,
        headers: dict[str, Any] | None = None,
        timeout: float = 5.0,
        response_type: Any = None,
    ) -> Any:
        """`app.request` on the virtual clock: the clock moves over retry delays while the request
        waits (no `drain()` needed), and `timeout` is virtual seconds (`RequestTimeout` once the
        clock passed it without a reply)."""
        started = self.broker.now
        deadline = started + timeout
        ask = asyncio.ensure_future(
            self.app.request(
                body,
                exchange=exchange,
                routing_key=routing_key,
                headers=headers,
                timeout=_WALL_LIMIT,
                response_type=response_type,
            )
        )
        try:
            while not ask.done():
                await self.broker.drain(advance_clock=False)
                if ask.done():
                    break
                due = self.broker._vhost.next_expiry()  # the next message TTL that runs out
                if due is None or due > deadline:
                    await asyncio.wait({ask}, timeout=self.broker.ack_grace)
                    if not ask.done():
                        await self.broker.advance(max(0.0, deadline - self.broker.now))
                    break
                await self.broker.advance(max(0.0, due - self.broker.now))
            if not ask.done():
                raise RequestTimeout(
                    f"no reply to the request to exchange {exchange!r} with routing key "
                    f"{routing_key!r} within {timeout}s (virtual)"
                )
            return ask.result()
        finally:
            if not ask.done():
                ask.cancel()
                await asyncio.gather(ask, return_exceptions=True)
            self._raise()

    def _record(self, queue: str, attempt: int, exc: BaseException) -> None:
        self.failures.append(Failure(queue, attempt, exc, self.broker.now))

    @property
    def now(self) -> float:
        """Virtual seconds since the broker was made."""
        return self.broker.now

    async def publish(
        self,
        body: Any,
        *,
        exchange: str = "",
        routing_key: str = "",
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        content_type: str | None = None,
    ) -> None:
        """Publish as an outside producer would (it does not show in `sent()`). A fanout (or
        headers) exchange needs no `routing_key`; the default exchange needs the queue's name."""
        assert self._channel is not None, "use the client inside `async with`"
        message_id = message_id or f"test-{next(self._ids)}"
        raw, properties = outgoing(body, message_id=message_id, content_type=content_type, headers=headers)
        self._own_ids.add(message_id)
        await self._channel.publish(raw, exchange=exchange, routing_key=routing_key, properties=properties)

    async def drain(self, *, advance_clock: bool = True) -> None:
        """Run until nothing is left to do, jumping the clock to each pending expiry."""
        await self.broker.drain(advance_clock=advance_clock)
        self._raise()

    async def advance(self, seconds: float) -> None:
        """Move the virtual clock forward, handling everything that becomes due on the way."""
        await self.broker.advance(seconds)
        self._raise()

    def _raise(self) -> None:
        if not self.raise_errors:
            return
        fresh = self.failures[self._raised :]
        self._raised = len(self.failures)
        for failure in fresh:
            if not isinstance(failure.exception, Retry | Reject):
                raise failure.exception

    def queued(self, queue: str) -> list[Any]:
        """Decoded bodies of the messages waiting in `queue`, head first."""
        return [_decoded(p, raw) for p, raw in self.broker.messages(queue)]

    def parked(self, queue: str) -> list[Parked]:
        """The messages parked for the consumer of `queue`."""
        out = []
        for properties, raw in self.broker.messages(names.parked_queue(queue)):
            headers: dict[str, Any] = dict(properties.headers or {})
            out.append(
                Parked(
                    body=_decoded(properties, raw),
                    raw=raw,
                    headers=headers,
                    message_id=properties.message_id,
                    reason=str(headers.get(names.REASON, "")),
                    attempts=int(headers.get(names.PARKED_ATTEMPTS, 0)),
                    exception=headers.get(names.EXCEPTION),
                    error=headers.get(names.ERROR),
                )
            )
        return out

    def sent(self, *, exchange: str | None = None, routing_key: str | None = None) -> list[Sent]:
        """What the app published (its own retry and parking copies excluded), oldest first."""
        dlx = names.dead_letter_exchange(self.app.name)
        out = []
        for record in self.broker.published:
            p = record.properties
            if record.exchange == dlx or p.message_id in self._own_ids:
                continue
            if exchange is not None and record.exchange != exchange:
                continue
            if routing_key is not None and record.routing_key != routing_key:
                continue
            out.append(
                Sent(
                    record.exchange,
                    record.routing_key,
                    _decoded(p, record.body),
                    record.body,
                    dict(p.headers or {}),
                    p.message_id,
                    record.time,
                )
            )
        return out
