"""The in-memory broker, through the Transport/Channel interface, against RabbitMQ 3.10's behaviour."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pamqp.commands import Basic

from rabbitflow import App, PublishNacked, Unroutable
from rabbitflow.transport.base import ChannelClosed, ConnectionLost, Delivery
from rabbitflow.transport.memory.broker import (
    MemoryBroker,
    MemoryChannel,
)
from rabbitflow.transport.memory.routing import topic_match

EPOCH = datetime(2024, 1, 1, tzinfo=UTC)

QUORUM = {"x-queue-type": "quorum"}


def props(**kwargs: Any) -> Basic.Properties:
    return Basic.Properties(**kwargs)


class Inbox:
    """A consumer callback that records deliveries and settles them as told."""

    def __init__(self, channel: MemoryChannel, action: str = "ack") -> None:
        self.channel = channel
        self.action = action  # ack | requeue | reject | keep
        self.deliveries: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if self.action == "ack":
            await self.channel.ack(delivery.delivery_tag)
        elif self.action in ("requeue", "reject"):
            await self.channel.reject(delivery.delivery_tag, requeue=self.action == "requeue")

    @property
    def bodies(self) -> list[bytes]:
        return [d.body for d in self.deliveries]


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker(epoch=EPOCH)


@pytest.fixture
async def channel(broker: MemoryBroker) -> MemoryChannel:
    transport = await broker.connect()
    return await transport.channel()


async def publish(
    channel: MemoryChannel,
    body: bytes,
    routing_key: str,
    exchange: str = "",
    mandatory: bool = True,
    **kw: Any,
) -> None:
    await channel.publish(
        body, exchange=exchange, routing_key=routing_key, properties=props(**kw), mandatory=mandatory
    )


def headers_of(properties: Basic.Properties) -> dict[str, Any]:
    """The headers as plain data (pamqp types them as a union of field values)."""
    headers: dict[str, Any] = dict(properties.headers or {})
    return headers


def deaths(properties: Basic.Properties) -> list[dict[str, Any]]:
    return list(headers_of(properties)["x-death"])


def bodies(broker: MemoryBroker, queue: str) -> list[bytes]:
    return [body for _, body in broker.messages(queue)]


# -- routing ---------------------------------------------------------------------------------------


async def test_default_exchange_routes_by_queue_name(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_queue("a")
    await channel.declare_queue("b")
    await publish(channel, b"1", "a")
    assert bodies(broker, "a") == [b"1"]
    assert bodies(broker, "b") == []


async def test_direct_exchange_routes_by_exact_key(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_exchange("x", "direct")
    for queue, key in [("a", "k1"), ("b", "k2"), ("c", "k1")]:
        await channel.declare_queue(queue)
        await channel.bind_queue(queue, "x", key)
    await publish(channel, b"m", "k1", exchange="x")
    assert {q: bodies(broker, q) for q in "abc"} == {"a": [b"m"], "b": [], "c": [b"m"]}


async def test_fanout_ignores_the_routing_key(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_exchange("x", "fanout")
    for queue in "ab":
        await channel.declare_queue(queue)
        await channel.bind_queue(queue, "x", "whatever")
    await publish(channel, b"m", "other", exchange="x")
    assert bodies(broker, "a") == bodies(broker, "b") == [b"m"]


async def test_a_queue_bound_twice_gets_one_copy(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_exchange("x", "topic")
    await channel.declare_queue("a")
    await channel.bind_queue("a", "x", "order.*")
    await channel.bind_queue("a", "x", "#")
    await publish(channel, b"m", "order.created", exchange="x")
    assert bodies(broker, "a") == [b"m"]


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("order.*", "order.created", True),
        ("order.*", "order.created.eu", False),
        ("order.*", "order", False),
        ("order.#", "order", True),
        ("order.#", "order.created.eu", True),
        ("#", "", True),
        ("*", "", False),
        ("#.eu", "order.created.eu", True),
        ("*.created.#", "order.created", True),
        ("order.#.eu", "order.eu", True),
        ("order.#.eu", "order.created.de", False),
        ("a.*.c", "a..c", True),
    ],
)
def test_topic_patterns(pattern: str, key: str, matches: bool) -> None:
    assert topic_match(pattern, key) is matches


async def test_topic_exchange(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_exchange("x", "topic")
    await channel.declare_queue("eu")
    await channel.bind_queue("eu", "x", "*.*.eu")
    await publish(channel, b"1", "order.created.eu", exchange="x")
    await publish(channel, b"2", "order.created.us", exchange="x", mandatory=False)
    assert bodies(broker, "eu") == [b"1"]


async def test_headers_exchange_all_and_any(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_exchange("x", "headers")
    await channel.declare_queue("all")
    await channel.declare_queue("any")
    # x- keys of a binding never take part in matching
    await channel.bind_queue("all", "x", "", {"x-match": "all", "region": "eu", "tier": 1, "x-note": "n"})
    await channel.bind_queue("any", "x", "", {"x-match": "any", "region": "eu", "tier": 1})
    await publish(channel, b"both", "", exchange="x", headers={"region": "eu", "tier": 1})
    await publish(channel, b"one", "", exchange="x", headers={"region": "eu", "tier": 2})
    await publish(channel, b"none", "", exchange="x", headers={"region": "us"}, mandatory=False)
    assert bodies(broker, "all") == [b"both"]
    assert bodies(broker, "any") == [b"both", b"one"]


# -- publishing --------------------------------------------------------------------------------------


async def test_mandatory_publish_without_a_queue_is_unroutable(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await channel.declare_exchange("x", "direct")
    with pytest.raises(Unroutable) as caught:
        await publish(channel, b"m", "nobody", exchange="x")
    assert (caught.value.exchange, caught.value.routing_key) == ("x", "nobody")
    await publish(channel, b"m", "nobody", exchange="x", mandatory=False)  # silently dropped
    assert channel.is_open
    assert [(p.exchange, p.routing_key) for p in broker.published] == [("x", "nobody")] * 2


async def test_publish_to_a_missing_exchange_closes_the_channel(channel: MemoryChannel) -> None:
    with pytest.raises(ChannelClosed) as caught:
        await publish(channel, b"m", "k", exchange="nope")
    assert caught.value.code == 404
    assert caught.value.text == "NOT_FOUND - no exchange 'nope' in vhost '/'"
    assert not channel.is_open
    with pytest.raises(ChannelClosed):
        await channel.declare_queue("q")


async def test_the_broker_keeps_its_own_copy_of_the_properties(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await channel.declare_queue("q")
    headers: dict[str, Any] = {"k": "v"}
    await publish(channel, b"m", "q", headers=headers, timestamp=datetime(2024, 5, 1))
    headers["k"] = "changed"
    stored, _ = broker.messages("q")[0]
    stored.headers["k"] = "mutated by the test"  # type: ignore[index]
    stored, _ = broker.messages("q")[0]
    assert stored.headers == {"k": "v"}
    assert broker.published[0].properties.headers == {"k": "v"}
    # as a consumer decodes it from the wire: timestamps come back as UTC datetimes
    assert stored.timestamp == datetime(2024, 5, 1, tzinfo=UTC)


async def test_publish_to_a_full_reject_publish_queue_is_nacked(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await channel.declare_queue("q", arguments={"x-max-length": 1, "x-overflow": "reject-publish"})
    await publish(channel, b"1", "q")
    with pytest.raises(PublishNacked):
        await publish(channel, b"2", "q")
    assert bodies(broker, "q") == [b"1"]


async def test_max_length_drops_the_head_into_the_dead_letter_exchange(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await channel.declare_queue("overflow")
    await channel.declare_queue(
        "q",
        arguments={"x-max-length": 2, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "overflow"},
    )
    for body in (b"1", b"2", b"3"):
        await publish(channel, body, "q")
    assert bodies(broker, "q") == [b"2", b"3"]
    [(dead, body)] = broker.messages("overflow")
    assert body == b"1"
    assert deaths(dead)[0]["reason"] == "maxlen"


# -- declarations ------------------------------------------------------------------------------------


async def test_redeclaring_a_queue_with_another_argument_is_refused(channel: MemoryChannel) -> None:
    await channel.declare_queue("q")
    await channel.declare_queue("q")  # the same declaration is idempotent
    with pytest.raises(ChannelClosed) as caught:
        await channel.declare_queue("q", arguments={"x-message-ttl": 1000})
    assert caught.value.code == 406
    # pamqp sends 1000 as a 16-bit integer, which RabbitMQ calls 'short'
    assert caught.value.text == (
        "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'q' in vhost '/': "
        "received the value '1000' of type 'short' but current is none"
    )
    assert not channel.is_open
    with pytest.raises(ChannelClosed) as again:
        await channel.declare_queue("other")
    assert again.value.code == 406


async def test_redeclare_names_the_first_differing_argument(broker: MemoryBroker) -> None:
    channel = await (await broker.connect()).channel()
    args = {"x-dead-letter-exchange": "dlx", "x-message-ttl": 60000}
    await channel.declare_queue("q", arguments=args)
    with pytest.raises(ChannelClosed) as caught:
        await channel.declare_queue("q", arguments={**args, "x-dead-letter-exchange": "other"})
    assert caught.value.text == (
        "PRECONDITION_FAILED - inequivalent arg 'x-dead-letter-exchange' for queue 'q' in vhost '/': "
        "received 'other' but current is 'dlx'"  # RabbitMQ 3.10.8 leaves out the types here
    )


async def test_redeclare_with_other_durability_or_type_is_refused(broker: MemoryBroker) -> None:
    transport = await broker.connect()
    channel = await transport.channel()
    await channel.declare_queue("q", durable=True)
    with pytest.raises(ChannelClosed) as caught:
        await channel.declare_queue("q", durable=False)
    assert caught.value.text == (
        "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'q' in vhost '/': "
        "received 'false' but current is 'true'"
    )
    channel = await transport.channel()
    await channel.declare_exchange("x", "direct")
    with pytest.raises(ChannelClosed) as caught:
        await channel.declare_exchange("x", "topic")
    assert caught.value.text == (
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost '/': "
        "received 'topic' but current is 'direct'"
    )


async def test_missing_objects_are_404(broker: MemoryBroker) -> None:
    transport = await broker.connect()
    cases: list[tuple[Callable[[MemoryChannel], Awaitable[object]], str]] = [
        (lambda ch: ch.declare_queue("q", passive=True), "NOT_FOUND - no queue 'q' in vhost '/'"),
        (lambda ch: ch.declare_exchange("x", passive=True), "NOT_FOUND - no exchange 'x' in vhost '/'"),
        (lambda ch: ch.bind_queue("q", "amq.direct", "k"), "NOT_FOUND - no queue 'q' in vhost '/'"),
        (lambda ch: ch.bind_queue("q", "x", "k"), "NOT_FOUND - no exchange 'x' in vhost '/'"),
        (lambda ch: ch.consume("q", Inbox(ch), prefetch=1), "NOT_FOUND - no queue 'q' in vhost '/'"),
        (lambda ch: ch.get("q"), "NOT_FOUND - no queue 'q' in vhost '/'"),
    ]
    for call, text in cases:
        channel = await transport.channel()
        with pytest.raises(ChannelClosed) as caught:
            await call(channel)
        assert (caught.value.code, caught.value.text) == (404, text)
        assert not channel.is_open


async def test_quorum_queues_must_be_durable(channel: MemoryChannel) -> None:
    with pytest.raises(ChannelClosed) as caught:
        await channel.declare_queue("q", durable=False, arguments=QUORUM)
    assert (
        caught.value.text == "PRECONDITION_FAILED - invalid property 'non-durable' for queue 'q' in vhost '/'"
    )


async def test_exclusive_queues_belong_to_their_connection(broker: MemoryBroker) -> None:
    mine = await broker.connect()
    await (await mine.channel()).declare_queue("private", exclusive=True)
    other = await (await broker.connect()).channel()
    with pytest.raises(ChannelClosed) as caught:
        await other.consume("private", Inbox(other), prefetch=1)
    assert caught.value.code == 405
    await mine.close()
    assert "private" not in broker.queue_names()


# -- consuming ---------------------------------------------------------------------------------------


async def test_deliveries_are_fifo_with_increasing_tags(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_queue("q")
    for n in range(5):
        await publish(channel, str(n).encode(), "q")
    inbox = Inbox(channel)
    await channel.consume("q", inbox, prefetch=10)
    await broker.drain()
    assert inbox.bodies == [b"0", b"1", b"2", b"3", b"4"]
    assert [d.delivery_tag for d in inbox.deliveries] == [1, 2, 3, 4, 5]
    assert broker.queues["q"].message_count == broker.queues["q"].unacked_count == 0


async def test_prefetch_bounds_unacked_deliveries(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_queue("q")
    for n in range(5):
        await publish(channel, str(n).encode(), "q")
    inbox = Inbox(channel, "keep")
    await channel.consume("q", inbox, prefetch=2)
    await broker.drain()
    assert inbox.bodies == [b"0", b"1"]
    assert broker.queues["q"].message_count == 3
    await channel.ack(inbox.deliveries[0].delivery_tag)
    await broker.drain()
    assert inbox.bodies == [b"0", b"1", b"2"]
    await channel.ack(inbox.deliveries[2].delivery_tag, multiple=True)
    await broker.drain()
    assert inbox.bodies == [b"0", b"1", b"2", b"3", b"4"]


async def test_consumers_of_one_queue_take_turns(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_queue("q")
    first, second = Inbox(channel), Inbox(channel)
    await channel.consume("q", first, prefetch=1)
    await channel.consume("q", second, prefetch=1)
    for n in range(4):
        await publish(channel, str(n).encode(), "q")
    await broker.drain()
    assert first.bodies == [b"0", b"2"]
    assert second.bodies == [b"1", b"3"]


async def test_requeued_message_returns_first_and_redelivered(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await channel.declare_queue("q")
    for body in (b"a", b"b"):
        await publish(channel, body, "q")
    first = await channel.get("q")
    assert first is not None
    assert not first.redelivered
    await channel.reject(first.delivery_tag, requeue=True)
    again = await channel.get("q")
    assert again is not None
    assert (again.body, again.redelivered, again.delivery_tag) == (b"a", True, 2)


async def test_closing_a_channel_requeues_its_unacked_messages(broker: MemoryBroker) -> None:
    transport = await broker.connect()
    channel = await transport.channel()
    await channel.declare_queue("q")
    await publish(channel, b"m", "q")
    held = Inbox(channel, "keep")
    await channel.consume("q", held, prefetch=1)
    await broker.drain()
    assert broker.queues["q"].unacked_count == 1
    await channel.close()
    assert broker.messages("q")[0][1] == b"m"
    other = await transport.channel()
    inbox = Inbox(other)
    await other.consume("q", inbox, prefetch=1)
    await broker.drain()
    assert [(d.body, d.redelivered, d.delivery_tag) for d in inbox.deliveries] == [(b"m", True, 1)]


async def test_acking_an_unknown_tag_closes_the_channel(channel: MemoryChannel) -> None:
    await channel.ack(7)  # basic.ack has no reply: RabbitMQ closes the channel afterwards
    assert not channel.is_open
    with pytest.raises(ChannelClosed) as caught:
        await channel.declare_queue("q")
    assert (caught.value.code, caught.value.text) == (406, "PRECONDITION_FAILED - unknown delivery tag 7")


async def test_cancelled_consumer_gets_nothing_more(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_queue("q")
    inbox = Inbox(channel)
    tag = await channel.consume("q", inbox, prefetch=1)
    await channel.cancel(tag)
    await publish(channel, b"m", "q")
    await broker.drain()
    assert inbox.deliveries == []
    assert bodies(broker, "q") == [b"m"]


async def test_basic_get_is_empty_then_needs_an_ack(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_queue("q")
    assert await channel.get("q") is None
    await publish(channel, b"m", "q", headers={"h": 1})
    got = await channel.get("q")
    assert got is not None
    assert (got.body, got.properties.headers, got.exchange, got.routing_key) == (b"m", {"h": 1}, "", "q")
    assert broker.queues["q"].unacked_count == 1
    await channel.ack(got.delivery_tag)
    assert broker.queues["q"].unacked_count == 0


async def test_callback_errors_surface_in_drain(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await channel.declare_queue("q")

    async def broken(delivery: Delivery) -> None:
        raise ValueError("handler bug")

    await channel.consume("q", broken, prefetch=1)
    await publish(channel, b"m", "q")
    with pytest.raises(ValueError, match="handler bug"):
        await broker.drain()
    await broker.drain()  # reported once


async def test_a_consumer_that_requeues_forever_fails_drain(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await channel.declare_queue("q")
    await channel.consume("q", Inbox(channel, "requeue"), prefetch=1)
    await publish(channel, b"m", "q")
    with pytest.raises(RuntimeError, match="max_steps=50"):
        await broker.drain(max_steps=50)


async def test_handler_work_in_other_tasks_counts_as_busy(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    # rabbitflow acks on a later loop turn than the callback returns
    await channel.declare_queue("q")
    acked: list[int] = []

    async def later(delivery: Delivery) -> None:
        async def ack() -> None:
            for _ in range(5):
                await asyncio.sleep(0)
            await channel.ack(delivery.delivery_tag)
            acked.append(delivery.delivery_tag)

        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(ack()))

    await channel.consume("q", later, prefetch=1)
    for n in range(3):
        await publish(channel, str(n).encode(), "q")
    await broker.drain()
    assert acked == [1, 2, 3]


# -- TTL, dead-lettering and x-death -----------------------------------------------------------------


async def declare_retry_topology(channel: MemoryChannel, *, quorum: bool = True) -> None:
    """rabbitflow's shape: work queue -> svc.dlx -> parked; retry queue (TTL) -> "" -> work queue."""
    kind = QUORUM if quorum else {}
    await channel.declare_exchange("svc.dlx", "direct")
    await channel.declare_queue(
        "work",
        arguments={
            **kind,
            "x-dead-letter-exchange": "svc.dlx",
            "x-dead-letter-routing-key": "work.parked",
        },
    )
    await channel.declare_queue(
        "work.retry.60s",
        arguments={
            **kind,
            "x-message-ttl": 60_000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "work",
        },
    )
    await channel.declare_queue("work.parked", arguments=kind)
    await channel.bind_queue("work.parked", "svc.dlx", "work.parked")


