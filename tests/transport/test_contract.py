"""The contract suite: every test runs on the real RabbitMQ 3.10 and on each profile of the
in-memory broker (memory-3.10, memory-3.13, memory-4.0, memory-4.3).

The `env` fixture hands each test a connected Transport on one of the brokers and the few
things that differ between them (waiting, settling, cleanup). The assertions are the same on
the real 3.10 and memory-3.10, so wherever the in-memory broker stops behaving like RabbitMQ,
its half of a test fails. Where a later RabbitMQ behaves differently by design, the test says
what each version does (`env.version`), from the release notes cited in
rabbitflow/transport/memory/profile.py; those rows are checked against the memory broker, and
against a real RabbitMQ 4.0 when RABBITFLOW_TEST_URL points at one (scripts/rabbitmq4.sh start).
Real waits stay short (TTLs of 200-900 ms); on the memory broker they cost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pamqp.commands import Basic

from rabbitflow import App, Message, PublishNacked, Reject, Unroutable
from rabbitflow.transport.amqp import broker as amqp
from rabbitflow.transport.base import (
    Channel,
    ChannelClosed,
    ConnectionLost,
    Delivery,
    Transport,
    TransportError,
)
from rabbitflow.transport.memory.broker import VERSIONS, MemoryBroker, use_broker
from rabbitflow.urls import parse_urls

from ..brokers import behaves_as

log = logging.getLogger(__name__)

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
QUEUE_TYPES = ["classic", "quorum"]

# How long a RabbitMQ test waits for "nothing more happens" (deliveries on localhost take ~1 ms).
QUIET = 0.1
POLL = 0.02


def props(**kwargs: Any) -> Basic.Properties:
    return Basic.Properties(**kwargs)


def queue_args(queue_type: str, **arguments: Any) -> dict[str, Any]:
    return {**(QUORUM if queue_type == "quorum" else {}), **arguments}


class Env:
    """One broker as the tests see it: memory (virtual clock) or RabbitMQ (real time)."""

    def __init__(self, kind: str, transport: Transport, broker: MemoryBroker | None, url: str) -> None:
        self.kind = kind
        # The RabbitMQ whose behaviour to expect: the memory broker's profile, or the profile the
        # real server's announced version maps to (3.10.8 -> "3.10", 4.0.5 -> "4.0").
        self.version = broker.version if broker is not None else behaves_as(transport.server_version)
        self.transport = transport
        self.broker = broker
        self.url = url
        self.queues: list[str] = []
        self.exchanges: list[str] = []
        self.apps: list[App] = []
        self._others: list[Transport] = []

    def name(self, prefix: str) -> str:
        return f"contract-{prefix}-{uuid.uuid4().hex[:10]}"

    async def channel(self) -> Channel:
        return await self.transport.channel()

    async def connect(self) -> Transport:
        """Another connection to the same broker, closed after the test."""
        transport = await self.broker.connect() if self.broker is not None else await _connect(self.url)
        self._others.append(transport)
        return transport

    async def queue(
        self,
        channel: Channel,
        prefix: str,
        *,
        durable: bool = True,
        arguments: Mapping[str, Any] | None = None,
    ) -> str:
        name = self.name(prefix)
        self.queues.append(name)
        await channel.declare_queue(name, durable=durable, arguments=arguments)
        return name

    async def exchange(self, channel: Channel, prefix: str, type: str = "direct") -> str:
        name = self.name(prefix)
        self.exchanges.append(name)
        await channel.declare_exchange(name, type)
        return name

    def at_least(self, version: str) -> bool:
        """Whether this broker behaves as RabbitMQ `version` or later."""
        return _key(self.version) >= _key(version)

    def app(self) -> App:
        """An App on this broker; everything its plan declares is deleted afterwards."""
        if self.broker is not None:
            app = App(self.name("svc"), url="memory://", graceful_timeout=5)
            use_broker(app, self.broker)
        else:
            app = App(self.name("svc"), url=self.url, graceful_timeout=5)
        self.apps.append(app)
        return app

    # -- time ----------------------------------------------------------------------------------

    async def wait(self, seconds: float) -> None:
        """Let `seconds` pass: the virtual clock jumps, RabbitMQ takes them for real."""
        if self.broker is not None:
            await self.broker.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    async def settle(self) -> None:
        """Let whatever is in flight arrive, without letting (virtual) time pass."""
        if self.broker is not None:
            await self.broker.drain(advance_clock=False)
        else:
            await asyncio.sleep(QUIET)

    async def until(self, predicate: Callable[[], bool], *, timeout: float = 5.0) -> None:
        """Run until `predicate()` holds. Memory: drain, jumping the clock over every TTL.
        RabbitMQ: wait for real, up to `timeout`."""
        if self.broker is not None:
            await self.broker.drain()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while not predicate():  # noqa: ASYNC110 - waiting on the broker's doing
                        await asyncio.sleep(POLL)
        assert predicate(), f"{self.kind}: condition not met"

    # -- reading queues ------------------------------------------------------------------------

    async def fetch(
        self, channel: Channel, queue: str, count: int, *, timeout: float = 5.0, ack: bool = True
    ) -> list[Delivery]:
        """Exactly `count` messages from `queue` by basic.get, once they arrived (see `until`)."""
        got: list[Delivery] = []

        async def poll() -> bool:
            while len(got) < count and (delivery := await channel.get(queue)) is not None:
                got.append(delivery)
            return len(got) >= count

        if self.broker is not None:
            await self.broker.drain()
            await poll()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    while not await poll():  # noqa: ASYNC110 - waiting on the broker's doing
                        await asyncio.sleep(POLL)
        assert len(got) == count, f"{self.kind}: {len(got)} of {count} messages arrived in {queue}"
        if ack:
            for delivery in got:
                await channel.ack(delivery.delivery_tag)
        assert await channel.get(queue) is None, f"{self.kind}: more than {count} messages in {queue}"
        return got

    async def close(self) -> None:
        for other in self._others:
            await other.close()
        for app in self.apps:
            self.queues.extend(q.name for q in app.plan.queues)
            self.exchanges.extend(e.name for e in app.plan.exchanges if e.name)
        if self.broker is not None:  # the broker goes with the test
            await self.transport.close()
            return
        transport = self.transport if self.transport.is_open else await _connect(self.url)
        channel = await transport.channel()
        for kind, name in [*(("queue", q) for q in self.queues), *(("exchange", x) for x in self.exchanges)]:
            try:
                await (channel.delete_queue if kind == "queue" else channel.delete_exchange)(name)
            except TransportError:
                log.exception("could not delete %s %s", kind, name)
                channel = await transport.channel()
        await channel.close()
        await transport.close()
        if transport is not self.transport:
            await self.transport.close()


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


async def _connect(url: str) -> Transport:
    return await amqp.connect(parse_urls(url)[0], timeout=5, heartbeat=5, name="contract")


@pytest.fixture(params=[*(f"memory-{v}" for v in VERSIONS), "rabbitmq"])
def backend(request: pytest.FixtureRequest) -> str:
    """ "memory-<version>" (a MemoryBroker of that profile), or the real broker's URL."""
    if request.param.startswith("memory"):
        return str(request.param)
    url: str = request.getfixturevalue("broker_url")
    return url


@pytest.fixture
async def env(backend: str) -> AsyncIterator[Env]:
    if backend.startswith("memory-"):
        broker = MemoryBroker(version=backend.removeprefix("memory-"))
        environment = Env(backend, await broker.connect(), broker, "memory://")
    else:
        environment = Env("rabbitmq", await _connect(backend), None, backend)
    try:
        yield environment
    finally:
        await environment.close()


class Inbox:
    """A consumer callback that records deliveries and settles them as told."""

    def __init__(self, channel: Channel, action: str = "ack") -> None:
        self.channel = channel
        self.action = action  # ack | keep | requeue-once | requeue
        self.deliveries: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if self.action == "ack" or (self.action == "requeue-once" and len(self.deliveries) > 1):
            await self.channel.ack(delivery.delivery_tag)
        elif self.action in ("requeue", "requeue-once"):
            await self.channel.reject(delivery.delivery_tag, requeue=True)

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.deliveries]


