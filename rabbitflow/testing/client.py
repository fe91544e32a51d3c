"""The test client: run an App on the in-memory broker, on a virtual clock."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from rabbitflow import names
from rabbitflow.app import App
from rabbitflow.codec import decode, outgoing
from rabbitflow.errors import ConfigError, DecodeError, Reject, Retry
from rabbitflow.middleware.base import Middleware
from rabbitflow.transport.base import Channel, Properties
from rabbitflow.transport.memory.broker import MemoryBroker

__all__ = ["Failure", "Parked", "Sent", "TestClient"]


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


class _Recorder(Middleware):
    """What the client listens with: the middleware seam any user has."""

    def __init__(self, client: TestClient) -> None:
        self._client = client

    def attempt_failed(self, queue: str, attempt: int, exception: BaseException) -> None:
        self._client._record(queue, attempt, exception)


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
