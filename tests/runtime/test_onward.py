"""A handler's return value: published onward (`publish_to=`) or sent as the reply to a request,
and the input acked only once the broker confirmed it (SPEC §1), on RabbitMQ."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiormq
import orjson
import pytest

from rabbitflow import App, ConfigError, Message, Unroutable

from ..helpers import Admin, unique, wait_for


async def test_a_return_value_is_published_to_publish_to(make_app: Callable[..., App], admin: Admin) -> None:
    app = make_app()
    source, target = unique("src"), unique("dst")
    got: list[tuple[dict[str, int], str | None]] = []

    @app.consumer(source, queue_type="classic", publish_to=target)
    async def double(body: dict[str, int]) -> dict[str, int]:
        return {"n": body["n"] * 2}

    @app.consumer(target, queue_type="classic")
    async def collect(body: dict[str, int], message: Message) -> None:
        got.append((body, message.correlation_id))

    @app.consumer(unique("quiet"), queue_type="classic", publish_to=target)
    async def returns_none(body: object) -> None:
        return None

    async with app:
        for n in range(5):
            await app.publish({"n": n}, routing_key=source, correlation_id=f"c{n}")
        await wait_for(lambda: len(got) == 5)
    assert sorted(got, key=lambda g: g[0]["n"]) == [({"n": 2 * n}, f"c{n}") for n in range(5)]
    assert await admin.count(source) == 0


async def test_a_failed_onward_publish_is_a_failed_attempt(
    make_app: Callable[..., App], admin: Admin
) -> None:
    """publish_to an exchange that does not exist yet: the attempt fails (404), is retried, and
    once the exchange is there the next attempt's result gets through; nothing was acked before."""
    app = make_app()
    source, target = unique("src"), unique("dst")
    exchange = unique("onward")
    attempts: list[int] = []

    @app.consumer(source, queue_type="classic", retries=5, delay=0.3, publish_to=(exchange, "k"))
    async def forward(body: dict[str, int], message: Message) -> dict[str, int]:
        attempts.append(message.attempt)
        return {"from": body["n"], "attempt": message.attempt}

    async with app:
        await app.publish({"n": 7}, routing_key=source)
        await wait_for(lambda: len(attempts) >= 2, timeout=10)
        await admin.channel.exchange_declare(exchange, exchange_type="direct")
        admin.exchanges.add(exchange)
        await admin.channel.queue_declare(target)
        admin.queues.add(target)
        await admin.channel.queue_bind(target, exchange, routing_key="k")
        delivered = await _drain_when_there(admin, target)
        await wait_for(lambda: app.health()["consumers"][0]["in_flight"] == 0)
    # The attempts before the exchange existed failed; the one after it got through, and only then
    # was the input acked: one result, from the last attempt.
    assert len(delivered) == 1
    assert orjson.loads(delivered[0].body) == {"from": 7, "attempt": attempts[-1]}
    assert attempts == list(range(1, len(attempts) + 1))
    assert len(attempts) >= 2
    assert await admin.count(f"{source}.parked") == 0


async def test_an_unroutable_result_is_retried_then_parked(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    source = unique("src")
    calls: list[int] = []

    @app.consumer(source, queue_type="classic", retries=1, delay=0.2, publish_to=unique("nobody"))
    async def forward(body: object, message: Message) -> str:
        calls.append(message.attempt)
        return "result"

    async with app:
        await app.publish({"n": 1}, routing_key=source)
        await wait_for(lambda: len(calls) == 2, timeout=10)
        await wait_for(lambda: app.health()["consumers"][0]["in_flight"] == 0)
    (parked,) = await admin.drain(f"{source}.parked")
    headers = parked.header.properties.headers or {}
    assert headers["x-rf-reason"] == "exhausted"
    assert headers["x-rf-exception"] == "rabbitflow.errors.Unroutable"


async def test_a_return_value_answers_a_request_with_reply_to(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    source, replies = unique("svc"), unique("replies")
    await admin.channel.queue_declare(replies)
    admin.queues.add(replies)

    @app.consumer(source, queue_type="classic")
    async def answer(body: dict[str, int]) -> dict[str, int]:
        return {"sum": body["a"] + body["b"]}

    async with app:
        await admin.publish(
            b'{"a": 2, "b": 3}',
            routing_key=source,
            content_type="application/json",
            reply_to=replies,
            message_id="req-1",
        )
        # A requester that is gone (its queue with it) costs nothing: the reply is dropped.
        await admin.publish(
            b'{"a": 1, "b": 1}', routing_key=source, content_type="application/json", reply_to=unique("gone")
        )
        replied = await _drain_when_there(admin, replies)
        await wait_for(lambda: app.health()["consumers"][0]["in_flight"] == 0)
    (reply,) = replied
    assert orjson.loads(reply.body) == {"sum": 5}
    assert reply.header.properties.correlation_id == "req-1"
    assert await admin.count(f"{source}.parked") == 0


async def _drain_when_there(admin: Admin, queue: str) -> list[aiormq.abc.DeliveredMessage]:
    for _ in range(100):
        found = await admin.drain(queue)
        if found:
            return found
        await asyncio.sleep(0.1)
    return []


@pytest.mark.parametrize(
    ("value", "complaint"),
    [
        (5, "expected a routing key or an"),
        (("x", "y", "z"), "expected a routing key or an"),
        ("", "expected a non-empty string"),
        (("bad\x00exchange" * 30, "k"), "publish_to's exchange"),
    ],
)
def test_a_bad_publish_to_is_refused_at_import(value: object, complaint: str) -> None:
    app = App("svc", url="memory://")
    with pytest.raises(ConfigError, match=complaint):

        @app.consumer("q", publish_to=value)  # type: ignore[arg-type]
        async def handle(body: object) -> None: ...


async def test_an_event_nobody_subscribes_to_yet_can_be_published_without_mandatory(
    make_app: Callable[..., App],
) -> None:
    app = make_app()
    async with app:
        with pytest.raises(Unroutable):
            await app.publish({"n": 1}, routing_key=unique("nobody"))
        await app.publish({"n": 1}, routing_key=unique("nobody"), mandatory=False)


async def test_publish_to_on_the_memory_broker() -> None:
    app = App("mem-onward", url="memory://")
    got: list[int] = []

    @app.consumer("in", publish_to="out")
    async def double(body: dict[str, int]) -> int:
        return body["n"] * 2

    @app.consumer("out")
    async def collect(body: int) -> None:
        got.append(body)

    async with app:
        await app.publish({"n": 4}, routing_key="in")
        await app.publish({"n": 1}, routing_key=unique("nobody"), mandatory=False)
        await wait_for(lambda: got == [8])