async def take_all(channel: Channel, queue: str) -> list[bytes]:
    """The bodies of every message ready in `queue` now (acked), head first."""
    bodies = []
    while (delivery := await channel.get(queue)) is not None:
        await channel.ack(delivery.delivery_tag)
        bodies.append(delivery.body)
    return bodies


async def message_count(channel: Channel, queue: str) -> int:
    return (await channel.declare_queue(queue, passive=True)).message_count


async def wait_count(env: Env, channel: Channel, queue: str, count: int, timeout: float = 5.0) -> None:
    """Wait until `queue` holds `count` ready messages (without taking them)."""
    if env.broker is not None:
        await env.broker.drain()
    else:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while await message_count(channel, queue) != count:  # noqa: ASYNC110 - broker state
                    await asyncio.sleep(POLL)
    assert await message_count(channel, queue) == count, f"{env.kind}: {queue} never held {count}"


async def closed_with(call: Awaitable[object]) -> ChannelClosed:
    with pytest.raises(ChannelClosed) as caught:
        await call
    return caught.value


def typed(value: Any) -> Any:
    """`value` with each leaf paired with its type name, so == also compares types."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value).__name__, value)


def last_death(env: Env, reason: str, queue: str, exchange: str) -> dict[str, Any]:
    """The x-last-death-* headers a dead-lettered message carries: from 3.13 only."""
    if not env.at_least("3.13"):
        return {}
    return {"x-last-death-reason": reason, "x-last-death-queue": queue, "x-last-death-exchange": exchange}


def headers_of(delivery: Delivery) -> dict[str, Any]:
    return dict(delivery.properties.headers or {})


def deaths(headers: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`x-death` with each `time` checked (a UTC datetime of about now) and replaced by "<time>"."""
    entries = headers["x-death"]
    assert isinstance(entries, list)
    out = []
    for entry in entries:
        assert isinstance(entry, dict)
        time = entry["time"]
        assert isinstance(time, datetime), time
        assert time.tzinfo is not None
        assert time.utcoffset() == timedelta(0)
        assert abs(time - datetime.now(UTC)) < timedelta(seconds=30), time
        out.append({**entry, "time": "<time>"})
    return out


def death(
    queue: str,
    reason: str,
    exchange: str,
    routing_keys: list[str],
    count: int = 1,
    *,
    original_expiration: str | None = None,
) -> dict[str, Any]:
    """An expected `x-death` entry (see `deaths`)."""
    entry: dict[str, Any] = {
        "count": count,
        "reason": reason,
        "queue": queue,
        "time": "<time>",
        "exchange": exchange,
        "routing-keys": routing_keys,
    }
    if original_expiration is not None:
        entry["original-expiration"] = original_expiration
    return entry


async def publish_all(
    channel: Channel, exchange: str, keys: list[str], headers: list[dict[str, Any]] | None = None
) -> list[str]:
    """Publish one message per routing key (body = its index); the indices that came back."""
    returned: list[tuple[str, str, str]] = []
    for index, key in enumerate(keys):
        properties = props(headers=headers[index] if headers else None)
        try:
            await channel.publish(
                str(index).encode(), exchange=exchange, routing_key=key, properties=properties
            )
        except Unroutable as exc:
            returned.append((str(index), exc.exchange, exc.routing_key))
    assert [(x, k) for _, x, k in returned] == [(exchange, keys[int(i)]) for i, _, _ in returned]
    return [index for index, _, _ in returned]


# -- routing -----------------------------------------------------------------------------------


async def test_direct_exchange_routes_by_exact_key(env: Env) -> None:
    channel = await env.channel()
    exchange = await env.exchange(channel, "direct", "direct")
    a, b = await env.queue(channel, "a"), await env.queue(channel, "b")
    await channel.bind_queue(a, exchange, "red")
    await channel.bind_queue(b, exchange, "red")
    await channel.bind_queue(b, exchange, "green")
    await channel.bind_queue(b, exchange, "green")  # the same binding twice is one binding

    returned = await publish_all(channel, exchange, ["red", "green", "Red", "", "blue"])
    await env.settle()

    assert returned == ["2", "3", "4"]
    assert await take_all(channel, a) == [b"0"]
    assert await take_all(channel, b) == [b"0", b"1"]


async def test_fanout_exchange_ignores_the_key(env: Env) -> None:
    channel = await env.channel()
    exchange = await env.exchange(channel, "fanout", "fanout")
    a, b = await env.queue(channel, "a"), await env.queue(channel, "b")
    await channel.bind_queue(a, exchange, "")
    await channel.bind_queue(b, exchange, "whatever")

    returned = await publish_all(channel, exchange, ["", "x.y", "whatever"])
    await env.settle()

    assert returned == []
    assert await take_all(channel, a) == [b"0", b"1", b"2"]
    assert await take_all(channel, b) == [b"0", b"1", b"2"]


async def test_topic_exchange_matches_words(env: Env) -> None:
    channel = await env.channel()
    exchange = await env.exchange(channel, "topic", "topic")
    q1, q2, q3, q4 = [await env.queue(channel, f"q{i}") for i in range(1, 5)]
    await channel.bind_queue(q1, exchange, "*.orange.*")
    await channel.bind_queue(q2, exchange, "*.*.rabbit")
    await channel.bind_queue(q2, exchange, "lazy.#")
    await channel.bind_queue(q3, exchange, "a.#.z")
    await channel.bind_queue(q4, exchange, "#.end")
    keys = [
        "quick.orange.rabbit",  # 0: q1 q2 (q2 matched twice, one copy)
        "lazy.orange.elephant",  # 1: q1 q2
        "quick.orange.fox",  # 2: q1
        "lazy.brown.fox",  # 3: q2
        "lazy",  # 4: q2 (# is zero words)
        "lazy.",  # 5: q2 (an empty last word)
        ".orange.",  # 6: q1 (* matches an empty word)
        "a.z",  # 7: q3
        "a.b.c.z",  # 8: q3
        "a.z.end",  # 9: q4
        "end",  # 10: q4
        "quick.orange.male.rabbit",  # 11: none
        "orange",  # 12: none
        "",  # 13: none
    ]

    returned = await publish_all(channel, exchange, keys)
    await env.settle()

    assert returned == ["11", "12", "13"]
    assert await take_all(channel, q1) == [b"0", b"1", b"2", b"6"]
    assert await take_all(channel, q2) == [b"0", b"1", b"3", b"4", b"5"]
    assert await take_all(channel, q3) == [b"7", b"8"]
    assert await take_all(channel, q4) == [b"9", b"10"]


async def test_topic_hash_alone_matches_the_empty_key(env: Env) -> None:
    channel = await env.channel()
    exchange = await env.exchange(channel, "topic", "topic")
    hash_, star = await env.queue(channel, "hash"), await env.queue(channel, "star")
    await channel.bind_queue(hash_, exchange, "#")
    await channel.bind_queue(star, exchange, "*")

    returned = await publish_all(channel, exchange, ["", "a", "a.b", "."])
    await env.settle()

    assert returned == []
    assert await take_all(channel, hash_) == [b"0", b"1", b"2", b"3"]
    assert await take_all(channel, star) == [b"1"]