async def test_ttl_expiry_dead_letters_with_x_death(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await declare_retry_topology(channel)
    await publish(channel, b"m", "work.retry.60s", headers={"mine": "kept"})
    await broker.advance(59.9)
    assert bodies(broker, "work") == []
    await broker.advance(0.1)
    [(properties, body)] = broker.messages("work")
    assert body == b"m"
    assert properties.headers == {
        "mine": "kept",
        "x-death": [
            {
                "count": 1,
                "reason": "expired",
                "queue": "work.retry.60s",
                "time": EPOCH + timedelta(seconds=60),  # an AMQP timestamp: a UTC datetime, whole seconds
                "exchange": "",
                "routing-keys": ["work.retry.60s"],
            }
        ],
        "x-first-death-reason": "expired",
        "x-first-death-queue": "work.retry.60s",
        "x-first-death-exchange": "",
    }


async def test_rejected_message_is_dead_lettered_with_its_routing_key(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await channel.declare_exchange("orders", "topic")
    await channel.declare_exchange("dlx", "topic")
    await channel.declare_queue("q", arguments={"x-dead-letter-exchange": "dlx"})  # no DLRK
    await channel.bind_queue("q", "orders", "order.*")
    await channel.declare_queue("dead")
    await channel.bind_queue("dead", "dlx", "#")
    await channel.consume("q", Inbox(channel, "reject"), prefetch=1)
    await publish(channel, b"m", "order.created", exchange="orders")
    await broker.drain()
    [(properties, _)] = broker.messages("dead")
    [death] = deaths(properties)
    assert (death["reason"], death["queue"], death["exchange"], death["routing-keys"]) == (
        "rejected",
        "q",
        "orders",
        ["order.created"],
    )
    got = await channel.get("dead")
    assert got is not None
    assert (got.exchange, got.routing_key) == ("dlx", "order.created")


async def test_head_of_queue_expiry(broker: MemoryBroker, channel: MemoryChannel) -> None:
    # RabbitMQ expires only the head: a 500 ms message behind a 3 s one leaves after 3 s
    await channel.declare_queue("out")
    await channel.declare_queue(
        "q", arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "out"}
    )
    await publish(channel, b"slow", "q", expiration="3000")
    await publish(channel, b"fast", "q", expiration="500")
    await broker.advance(2.9)
    assert bodies(broker, "q") == [b"slow", b"fast"]
    await broker.advance(0.1)
    assert bodies(broker, "out") == [b"slow", b"fast"]
    [(properties, _), _] = broker.messages("out")
    assert properties.expiration is None
    assert deaths(properties)[0]["original-expiration"] == "3000"


async def test_x_death_counts_each_queue_and_reason_newest_first(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    # a broker-side loop: work rejects -> its DLX routes to the retry queue -> expires back to work
    await channel.declare_exchange("dlx", "direct")
    await channel.declare_queue("work", arguments={"x-dead-letter-exchange": "dlx"})
    await channel.declare_queue(
        "retry",
        arguments={
            "x-message-ttl": 10_000,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "work",
        },
    )
    await channel.bind_queue("retry", "dlx", "work")
    seen: list[Delivery] = []

    async def handler(delivery: Delivery) -> None:
        seen.append(delivery)
        await channel.reject(delivery.delivery_tag, requeue=len(seen) >= 3)
        if len(seen) >= 3:
            await channel.cancel(tag)

    tag = await channel.consume("work", handler, prefetch=1)
    await publish(channel, b"m", "work")
    await broker.drain()
    assert len(seen) >= 3
    headers = headers_of(seen[2].properties)
    assert [(d["queue"], d["reason"], d["count"]) for d in headers["x-death"]] == [
        ("retry", "expired", 2),
        ("work", "rejected", 2),
    ]
    # a repeated death keeps the time of its first occurrence
    assert headers["x-death"][0]["time"] == EPOCH + timedelta(seconds=10)
    assert headers["x-first-death-queue"] == "work"
    assert headers["x-first-death-reason"] == "rejected"
    assert broker.now == 20


async def test_client_set_x_death_keeps_counting(broker: MemoryBroker, channel: MemoryChannel) -> None:
    # up to 3.12 the broker continues an x-death a client republished (4.x would not)
    await channel.declare_queue("out")
    await channel.declare_queue(
        "q",
        arguments={
            "x-message-ttl": 0,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "out",
        },
    )
    old = {
        "count": 4,
        "reason": "expired",
        "queue": "q",
        "time": EPOCH,
        "exchange": "",
        "routing-keys": ["q"],
    }
    await publish(channel, b"m", "q", headers={"x-death": [old]})
    await broker.drain()
    [(properties, _)] = broker.messages("out")
    assert [d["count"] for d in deaths(properties)] == [5]


async def test_a_dead_letter_cycle_without_rejection_is_dropped(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    ttl = {"x-message-ttl": 1000, "x-dead-letter-exchange": ""}
    await channel.declare_queue("a", arguments={**ttl, "x-dead-letter-routing-key": "b"})
    await channel.declare_queue("b", arguments={**ttl, "x-dead-letter-routing-key": "a"})
    await publish(channel, b"m", "a")
    await broker.drain()
    assert bodies(broker, "a") == bodies(broker, "b") == []
    assert broker.now == 2
    [dropped] = broker.dropped
    assert (dropped.queue, dropped.reason, dropped.cause) == ("b", "expired", "dead-letter cycle back to a")


async def test_no_dead_letter_exchange_drops_the_message(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await channel.declare_queue("q", arguments={"x-message-ttl": 5000, "x-dead-letter-exchange": "gone"})
    await publish(channel, b"m", "q")
    await broker.drain()
    assert broker.queue_names() == ["q"]
    assert bodies(broker, "q") == []
    assert [d.cause for d in broker.dropped] == ["its dead-letter exchange 'gone' does not exist"]


# -- quorum delivery limit ---------------------------------------------------------------------------


async def test_delivery_limit_dead_letters_after_too_many_returns(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await channel.declare_exchange("dlx", "direct")
    await channel.declare_queue("parked", arguments=QUORUM)
    await channel.bind_queue("parked", "dlx", "parked")
    await channel.declare_queue(
        "q",
        arguments={
            **QUORUM,
            "x-delivery-limit": 2,
            "x-dead-letter-exchange": "dlx",
            "x-dead-letter-routing-key": "parked",
        },
    )
    inbox = Inbox(channel, "requeue")
    await channel.consume("q", inbox, prefetch=1)
    await publish(channel, b"m", "q")
    await broker.drain()
    # returned twice is within the limit; the third return dead-letters it
    counts = [headers_of(d.properties).get("x-delivery-count") for d in inbox.deliveries]
    assert counts == [None, 1, 2]
    assert [d.redelivered for d in inbox.deliveries] == [False, True, True]
    [(properties, _)] = broker.messages("parked")
    assert deaths(properties)[0]["reason"] == "delivery_limit"
    assert "x-delivery-count" not in headers_of(properties)


async def test_a_lost_connection_counts_as_a_return(broker: MemoryBroker) -> None:
    transport = await broker.connect()
    channel = await transport.channel()
    await channel.declare_queue("q", arguments={**QUORUM, "x-delivery-limit": 5})
    await publish(channel, b"m", "q")
    await channel.consume("q", Inbox(channel, "keep"), prefetch=1)
    await broker.drain()
    broker.disconnect_all()
    assert isinstance(await transport.wait_closed(), ConnectionLost)
    with pytest.raises(ConnectionLost):
        await channel.ack(1)
    again = await (await broker.connect()).channel()
    got = await again.get("q")
    assert got is not None
    assert got.redelivered
    assert got.properties.headers == {"x-delivery-count": 1}


async def test_basic_get_on_quorum_reports_delivery_count_zero(channel: MemoryChannel) -> None:
    # 3.10's dequeue path always adds the header, 0 on the first get
    await channel.declare_queue("q", arguments=QUORUM)
    await publish(channel, b"m", "q")
    got = await channel.get("q")
    assert got is not None
    assert got.properties.headers == {"x-delivery-count": 0}


# -- the clock and connections -----------------------------------------------------------------------


async def test_drain_jumps_to_pending_expiries_only(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await declare_retry_topology(channel)
    await publish(channel, b"no ttl", "work")  # waits for a consumer: not pending
    await broker.drain()
    assert broker.now == 0
    await publish(channel, b"delayed", "work.retry.60s")
    await broker.drain(advance_clock=False)
    assert (broker.now, bodies(broker, "work")) == (0, [b"no ttl"])
    await broker.drain()
    assert (broker.now, bodies(broker, "work")) == (60, [b"no ttl", b"delayed"])


async def test_advance_steps_through_each_expiry(broker: MemoryBroker, channel: MemoryChannel) -> None:
    await declare_retry_topology(channel)
    arrivals: list[float] = []

    async def on_work(delivery: Delivery) -> None:
        arrivals.append(broker.now)
        await channel.ack(delivery.delivery_tag)
        if len(arrivals) < 3:
            await publish(channel, delivery.body, "work.retry.60s")

    await channel.consume("work", on_work, prefetch=1)
    await publish(channel, b"m", "work")
    await broker.advance(150)
    assert arrivals == [0, 60, 120]
    assert broker.now == 150


async def test_disconnect_and_close(broker: MemoryBroker) -> None:
    lost = await broker.connect()
    closed = await broker.connect()
    assert (lost.node, lost.blocked, lost.is_open) == ("memory://", False, True)
    await lost.wait_unblocked()
    await closed.close()
    assert await closed.wait_closed() is None
    broker.disconnect_all()
    assert not lost.is_open
    assert isinstance(await lost.wait_closed(), ConnectionLost)
    with pytest.raises(ConnectionLost):
        await lost.channel()
    broker.accepting = False
    with pytest.raises(ConnectionRefusedError):
        await broker.connect()


async def test_closing_a_channel_cancels_its_running_callbacks(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await channel.declare_queue("q")
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(delivery: Delivery) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    await channel.consume("q", slow, prefetch=1)
    await publish(channel, b"m", "q")
    await started.wait()
    await channel.close()
    await broker.drain()
    assert cancelled.is_set()
    assert bodies(broker, "q") == [b"m"]


async def test_realtime_broker_expires_on_its_own() -> None:
    broker = MemoryBroker(realtime=True)
    channel = await (await broker.connect()).channel()
    await channel.declare_queue("out")
    await channel.declare_queue(
        "q",
        arguments={
            "x-message-ttl": 30,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "out",
        },
    )
    await publish(channel, b"m", "q")
    await asyncio.sleep(0.2)
    assert bodies(broker, "out") == [b"m"]


async def test_an_app_on_memory_talks_to_the_broker_it_was_handed() -> None:
    app = App("svc", url="memory://")
    default = app.broker
    assert isinstance(default, MemoryBroker)
    assert app.broker is default
    assert default.realtime
    mine = MemoryBroker()
    channel = await (await mine.connect()).channel()
    await channel.declare_queue("inbox")
    app.use_broker(mine)
    async with app:
        assert app.health()["healthy"]
        await app.publish({"n": 1}, routing_key="inbox")
    assert [raw for _, raw in mine.messages("inbox")] == [b'{"n":1}']
    assert mine.queue_names() == ["inbox"]  # a service without consumers declares nothing on it
    assert "svc.dlx" not in mine.exchanges  # not even its dead-letter exchange
    assert default.queue_names() == []


async def test_a_thousand_messages_failing_twice_wait_their_delays_in_virtual_time(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await declare_retry_topology(channel)
    done = 0

    async def handler(delivery: Delivery) -> None:
        nonlocal done
        headers = headers_of(delivery.properties)
        attempt = headers.get("x-rf-attempt", 1)
        if attempt < 3:
            kept = {k: v for k, v in headers.items() if not k.startswith(("x-death", "x-first-death"))}
            await channel.publish(
                delivery.body,
                exchange="",
                routing_key="work.retry.60s",
                properties=props(headers={**kept, "x-rf-attempt": attempt + 1}),
            )
        else:
            done += 1
        await channel.ack(delivery.delivery_tag)

    await channel.consume("work", handler, prefetch=100)
    for n in range(1000):
        await publish(channel, str(n).encode(), "work", content_type="text/plain")
    await broker.drain()
    assert done == 1000
    assert broker.now == 120  # two 60 s delays passed on the broker's clock, not the wall's
    assert bodies(broker, "work.parked") == []


# -- version profiles ------------------------------------------------------------------------------
# The contract suite runs every profile against the same tests; these cover what the Transport
# interface cannot reach (basic.nack, basic.qos global, consumer timeouts).

VERSIONS = ["3.10", "3.13", "4.0", "4.3"]


def test_an_unknown_version_is_refused_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"'3\.10', '3\.13', '4\.0', '4\.3'"):
        MemoryBroker(version="4.1")


@pytest.mark.parametrize(
    ("version", "server_version"),
    [("3.10", "3.10.8"), ("3.13", "3.13.7"), ("4.0", "4.0.0"), ("4.3", "4.3.0")],
)
async def test_connections_report_the_profile_server_version(version: str, server_version: str) -> None:
    broker = MemoryBroker(version=version)
    transport = await broker.connect()
    assert (broker.version, transport.server_version) == (version, server_version)
    assert MemoryBroker().version == "3.10"


@pytest.mark.parametrize("version", VERSIONS)
async def test_nack_counts_towards_the_delivery_limit_until_4_3(version: str) -> None:
    broker = MemoryBroker(version=version)
    channel = await (await broker.connect()).channel()
    await channel.declare_queue("q", arguments={**QUORUM, "x-delivery-limit": 2})
    await channel.publish(b"m", exchange="", routing_key="q", properties=props())

    gets: list[Delivery] = []
    while len(gets) < 5 and (delivery := await channel.get("q")) is not None:
        gets.append(delivery)
        await channel.nack(delivery.delivery_tag, requeue=True)

    # https://www.rabbitmq.com/docs/4.3/nack: 4.3 counts basic.reject, not basic.nack
    if version == "4.3":
        assert len(gets) == 5
        # Never counted, so never shown (from 4.0 a first basic.get carries no x-delivery-count).
        assert [(d.properties.headers or {}).get("x-delivery-count") for d in gets] == [None] * 5
        assert [(d.properties.headers or {}).get("x-acquired-count") for d in gets] == [None, 1, 2, 3, 4]
    else:
        assert len(gets) == 3
        assert broker.dropped[0].reason == "delivery_limit"


@pytest.mark.parametrize("version", VERSIONS)
async def test_global_qos_limits_the_channel_until_4_3_refuses_it(version: str) -> None:
    broker = MemoryBroker(version=version)
    transport = await broker.connect()
    channel = await transport.channel()
    await channel.declare_queue("q")
    for body in (b"0", b"1", b"2"):
        await channel.publish(body, exchange="", routing_key="q", properties=props())

    if version == "4.3":
        with pytest.raises(ConnectionLost, match="Feature `global_qos` is deprecated"):
            await channel.qos(1, global_=True)
        assert not transport.is_open
        return
    await channel.qos(1, global_=True)
    inbox = Inbox(channel, "keep")
    await channel.consume("q", inbox, prefetch=0)
    await broker.drain()
    assert inbox.bodies == [b"0"]  # one unacked delivery per channel


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_consumer_timeout_closes_the_channel_or_cancels_the_consumer(
    version: str, queue_type: str
) -> None:
    broker = MemoryBroker(version=version, consumer_timeout=60)
    channel = await (await broker.connect()).channel()
    await channel.declare_queue("q", arguments=QUORUM if queue_type == "quorum" else {})
    await channel.publish(b"held", exchange="", routing_key="q", properties=props())
    cancelled: list[str] = []
    inbox = Inbox(channel, "keep")
    await channel.consume("q", inbox, prefetch=1, on_cancel=lambda: cancelled.append("q"))

    await broker.advance(59)
    assert (channel.is_open, cancelled, broker.queues["q"].unacked_count) == (True, [], 1)
    await broker.advance(2)

    if version != "4.3":
        # Up to 4.2 the channel is closed with 406 and the delivery goes back (and counts).
        assert not channel.is_open
        assert cancelled == []
        assert broker.queues["q"].message_count == 1
        with pytest.raises(ChannelClosed, match="delivery acknowledgement on channel 1 timed out"):
            await channel.declare_queue("q", passive=True)
    elif queue_type == "classic":
        # 4.3: only quorum queues time out consumers
        assert (channel.is_open, cancelled, broker.queues["q"].unacked_count) == (True, [], 1)
    else:
        # 4.3: basic.cancel; the delivery goes back uncounted; the channel stays open and a
        # late ack of the reclaimed tag is ignored.
        assert channel.is_open
        assert cancelled == ["q"]
        assert broker.queues["q"].consumer_count == 0
        await channel.ack(inbox.deliveries[0].delivery_tag)
        again = await channel.get("q")
        assert again is not None
        assert again.redelivered
        # uncounted, so no x-delivery-count (none on a first count of 0 from 4.0)
        assert again.properties.headers == {"x-acquired-count": 1}
        assert channel.is_open


@pytest.mark.parametrize("version", VERSIONS)
async def test_the_queue_argument_x_consumer_timeout_from_3_13(version: str) -> None:
    broker = MemoryBroker(version=version)
    channel = await (await broker.connect()).channel()
    await channel.declare_queue("q", arguments={**QUORUM, "x-consumer-timeout": 5000})
    await channel.publish(b"held", exchange="", routing_key="q", properties=props())
    cancelled: list[str] = []
    await channel.consume("q", Inbox(channel, "keep"), prefetch=1, on_cancel=lambda: cancelled.append("q"))

    await broker.advance(6)

    timed_out = cancelled == ["q"] or not channel.is_open
    assert timed_out == (version != "3.10")  # 3.10 has only the broker-wide setting


async def test_an_app_on_4_3_subscribes_again_after_a_consumer_timeout() -> None:
    broker = MemoryBroker(version="4.3", realtime=True)
    app = App("svc", url="memory://", graceful_timeout=1)
    app.use_broker(broker)
    calls: list[int] = []
    release = asyncio.Event()

    @app.consumer("slow", retries=1, delay=0.1)
    async def handle(body: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            await release.wait()  # held past the queue's consumer timeout

    async with app:
        # rabbitflow declares no x-consumer-timeout: give its consumer one, as a policy would.
        broker.queues["slow"].consumer_timeout = 0.05
        for consumer in broker.queues["slow"].consumers:
            consumer.timeout = 0.05
        await app.publish({"n": 1}, routing_key="slow")
        async with asyncio.timeout(5):
            while len(calls) < 2:  # noqa: ASYNC110 - waiting on the broker's doing
                await asyncio.sleep(0.01)
        release.set()
        health = app.health()["consumers"][0]
        assert health["resubscribed"] >= 1
    assert broker.queues["slow.parked"].message_count == 0