async def test_headers_exchange_matches_all_or_any(env: Env) -> None:
    channel = await env.channel()
    exchange = await env.exchange(channel, "headers", "headers")
    every, some, default, typed_, present = [
        await env.queue(channel, name) for name in ("all", "any", "default", "typed", "present")
    ]
    await channel.bind_queue(every, exchange, "", {"x-match": "all", "format": "pdf", "type": "report"})
    await channel.bind_queue(some, exchange, "", {"x-match": "any", "format": "pdf", "type": "log"})
    await channel.bind_queue(default, exchange, "", {"format": "zip"})  # x-match defaults to all
    await channel.bind_queue(typed_, exchange, "", {"x-match": "all", "level": 5})
    await channel.bind_queue(present, exchange, "", {"x-match": "any", "flag": None})
    headers: list[dict[str, Any]] = [
        {"format": "pdf", "type": "report"},  # 0: all any
        {"format": "pdf"},  # 1: any
        {"type": "log", "extra": 1},  # 2: any
        {"format": "zip", "type": "report"},  # 3: default
        {"level": 5},  # 4: typed
        {"level": "5"},  # 5: none (a string is not an integer)
        {"flag": "anything"},  # 6: present
        {"format": "doc"},  # 7: none
        {},  # 8: none
    ]

    returned = await publish_all(channel, exchange, ["key"] * len(headers), headers)
    await env.settle()

    assert returned == ["5", "7", "8"]
    assert await take_all(channel, every) == [b"0"]
    assert await take_all(channel, some) == [b"0", b"1", b"2"]
    assert await take_all(channel, default) == [b"3"]
    assert await take_all(channel, typed_) == [b"4"]
    assert await take_all(channel, present) == [b"6"]


async def test_headers_binding_x_keys_and_invalid_x_match(env: Env) -> None:
    channel = await env.channel()
    exchange = await env.exchange(channel, "headers", "headers")
    with_x, only_x = await env.queue(channel, "with-x"), await env.queue(channel, "only-x")
    await channel.bind_queue(with_x, exchange, "", {"x-match": "any-with-x", "x-kind": "a"})
    await channel.bind_queue(only_x, exchange, "", {"x-match": "all", "x-kind": "a"})  # matches all

    returned = await publish_all(channel, exchange, ["", ""], [{"x-kind": "a"}, {"other": 1}])
    await env.settle()

    assert returned == []
    assert await take_all(channel, with_x) == [b"0"]
    assert await take_all(channel, only_x) == [b"0", b"1"]
    texts = []
    for value in ("some", 5, True):
        texts.append(
            await closed_with((await env.channel()).bind_queue(with_x, exchange, "", {"x-match": value}))
        )
    assert [(e.code, e.text) for e in texts] == [
        (
            406,
            'PRECONDITION_FAILED - Invalid x-match field value <<"some">>; expected all, any, '
            "all-with-x, or any-with-x",
        ),
        (406, "PRECONDITION_FAILED - Invalid x-match field type byte (value 5); expected longstr"),
        (406, "PRECONDITION_FAILED - Invalid x-match field type bool (value true); expected longstr"),
    ]


async def test_default_exchange_routes_by_queue_name(env: Env) -> None:
    channel = await env.channel()
    queue = await env.queue(channel, "named")

    returned = await publish_all(channel, "", [queue, env.name("missing")])
    await env.settle()

    assert returned == ["1"]
    assert await take_all(channel, queue) == [b"0"]
    error = await closed_with(channel.bind_queue(queue, "", queue))
    assert (error.code, error.text) == (
        403,
        "ACCESS_REFUSED - operation not permitted on the default exchange",
    )


# -- TTL -------------------------------------------------------------------------------------------


async def test_queue_ttl_dead_letters_after_the_ttl(env: Env) -> None:
    channel = await env.channel()
    dlx = await env.exchange(channel, "dlx", "direct")
    target = await env.queue(channel, "target")
    # No x-dead-letter-routing-key: the message keeps its own routing key (the source's name).
    source = await env.queue(channel, "ttl", arguments={"x-message-ttl": 300, "x-dead-letter-exchange": dlx})
    await channel.bind_queue(target, dlx, source)
    await channel.publish(b"m", exchange="", routing_key=source, properties=props())

    await env.wait(0.15)
    assert await take_all(channel, target) == []
    assert await message_count(channel, source) == 1
    await env.wait(0.35)
    [dead] = await env.fetch(channel, target, 1)

    assert (dead.body, dead.exchange, dead.routing_key) == (b"m", dlx, source)
    assert typed(deaths(headers_of(dead))) == typed([death(source, "expired", "", [source])])
    assert await message_count(channel, source) == 0


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_per_message_ttl_expires_only_at_the_head(env: Env, queue_type: str) -> None:
    channel = await env.channel()
    target = await env.queue(channel, "target")
    source = await env.queue(
        channel,
        "head",
        arguments=queue_args(
            queue_type, **{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": target}
        ),
    )
    await channel.publish(b"slow", exchange="", routing_key=source, properties=props(expiration="900"))
    await channel.publish(b"fast", exchange="", routing_key=source, properties=props(expiration="300"))

    await env.wait(0.6)  # "fast" is past its TTL, but stuck behind the head
    assert await take_all(channel, target) == []
    assert await message_count(channel, source) == 2
    await env.wait(0.6)
    dead = await env.fetch(channel, target, 2)

    assert [d.body for d in dead] == [b"slow", b"fast"]
    assert [(d.exchange, d.routing_key) for d in dead] == [("", target)] * 2
    assert [d.properties.expiration for d in dead] == [None, None]
    assert typed(deaths(headers_of(dead[0]))) == typed(
        [death(source, "expired", "", [source], original_expiration="900")]
    )
    assert typed(deaths(headers_of(dead[1]))) == typed(
        [death(source, "expired", "", [source], original_expiration="300")]
    )


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_zero_ttl_message_reaches_only_a_waiting_consumer(env: Env, queue_type: str) -> None:
    channel = await env.channel()
    target = await env.queue(channel, "target")
    source = await env.queue(
        channel,
        "ttl0",
        arguments=queue_args(
            queue_type,
            **{"x-message-ttl": 0, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": target},
        ),
    )
    await channel.publish(b"nobody", exchange="", routing_key=source, properties=props())
    await env.settle()
    assert await take_all(channel, target) == [b"nobody"]

    inbox = Inbox(channel)
    await channel.consume(source, inbox, prefetch=10)
    await channel.publish(b"waiting", exchange="", routing_key=source, properties=props())
    await env.settle()

    # A waiting consumer gets even a TTL-0 message: classic queues deliver before TTL applies,
    # quorum queues give TTL 0 one millisecond (rabbit_fifo:update_expiry_header/3).
    assert inbox.bodies == [b"waiting"]
    assert await take_all(channel, target) == []


# -- dead-lettering --------------------------------------------------------------------------------


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_x_death_counts_rejections_and_expiries_round_a_loop(env: Env, queue_type: str) -> None:
    channel = await env.channel()
    exchange = await env.exchange(channel, "in", "direct")
    dlx = await env.exchange(channel, "dlx", "direct")
    work_name, retry_name = env.name("work"), env.name("retry")
    env.queues += [work_name, retry_name]
    # work --rejected--> dlx "retry" --> retry (TTL 200 ms) --expired--> "" work --> work
    await channel.declare_queue(
        work_name,
        arguments=queue_args(
            queue_type, **{"x-dead-letter-exchange": dlx, "x-dead-letter-routing-key": "retry"}
        ),
    )
    await channel.declare_queue(
        retry_name,
        arguments={
            "x-message-ttl": 200,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": work_name,
        },
    )
    await channel.bind_queue(work_name, exchange, "work")
    await channel.bind_queue(retry_name, dlx, "retry")
    await channel.publish(
        b"body",
        exchange=exchange,
        routing_key="work",
        properties=props(headers={"tenant": "acme"}, message_id="m-1"),
    )

    [first] = await env.fetch(channel, work_name, 1, ack=False)
    await channel.reject(first.delivery_tag, requeue=False)
    [second] = await env.fetch(channel, work_name, 1, ack=False)
    await channel.reject(second.delivery_tag, requeue=False)
    [third] = await env.fetch(channel, work_name, 1)
    log.info("%s: x-death after two rounds: %r", env.kind, headers_of(third)["x-death"])

    first_death = {
        "x-first-death-reason": "rejected",
        "x-first-death-queue": work_name,
        "x-first-death-exchange": exchange,
    }
    # Up to 3.13 basic.get from a quorum queue always adds x-delivery-count (a dead-lettered copy
    # starts at 0); 4.0 adds it only once a message was returned.
    get_count = {"x-delivery-count": 0} if queue_type == "quorum" and not env.at_least("4.0") else {}
    # 3.13+ also name the newest death: the expiry in the retry queue.
    last = last_death(env, "expired", retry_name, dlx)
    assert typed(headers_of(first)) == typed({"tenant": "acme", **get_count})
    # 4.0 carries the delivery count round the loop, the rejections counted: back redelivered,
    # with x-delivery-count 1, then 2 (3.10 starts each dead-lettered copy afresh).
    carried = queue_type == "quorum" and env.at_least("4.0")
    for rounds, delivery in enumerate((second, third), start=1):
        assert (delivery.body, delivery.properties.message_id) == (b"body", "m-1")
        assert (delivery.exchange, delivery.routing_key, delivery.redelivered) == ("", work_name, carried)
        headers = headers_of(delivery)
        count = {"x-delivery-count": rounds} if carried else get_count
        if carried and env.at_least("4.3"):  # emulated: 4.3's hand-out count travels the same way
            count["x-acquired-count"] = rounds
        assert set(headers) == {"tenant", "x-death", *first_death, *count, *last}
        assert typed({key: headers[key] for key in count}) == typed(count)
        assert typed({key: headers[key] for key in first_death}) == typed(first_death)
        assert typed({key: headers[key] for key in last}) == typed(last)
        assert headers["tenant"] == "acme"
    # The repeated entry keeps its first exchange and routing keys; only `count` moves.
    assert typed(deaths(headers_of(second))) == typed(
        [
            death(retry_name, "expired", dlx, ["retry"]),
            death(work_name, "rejected", exchange, ["work"]),
        ]
    )
    assert typed(deaths(headers_of(third))) == typed(
        [
            death(retry_name, "expired", dlx, ["retry"], count=2),
            death(work_name, "rejected", exchange, ["work"], count=2),
        ]
    )


async def test_quorum_delivery_limit_dead_letters_with_its_reason(env: Env) -> None:
    channel = await env.channel()
    target = await env.queue(channel, "target")
    source = await env.queue(
        channel,
        "limited",
        arguments={
            **QUORUM,
            "x-delivery-limit": 2,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target,
        },
    )
    inbox = Inbox(channel, "requeue")
    await channel.consume(source, inbox, prefetch=1)
    await channel.publish(
        b"poison", exchange="", routing_key=source, properties=props(headers={"tenant": "acme"})
    )

    [dead] = await env.fetch(channel, target, 1)

    assert inbox.bodies == [b"poison"] * 3
    assert [d.redelivered for d in inbox.deliveries] == [False, True, True]
    assert [headers_of(d).get("x-delivery-count") for d in inbox.deliveries] == [None, 1, 2]
    # 4.3 also counts every hand-out in x-acquired-count; basic.reject counts towards the limit.
    acquired = [None, 1, 2] if env.at_least("4.3") else [None, None, None]
    assert [headers_of(d).get("x-acquired-count") for d in inbox.deliveries] == acquired
    assert dead.body == b"poison"
    headers = headers_of(dead)
    log.info("%s: delivery_limit headers: %r", env.kind, headers)
    last = last_death(env, "delivery_limit", source, "")
    assert set(headers) == {
        "tenant",
        "x-death",
        "x-first-death-reason",
        "x-first-death-queue",
        "x-first-death-exchange",
        *last,
    }
    assert typed({key: headers[key] for key in last}) == typed(last)
    assert typed(deaths(headers)) == typed([death(source, "delivery_limit", "", [source])])
    assert (headers["x-first-death-reason"], headers["x-first-death-queue"]) == ("delivery_limit", source)
    assert headers["x-first-death-exchange"] == ""


async def test_dead_letter_cycle_without_a_rejection_is_dropped(env: Env) -> None:
    channel = await env.channel()
    work_name, retry_name = env.name("work"), env.name("retry")
    env.queues += [work_name, retry_name]
    # work --delivery_limit--> retry (TTL 200 ms) --expired--> work: a loop with no rejection
    await channel.declare_queue(
        work_name,
        arguments={
            **QUORUM,
            "x-delivery-limit": 0,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": retry_name,
        },
    )
    await channel.declare_queue(
        retry_name,
        arguments={
            "x-message-ttl": 200,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": work_name,
        },
    )
    inbox = Inbox(channel, "requeue")
    await channel.consume(work_name, inbox, prefetch=1)
    await channel.publish(b"loop", exchange="", routing_key=work_name, properties=props())

    await env.settle()
    assert inbox.bodies == [b"loop"]
    assert await message_count(channel, retry_name) == 1
    await env.wait(0.5)

    assert inbox.bodies == [b"loop"]
    assert await message_count(channel, retry_name) == 0
    assert await message_count(channel, work_name) == 0


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_max_length_dead_letters_the_head_as_maxlen(env: Env, queue_type: str) -> None:
    channel = await env.channel()
    target = await env.queue(channel, "target")
    source = await env.queue(
        channel,
        "short",
        arguments=queue_args(
            queue_type,
            **{"x-max-length": 2, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": target},
        ),
    )
    for body in (b"0", b"1", b"2"):
        await channel.publish(body, exchange="", routing_key=source, properties=props())

    [dead] = await env.fetch(channel, target, 1)

    assert dead.body == b"0"
    assert typed(deaths(headers_of(dead))) == typed([death(source, "maxlen", "", [source])])
    assert headers_of(dead)["x-first-death-reason"] == "maxlen"
    assert await message_count(channel, source) == 2


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_reject_publish_overflow_nacks_publishes(env: Env, queue_type: str) -> None:
    channel = await env.channel()
    queue = await env.queue(
        channel,
        "full",
        arguments=queue_args(queue_type, **{"x-max-length": 5, "x-overflow": "reject-publish"}),
    )

    async def step(action: str) -> str:
        if action == "get":
            delivery = await channel.get(queue)
            assert delivery is not None
            await channel.ack(delivery.delivery_tag)
            await env.settle()
            return "got"
        try:
            await channel.publish(b"m", exchange="", routing_key=queue, properties=props())
        except PublishNacked:
            return "nack"
        return "ok"

    steps = ["pub"] * 7 + ["get", "pub", "get", "pub", "pub", "pub"]
    outcomes = [await step(action) for action in steps]

    # Classic queues refuse at the limit. Quorum queues (rabbit_fifo) accept the message that
    # takes them over it, then refuse until the ready count is back at 80% of the limit.
    if queue_type == "classic":
        expected = ["ok"] * 5 + ["nack", "nack", "got", "ok", "got", "ok", "nack", "nack"]
    else:
        expected = ["ok"] * 6 + ["nack", "got", "nack", "got", "ok", "ok", "nack"]
    assert outcomes == expected
    assert channel.is_open
    assert await message_count(channel, queue) == (5 if queue_type == "classic" else 6)


async def test_quorum_ignores_reject_publish_dlx(env: Env) -> None:
    channel = await env.channel()
    target = await env.queue(channel, "target")
    queue = await env.queue(
        channel,
        "rpdlx",
        arguments={
            **QUORUM,
            "x-max-length": 1,
            "x-overflow": "reject-publish-dlx",
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": target,
        },
    )
    for body in (b"0", b"1", b"2"):
        await channel.publish(body, exchange="", routing_key=queue, properties=props())

    # 3.10 warns about the strategy and drops from the head instead.
    dead = await env.fetch(channel, target, 2)
    assert [d.body for d in dead] == [b"0", b"1"]
    assert [deaths(headers_of(d))[0]["reason"] for d in dead] == ["maxlen", "maxlen"]
    assert await take_all(channel, queue) == [b"2"]


# -- consuming -------------------------------------------------------------------------------------


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_prefetch_limits_unacked_deliveries(env: Env, queue_type: str) -> None:
    channel = await env.channel()
    queue = await env.queue(channel, "prefetch", arguments=queue_args(queue_type))
    for index in range(5):
        await channel.publish(str(index).encode(), exchange="", routing_key=queue, properties=props())
    inbox = Inbox(channel, "keep")
    await channel.consume(queue, inbox, prefetch=2)

    await env.settle()
    assert inbox.bodies == [b"0", b"1"]
    await channel.ack(inbox.deliveries[0].delivery_tag)
    await env.settle()
    assert inbox.bodies == [b"0", b"1", b"2"]
    await channel.ack(inbox.deliveries[2].delivery_tag, multiple=True)
    await env.settle()
    assert inbox.bodies == [b"0", b"1", b"2", b"3", b"4"]
    assert await message_count(channel, queue) == 0


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_requeued_delivery_comes_back_redelivered(env: Env, queue_type: str) -> None:
    channel = await env.channel()
    queue = await env.queue(channel, "requeue", arguments=queue_args(queue_type))
    original = {"tenant": "acme", "n": 7, "nested": {"a": [1, "b"]}}
    inbox = Inbox(channel, "requeue-once")
    await channel.consume(queue, inbox, prefetch=1)
    await channel.publish(
        b"again",
        exchange="",
        routing_key=queue,
        properties=props(headers=original, message_id="m-1", content_type="text/plain"),
    )

    await env.until(lambda: len(inbox.deliveries) == 2)

    first, second = inbox.deliveries
    assert (first.redelivered, second.redelivered) == (False, True)
    for delivery in (first, second):
        assert delivery.body == b"again"
        assert (delivery.properties.message_id, delivery.properties.content_type) == ("m-1", "text/plain")
    assert typed(headers_of(first)) == typed(original)
    redelivered = {**original, "x-delivery-count": 1} if queue_type == "quorum" else original
    if queue_type == "quorum" and env.at_least("4.3"):
        redelivered["x-acquired-count"] = 1  # 4.3: every hand-out before this one
    assert typed(headers_of(second)) == typed(redelivered)
    await env.settle()
    assert len(inbox.deliveries) == 2


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_basic_get_requeue_comes_back_redelivered(env: Env, queue_type: str) -> None:
    channel = await env.channel()
    queue = await env.queue(channel, "get", arguments=queue_args(queue_type))
    await channel.publish(
        b"again", exchange="", routing_key=queue, properties=props(headers={"tenant": "acme"})
    )

    first = await channel.get(queue)
    assert first is not None
    await channel.reject(first.delivery_tag, requeue=True)
    [second] = await env.fetch(channel, queue, 1)

    assert (first.redelivered, second.redelivered) == (False, True)
    assert first.body == second.body == b"again"
    counts = [headers_of(d).get("x-delivery-count") for d in (first, second)]
    log.info("%s: x-delivery-count on basic.get: %r", env.kind, counts)
    first_get = None if env.at_least("4.0") else 0  # 4.0 adds none before a return
    assert counts == ([first_get, 1] if queue_type == "quorum" else [None, None])
    assert headers_of(second)["tenant"] == "acme"


@pytest.mark.parametrize(
    ("queue_type", "arguments", "order"),
    [
        ("classic", {}, [b"0", b"1", b"2", b"3"]),  # back at their old places
        ("quorum", {}, [b"2", b"3", b"1", b"0"]),  # appended to the back (3.10-3.13)
        ("quorum", {"x-delivery-limit": 10}, [b"1", b"0", b"2", b"3"]),  # returns go first
    ],
    ids=["classic", "quorum", "quorum-delivery-limit"],
)
async def test_requeue_order(
    env: Env, queue_type: str, arguments: dict[str, Any], order: list[bytes]
) -> None:
    if queue_type == "quorum" and not arguments and env.at_least("4.0"):
        # 4.0+ give every quorum queue a delivery limit (20 by default): returns go first there too.
        order = [b"1", b"0", b"2", b"3"]
    channel = await env.channel()
    queue = await env.queue(channel, "order", arguments=queue_args(queue_type, **arguments))
    for body in (b"0", b"1", b"2", b"3"):
        await channel.publish(body, exchange="", routing_key=queue, properties=props())
    first, second = await channel.get(queue), await channel.get(queue)
    assert first is not None
    assert second is not None

    await channel.reject(second.delivery_tag, requeue=True)
    await channel.reject(first.delivery_tag, requeue=True)
    bodies = await take_all(channel, queue)

    assert bodies == order


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_closing_a_channel_returns_its_unacked_deliveries(env: Env, queue_type: str) -> None:
    channel = await env.channel()
    queue = await env.queue(channel, "close", arguments=queue_args(queue_type))
    for body in (b"0", b"1", b"2"):
        await channel.publish(body, exchange="", routing_key=queue, properties=props())
    consumer = await env.channel()
    inbox = Inbox(consumer, "keep")
    await consumer.consume(queue, inbox, prefetch=2)
    await env.settle()
    assert inbox.bodies == [b"0", b"1"]

    await consumer.close()
    await env.settle()
    returned = [await channel.get(queue) for _ in range(3)]

    assert [d.body if d else None for d in returned] == [b"0", b"1", b"2"]
    assert [d.redelivered if d else None for d in returned] == [True, True, False]
    counts = [headers_of(d).get("x-delivery-count") if d else None for d in returned]
    never_returned = None if env.at_least("4.0") else 0  # 4.0 adds none before a return
    assert counts == ([1, 1, never_returned] if queue_type == "quorum" else [None, None, None])


async def test_acking_an_unknown_tag_closes_the_channel_afterwards(env: Env) -> None:
    channel = await env.channel()
    queue = await env.queue(channel, "unknown-tag")
    await channel.publish(b"m", exchange="", routing_key=queue, properties=props())
    held = await channel.get(queue)
    assert held is not None

    await channel.ack(held.delivery_tag + 1)  # no reply comes to basic.ack: no error here
    await env.settle()

    assert not channel.is_open
    with pytest.raises(TransportError):
        await channel.declare_queue(queue)
    other = await env.channel()
    [again] = await env.fetch(other, queue, 1)  # the held delivery went back to the queue
    assert (again.body, again.redelivered) == (b"m", True)


# -- publishing ------------------------------------------------------------------------------------


async def test_mandatory_publish_without_a_binding_is_returned(env: Env) -> None:
    channel = await env.channel()
    exchange = await env.exchange(channel, "lonely", "direct")

    with pytest.raises(Unroutable) as caught:
        await channel.publish(b"x", exchange=exchange, routing_key="nobody", properties=props())
    assert (caught.value.exchange, caught.value.routing_key) == (exchange, "nobody")
    await channel.publish(b"x", exchange=exchange, routing_key="nobody", properties=props(), mandatory=False)
    assert channel.is_open


async def test_publish_to_a_missing_exchange_closes_the_channel(env: Env) -> None:
    channel = await env.channel()
    missing = env.name("missing")

    error = await closed_with(channel.publish(b"x", exchange=missing, routing_key="k", properties=props()))

    log.info("%s: %d %s", env.kind, error.code, error.text)
    assert (error.code, error.text) == (404, f"NOT_FOUND - no exchange '{missing}' in vhost '/'")
    await env.settle()
    assert not channel.is_open
    with pytest.raises(TransportError):
        await channel.declare_queue(env.name("after"), arguments={})
    other = await env.channel()  # the connection lives on
    await other.declare_exchange("amq.direct", "direct", passive=True)


# -- redeclaring -----------------------------------------------------------------------------------


async def test_queue_redeclared_with_another_ttl_fails_406(env: Env) -> None:
    channel = await env.channel()
    queue = await env.queue(channel, "ttl", arguments={"x-message-ttl": 1000})

    error = await closed_with(channel.declare_queue(queue, arguments={"x-message-ttl": 2000}))

    log.info("%s: %d %s", env.kind, error.code, error.text)
    assert error.code == 406
    assert error.text.startswith(
        f"PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{queue}'"
    )
    # Both values present: RabbitMQ prints them bare; one missing: with its type.
    assert error.text == (
        f"PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{queue}' in vhost '/': "
        "received '2000' but current is '1000'"
    )
    missing = await closed_with((await env.channel()).declare_queue(queue))
    log.info("%s: %d %s", env.kind, missing.code, missing.text)
    assert (missing.code, missing.text) == (
        406,
        f"PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue '{queue}' in vhost '/': "
        "received none but current is the value '1000' of type 'short'",
    )
    other = await env.channel()
    assert (await other.declare_queue(queue, arguments={"x-message-ttl": 1000})).name == queue


async def test_queue_redeclared_with_another_durability_fails_406(env: Env) -> None:
    channel = await env.channel()
    queue = await env.queue(channel, "durable", durable=True)

    error = await closed_with(channel.declare_queue(queue, durable=False))

    log.info("%s: %d %s", env.kind, error.code, error.text)
    assert error.code == 406
    assert error.text.startswith(f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{queue}'")
    assert error.text == (
        f"PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{queue}' in vhost '/': "
        "received 'false' but current is 'true'"
    )


async def test_exchange_redeclared_with_another_type_fails_406(env: Env) -> None:
    channel = await env.channel()
    exchange = await env.exchange(channel, "typed", "direct")

    error = await closed_with(channel.declare_exchange(exchange, "topic"))

    log.info("%s: %d %s", env.kind, error.code, error.text)
    assert error.code == 406
    assert error.text.startswith(f"PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{exchange}'")
    assert error.text == (
        f"PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{exchange}' in vhost '/': "
        "received 'topic' but current is 'direct'"
    )
    durable = await closed_with((await env.channel()).declare_exchange(exchange, "direct", durable=False))
    log.info("%s: %d %s", env.kind, durable.code, durable.text)
    assert (durable.code, durable.text) == (
        406,
        f"PRECONDITION_FAILED - inequivalent arg 'durable' for exchange '{exchange}' in vhost '/': "
        "received 'false' but current is 'true'",
    )


async def test_invalid_expirations_close_the_channel(env: Env) -> None:
    queue = await env.queue(await env.channel(), "exp")
    texts = []
    for expiration in ("soon", "10s", "-5"):
        channel = await env.channel()
        publish = channel.publish(
            b"x", exchange="", routing_key=queue, properties=props(expiration=expiration)
        )
        texts.append((await closed_with(publish)).text)
    log.info("%s: %s", env.kind, texts)

    assert texts == [
        "PRECONDITION_FAILED - invalid expiration 'soon': no_integer",
        "PRECONDITION_FAILED - invalid expiration '10s': {leftover_string,\"s\"}",
        "PRECONDITION_FAILED - invalid expiration '-5': {value_negative,-5}",
    ]


async def test_missing_reserved_and_refused_names_fail(env: Env) -> None:
    queue = await env.queue(await env.channel(), "present")
    missing = env.name("missing")

    async def nothing(delivery: Delivery) -> None:
        return None

    calls: list[tuple[Callable[[Channel], Awaitable[object]], int, str]] = [
        (
            lambda c: c.declare_queue(missing, passive=True),
            404,
            f"NOT_FOUND - no queue '{missing}' in vhost '/'",
        ),
        (
            lambda c: c.declare_exchange(missing, passive=True),
            404,
            f"NOT_FOUND - no exchange '{missing}' in vhost '/'",
        ),
        (
            lambda c: c.consume(missing, nothing, prefetch=1),
            404,
            f"NOT_FOUND - no queue '{missing}' in vhost '/'",
        ),
        (lambda c: c.get(missing), 404, f"NOT_FOUND - no queue '{missing}' in vhost '/'"),
        (
            lambda c: c.bind_queue(queue, missing, "k"),
            404,
            f"NOT_FOUND - no exchange '{missing}' in vhost '/'",
        ),
        (
            lambda c: c.bind_queue(missing, "amq.direct", "k"),
            404,
            f"NOT_FOUND - no queue '{missing}' in vhost '/'",
        ),
        (
            lambda c: c.declare_exchange("amq.contract", "direct"),
            403,
            "ACCESS_REFUSED - exchange name 'amq.contract' contains reserved prefix 'amq.*'",
        ),
        (
            lambda c: c.declare_queue("amq.contract"),
            403,
            "ACCESS_REFUSED - queue name 'amq.contract' contains reserved prefix 'amq.*'",
        ),
        (
            lambda c: c.delete_exchange("amq.direct"),
            403,
            "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed",
        ),
        (
            lambda c: c.declare_exchange("", "direct"),
            403,
            "ACCESS_REFUSED - operation not permitted on the default exchange",
        ),
        (
            lambda c: c.declare_queue("", arguments=QUORUM),
            406,
            "PRECONDITION_FAILED - Cannot declare a server-named queue for type rabbit_quorum_queue",
        ),
        *(
            []
            if env.at_least("4.3")  # refused before, as a transient non-exclusive queue (a 541)
            else [
                (
                    lambda c: c.declare_queue(missing, durable=False, arguments=QUORUM),
                    406,
                    f"PRECONDITION_FAILED - invalid property 'non-durable' for queue '{missing}' "
                    "in vhost '/'",
                )
            ]
        ),
        (
            lambda c: c.declare_queue(missing, exclusive=True, arguments=QUORUM),
            406,
            f"PRECONDITION_FAILED - invalid property 'exclusive-owner' for queue '{missing}' in vhost '/'",
        ),
    ]
    env.queues.append(missing)  # in case a broker wrongly created it
    errors = [await closed_with(call(await env.channel())) for call, _, _ in calls]

    log.info("%s: %s", env.kind, [(e.code, e.text) for e in errors])
    assert [(e.code, e.text) for e in errors] == [(code, text) for _, code, text in calls]
    # Deleting what does not exist is no error.
    channel = await env.channel()
    await channel.delete_queue(missing)
    await channel.delete_exchange(missing)
    assert channel.is_open


async def test_exclusive_queue_is_locked_to_its_connection(env: Env) -> None:
    channel = await env.channel()
    info = await channel.declare_queue("", exclusive=True)
    assert info.name.startswith("amq.gen-")
    other = await env.connect()

    locked = await closed_with((await other.channel()).declare_queue(info.name, passive=True))

    assert (locked.code, locked.text) == (
        405,
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{info.name}' in vhost '/'. "
        "It could be originally declared on another connection or the exclusive property value does "
        "not match that of the original declaration.",
    )
    await env.transport.close()
    with pytest.raises(ChannelClosed) as gone:
        await (await other.channel()).declare_queue(info.name, passive=True)
    assert gone.value.code == 404  # an exclusive queue goes with its connection


async def test_an_unknown_exchange_type_closes_the_connection_up_to_3_13_the_channel_from_4_0(
    env: Env,
) -> None:
    channel = await env.channel()
    name = env.name("odd")

    if env.at_least("4.0"):
        error = await closed_with(channel.declare_exchange(name, "nope"))
        assert (error.code, error.text) == (406, "PRECONDITION_FAILED - unknown exchange type 'nope'")
        await env.settle()
        assert env.transport.is_open  # the connection's other channels go on
    else:
        with pytest.raises(ConnectionLost):
            await channel.declare_exchange(name, "nope")
        await env.settle()
        assert not env.transport.is_open
    assert not channel.is_open


async def test_queue_redeclare_compares_only_arguments_its_type_supports(env: Env) -> None:
    channel = await env.channel()
    classic = await env.queue(channel, "classic")
    quorum = await env.queue(channel, "quorum", arguments={**QUORUM, "x-delivery-limit": 2})

    await channel.declare_queue(classic, arguments={"x-delivery-limit": 5})  # not compared
    error = await closed_with(channel.declare_queue(quorum, arguments={**QUORUM, "x-delivery-limit": 3}))

    assert (error.code, error.text) == (
        406,
        f"PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue '{quorum}' in vhost '/': "
        "received '3' but current is '2'",
    )


# (arguments, the argument RabbitMQ names, the end of its text) for queue.declare refusals, in
# 3.10.8's order: checks shared by all types, then arguments the type lacks, then its own checks.
INVALID_ARGUMENTS: list[tuple[dict[str, Any], str, str]] = [
    ({"x-message-ttl": "abc"}, "x-message-ttl", ': "expected integer, got longstr"'),
    ({"x-message-ttl": -1}, "x-message-ttl", ": {value_negative,-1}"),
    ({"x-expires": 0}, "x-expires", ": {value_zero,0}"),
    ({"x-max-length": 1.5}, "x-max-length", ': "expected integer, got float"'),
    ({"x-overflow": "explode"}, "x-overflow", ": invalid_overflow"),
    ({"x-queue-type": "fancy"}, "x-queue-type", ": \"unsupported queue type 'fancy'\""),
    ({"x-dead-letter-routing-key": "k"}, "x-dead-letter-routing-key", ": routing_key_but_no_dlx_defined"),
    ({"x-single-active-consumer": "yes"}, "x-single-active-consumer", ": {unacceptable_type,longstr}"),
    ({"x-max-priority": 256}, "x-max-priority", ": {max_value_exceeded,256}"),
    ({"x-delivery-limit": 5}, "x-delivery-limit", " of queue type rabbit_classic_queue"),
    (
        {"x-dead-letter-strategy": "at-least-once"},
        "x-dead-letter-strategy",
        " of queue type rabbit_classic_queue",
    ),
    ({**QUORUM, "x-max-priority": 5}, "x-max-priority", " of queue type rabbit_quorum_queue"),
    ({**QUORUM, "x-message-ttl": -5, "x-max-priority": 5}, "x-message-ttl", ": {value_negative,-5}"),
    ({**QUORUM, "x-dead-letter-strategy": "bogus"}, "x-dead-letter-strategy", ": invalid_dlx_strategy"),
]


async def test_invalid_queue_arguments_fail_406(env: Env) -> None:
    texts, expected = [], []
    for arguments, key, tail in INVALID_ARGUMENTS:
        name = env.name("bad")
        env.queues.append(name)
        error = await closed_with((await env.channel()).declare_queue(name, arguments=arguments))
        texts.append((error.code, error.text.replace(name, "<q>")))
        expected.append(
            (406, f"PRECONDITION_FAILED - invalid arg '{key}' for queue '<q>' in vhost '/'{tail}")
        )
    log.info("%s: %s", env.kind, texts)
    assert texts == expected

    name = env.name("dlx")
    error = await closed_with(
        (await env.channel()).declare_queue(name, arguments={"x-dead-letter-exchange": 5})
    )
    assert (error.code, error.text) == (
        406,
        "PRECONDITION_FAILED - invalid type 'byte' for arg 'x-dead-letter-exchange' "
        f"in queue '{name}' in vhost '/'",
    )
    # A quorum queue takes any x-delivery-limit unchecked.
    await env.queue(await env.channel(), "odd-limit", arguments={**QUORUM, "x-delivery-limit": "abc"})


# -- what later versions do differently ------------------------------------------------------------


@pytest.mark.parametrize("limit", [None, -1], ids=["default", "minus-one"])
async def test_quorum_queue_without_a_dead_letter_exchange_and_its_delivery_limit(
    env: Env, limit: int | None
) -> None:
    channel = await env.channel()
    arguments = {**QUORUM} if limit is None else {**QUORUM, "x-delivery-limit": limit}
    queue = await env.queue(channel, "nodlx", arguments=arguments)
    await channel.publish(b"m", exchange="", routing_key=queue, properties=props())
    await env.settle()

    gets = 0
    while gets < 25 and (delivery := await channel.get(queue)) is not None:
        gets += 1
        await channel.reject(delivery.delivery_tag, requeue=True)
        await env.settle()
    left = await message_count(channel, queue)

    if limit is None:
        # 4.0+: a default limit of 20, and at the limit a queue without a dead-letter exchange
        # drops the message (https://github.com/rabbitmq/rabbitmq-server/releases/tag/v4.0.1).
        assert (gets, left) == ((21, 0) if env.at_least("4.0") else (25, 1))
    else:
        # -1 means unlimited from 4.0; 3.10 compares the count with -1 and drops at the first return.
        assert (gets, left) == ((25, 1) if env.at_least("4.0") else (1, 0))


async def test_client_set_x_death_is_counted_on_until_4_0(env: Env) -> None:
    channel = await env.channel()
    target = await env.queue(channel, "target")
    source = await env.queue(
        channel, "source", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": target}
    )
    now = datetime.now(UTC).replace(microsecond=0)
    client_death = {
        "count": 5,
        "reason": "rejected",
        "queue": source,
        "time": now,
        "exchange": "",
        "routing-keys": [source],
    }
    await channel.publish(
        b"m", exchange="", routing_key=source, properties=props(headers={"x-death": [client_death]})
    )
    [delivery] = await env.fetch(channel, source, 1, ack=False)
    await channel.reject(delivery.delivery_tag, requeue=False)
    [dead] = await env.fetch(channel, target, 1)

    headers = headers_of(dead)
    log.info("%s: x-death after a client-set one: %r", env.kind, headers)
    last = last_death(env, "rejected", source, "")
    if env.at_least("4.0"):
        # 4.0+ never interpret a client-set x-death: the broker's history starts at this death
        # (https://github.com/rabbitmq/rabbitmq-server/pull/11339).
        first = {
            "x-first-death-reason": "rejected",
            "x-first-death-queue": source,
            "x-first-death-exchange": "",
        }
        assert set(headers) == {"x-death", *first, *last}
        assert typed(deaths(headers)) == typed([death(source, "rejected", "", [source])])
    else:
        # Up to 3.12 (and 3.13.3+) the broker counts on: a republished x-death is no safe counter.
        assert set(headers) == {"x-death", *last}
        assert typed(deaths(headers)) == typed([death(source, "rejected", "", [source], count=6)])


async def test_transient_non_exclusive_queue_is_refused_from_4_3(env: Env) -> None:
    channel = await env.channel()
    name = env.name("transient")
    env.queues.append(name)

    if env.at_least("4.3"):
        # https://github.com/rabbitmq/rabbitmq-server/releases/tag/v4.3.0: a connection error
        with pytest.raises(ConnectionLost) as refused:
            await channel.declare_queue(name, durable=False)
        assert "541 INTERNAL_ERROR - Feature `transient_nonexcl_queues` is deprecated." in str(refused.value)
        assert not env.transport.is_open
        return
    await channel.declare_queue(name, durable=False)
    exclusive = await channel.declare_queue("", durable=False, exclusive=True)  # fine everywhere
    assert exclusive.name.startswith("amq.gen-")
    assert channel.is_open


async def test_x_queue_mode_is_refused_from_4_3(env: Env) -> None:
    channel = await env.channel()
    name = env.name("lazy")
    env.queues.append(name)

    if env.at_least("4.3"):
        # https://github.com/rabbitmq/rabbitmq-server/pull/14769: CQv1 and x-queue-mode are gone
        error = await closed_with(channel.declare_queue(name, arguments={"x-queue-mode": "lazy"}))
        assert error.code == 406
        assert error.text.startswith(f"PRECONDITION_FAILED - invalid arg 'x-queue-mode' for queue '{name}'")
        return
    await channel.declare_queue(name, arguments={"x-queue-mode": "lazy"})
    assert channel.is_open


async def test_a_message_over_16_mib_is_refused_from_4_0(env: Env) -> None:
    channel = await env.channel()
    queue = await env.queue(channel, "big")
    body = b"x" * (16 * 1024 * 1024 + 1)

    if env.at_least("4.0"):
        # https://github.com/rabbitmq/rabbitmq-server/pull/11455: the default max is 16 MiB
        error = await closed_with(channel.publish(body, exchange="", routing_key=queue, properties=props()))
        assert (error.code, error.text) == (
            406,
            f"PRECONDITION_FAILED - message size {len(body)} is larger than configured max size 16777216",
        )
        return
    await channel.publish(body, exchange="", routing_key=queue, properties=props())  # 128 MiB here
    [delivery] = await env.fetch(channel, queue, 1)
    assert len(delivery.body) == len(body)


# -- rabbitflow end to end -------------------------------------------------------------------------


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_app_always_failing_handler_retries_then_parks(env: Env, queue_type: str) -> None:
    app = env.app()
    queue = env.name("fail")
    calls: list[int] = []

    @app.consumer(queue, retries=2, delay=0.3, queue_type=queue_type)
    async def handle(body: Any, message: Message) -> None:
        calls.append(message.attempt)
        raise RuntimeError(f"cannot handle {body['id']}")

    async with app:
        await app.publish({"id": 42}, routing_key=queue, headers={"tenant": "acme"}, message_id="order-42")
        channel = await env.channel()
        [parked] = await env.fetch(channel, f"{queue}.parked", 1)
        assert await message_count(channel, queue) == 0

    assert calls == [1, 2, 3]
    headers = headers_of(parked)
    assert typed([headers["x-rf-reason"], headers["x-rf-attempts"]]) == typed(["exhausted", 3])
    assert headers["x-rf-error"] == "cannot handle 42"
    assert headers["tenant"] == "acme"
    assert not any(key.startswith(("x-death", "x-first-death")) for key in headers)
    assert parked.body == b'{"id":42}'
    assert parked.properties.message_id == "order-42"


async def test_app_fail_once_then_succeed_parks_nothing(env: Env) -> None:
    app = env.app()
    queue = env.name("flaky")
    calls: list[int] = []

    @app.consumer(queue, retries=2, delay=0.3)
    async def handle(body: Any, message: Message) -> None:
        calls.append(message.attempt)
        if message.attempt == 1:
            raise ConnectionError("downstream busy")

    async with app:
        await app.publish({"x": 1}, routing_key=queue)
        await env.until(lambda: len(calls) == 2)
        await env.settle()
        channel = await env.channel()
        assert await message_count(channel, f"{queue}.parked") == 0
        assert await message_count(channel, queue) == 0

    assert calls == [1, 2]


async def test_app_parks_invalid_json_as_decode_error(env: Env) -> None:
    app = env.app()
    queue = env.name("bad")
    calls: list[Any] = []

    @app.consumer(queue, retries=2, delay=0.3)
    async def handle(body: Any) -> None:
        calls.append(body)

    async with app:
        channel = await env.channel()
        await channel.publish(
            b"{not json", exchange="", routing_key=queue, properties=props(content_type="application/json")
        )
        [parked] = await env.fetch(channel, f"{queue}.parked", 1)

    assert calls == []
    assert parked.body == b"{not json"
    assert headers_of(parked)["x-rf-reason"] == "decode-error"


async def test_app_parks_a_rejected_message_at_once(env: Env) -> None:
    app = env.app()
    queue = env.name("rej")
    calls: list[int] = []

    @app.consumer(queue, retries=2, delay=0.3)
    async def handle(body: Any, message: Message) -> None:
        calls.append(message.attempt)
        raise Reject("quantity must be positive")

    async with app:
        await app.publish({"quantity": -1}, routing_key=queue, message_id="order-7")
        channel = await env.channel()
        [parked] = await env.fetch(channel, f"{queue}.parked", 1)

    headers = headers_of(parked)
    assert calls == [1]
    assert (headers["x-rf-reason"], headers["x-rf-attempts"]) == ("rejected", 1)
    assert headers["x-rf-error"] == "quantity must be positive"
    assert parked.properties.message_id == "order-7"


@pytest.mark.parametrize("queue_type", QUEUE_TYPES)
async def test_app_retries_up_a_delay_ladder_then_parks(env: Env, queue_type: str) -> None:
    app = env.app()
    queue = env.name("ladder")
    seen: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()

    @app.consumer(queue, retries=3, delay=[0.2, 0.4], queue_type=queue_type)
    async def handle(body: Any, message: Message) -> None:
        now = env.broker.now if env.broker is not None else loop.time()
        seen.append((message.attempt, now))
        raise RuntimeError("still broken")

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        channel = await env.channel()
        [parked] = await env.fetch(channel, f"{queue}.parked", 1)

    assert [attempt for attempt, _ in seen] == [1, 2, 3, 4]
    waits = [round(b - a, 1) for (_, a), (_, b) in itertools.pairwise(seen)]
    assert all(wait >= expected for wait, expected in zip(waits, [0.2, 0.4, 0.4], strict=True)), waits
    assert sorted(q.name for q in app.plan.queues if q.role == "retry") == [
        f"{queue}.retry.200ms",
        f"{queue}.retry.400ms",
    ]
    assert (headers_of(parked)["x-rf-reason"], headers_of(parked)["x-rf-attempts"]) == ("exhausted", 4)


async def test_app_delivery_limit_parks_a_message_returned_too_often(env: Env) -> None:
    """The quorum backstop: a message returned more than x-delivery-limit (20) times, by
    basic.reject with requeue as rabbitflow sends it, is dead-lettered to the parking queue on
    every version (4.3 counts basic.reject, not basic.nack)."""
    app = env.app()
    queue = env.name("backstop")

    @app.consumer(queue, retries=1, delay=0.2)
    async def handle(body: Any) -> None:
        raise AssertionError("never consumed here")

    await app.declare()
    channel = await env.channel()
    await channel.publish(b"poison", exchange="", routing_key=queue, properties=props())
    await env.settle()
    gets = 0
    while (delivery := await channel.get(queue)) is not None:
        gets += 1
        await channel.reject(delivery.delivery_tag, requeue=True)
        await env.settle()
    [parked] = await env.fetch(channel, f"{queue}.parked", 1)

    assert gets == 21
    headers = headers_of(parked)
    assert headers["x-first-death-reason"] == "delivery_limit"
    assert headers["x-first-death-queue"] == queue


async def test_app_resubscribes_after_the_broker_cancels_its_consumer(env: Env) -> None:
    app = env.app()
    queue = env.name("cancel")
    handled: list[Any] = []

    @app.consumer(queue, retries=1, delay=0.2)
    async def handle(body: Any) -> None:
        handled.append(body)

    async with app:
        channel = await env.channel()
        await channel.delete_queue(queue)  # the broker sends basic.cancel to its consumer
        await env.until(lambda: app.health()["consumers"][0]["resubscribed"] == 1)
        await app.publish({"after": "cancel"}, routing_key=queue)
        await env.until(lambda: handled == [{"after": "cancel"}])


async def test_app_peek_leaves_parked_messages_parked(env: Env, request: pytest.FixtureRequest) -> None:
    """Peeking reads the parking queue by basic.get and returns every message by closing its
    channel: each peek is a return, which a quorum queue counts as a delivery."""
    app = env.app()
    queue = env.name("peek")

    @app.consumer(queue, retries=0)
    async def handle(body: Any) -> None:
        raise ValueError("bug in the handler")

    async with app:
        await app.publish({"id": 1}, routing_key=queue, message_id="order-1")
        channel = await env.channel()
        await wait_count(env, channel, f"{queue}.parked", 1)
        for _ in range(25):
            peeked = await app.parked(queue)
            await env.settle()
            assert [p.message_id for p in peeked] == ["order-1"], f"{env.kind}: the parked message is gone"
        assert await message_count(channel, f"{queue}.parked") == 1


async def test_app_replay_starts_parked_messages_again_without_broker_counters(
    env: Env, request: pytest.FixtureRequest
) -> None:
    app = env.app()
    queue = env.name("replay")
    broken = True
    handled: list[tuple[int, dict[str, Any]]] = []

    @app.consumer(queue, retries=0)
    async def handle(body: Any, message: Message) -> None:
        if broken:
            raise ValueError("bug in the handler")
        handled.append((message.attempt, dict(message.headers)))

    async with app:
        await app.publish({"id": 1}, routing_key=queue, message_id="order-1", headers={"tenant": "acme"})
        channel = await env.channel()
        await wait_count(env, channel, f"{queue}.parked", 1)
        assert [p.reason for p in await app.parked(queue)] == ["exhausted"]  # one peek: one return
        await env.settle()
        broken = False
        assert await app.replay(queue) == 1
        await env.until(lambda: len(handled) == 1)
        assert await message_count(channel, f"{queue}.parked") == 0

    [(attempt, headers)] = handled
    assert attempt == 1
    assert headers["tenant"] == "acme"
    # A replayed copy starts afresh: no broker counters from its time in the parking queue.
    assert not {"x-delivery-count", "x-acquired-count", "x-death", "x-first-death-reason"} & set(headers)
