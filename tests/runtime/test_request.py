"""`app.request` over direct reply-to (SPEC §1): the reply, concurrency on one channel, timeouts
and refusals, on RabbitMQ and on the memory broker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from rabbitflow import App, ChannelClosed, Message, RequestTimeout, Unroutable

from ..helpers import Admin, unique


def server(app: App, queue: str, delay: float = 0.0) -> None:
    @app.consumer(queue, queue_type="classic", prefetch=64)
    async def add(body: dict[str, int], message: Message) -> dict[str, int]:
        await asyncio.sleep(delay)
        return {"sum": body["a"] + body["b"], "attempt": message.attempt}


@pytest.fixture(params=["rabbitmq", "memory"])
def app_on(request: pytest.FixtureRequest, make_app: Callable[..., App]) -> Callable[..., App]:
    if request.param == "rabbitmq":
        return make_app
    return lambda **options: App(unique("svc"), url="memory://", **options)


async def test_a_request_gets_the_handlers_return_value(app_on: Callable[..., App]) -> None:
    app = app_on()
    queue = unique("adder")
    server(app, queue)
    async with app:
        reply = await app.request({"a": 2, "b": 40}, routing_key=queue, timeout=5)
    assert reply.body == b'{"sum":42,"attempt":1}'
    assert reply.content_type == "application/json"
    assert reply.decode() == {"sum": 42, "attempt": 1}


async def test_concurrent_requests_are_not_serialised(app_on: Callable[..., App]) -> None:
    """50 requests to a handler that takes 0.3 s each, with room for all of them at once: they
    overlap (well under 50 × 0.3 s), and each gets its own answer."""
    app = app_on()
    queue = unique("adder")
    server(app, queue, delay=0.3)
    async with app:
        await app.request({"a": 0, "b": 0}, routing_key=queue, timeout=5)  # the channel is open
        started = time.monotonic()
        replies = await asyncio.gather(
            *(app.request({"a": n, "b": 1}, routing_key=queue, timeout=10) for n in range(50))
        )
        took = time.monotonic() - started
    assert [r.body for r in replies] == [f'{{"sum":{n + 1},"attempt":1}}'.encode() for n in range(50)]
    assert took < 50 * 0.3 / 4, f"50 requests took {took:.1f}s: they waited for each other"


async def test_a_request_nobody_answers_times_out(make_app: Callable[..., App], admin: Admin) -> None:
    app = make_app()
    silent = unique("silent")
    await admin.channel.queue_declare(silent)
    admin.queues.add(silent)
    queue = unique("adder")
    server(app, queue)
    async with app:
        with pytest.raises(RequestTimeout, match="no reply"):
            await app.request({"a": 1}, routing_key=silent, timeout=0.5)
        # The channel serves the next request as if nothing happened.
        reply = await app.request({"a": 1, "b": 2}, routing_key=queue, timeout=5)
    assert reply.body.startswith(b'{"sum":3')


async def test_refused_requests_raise_and_leave_the_others_alone(
    app_on: Callable[..., App],
) -> None:
    app = app_on()
    queue = unique("adder")
    server(app, queue, delay=0.2)
    async with app:
        pending = asyncio.ensure_future(app.request({"a": 1, "b": 1}, routing_key=queue, timeout=5))
        await asyncio.sleep(0.05)
        with pytest.raises(Unroutable):
            await app.request({"a": 1}, routing_key=unique("nobody"), timeout=5)
        with pytest.raises(ChannelClosed) as refused:
            await app.request({"a": 1}, exchange=unique("missing"), routing_key="k", timeout=5)
        assert refused.value.code == 404
        # The request in flight meanwhile kept its channel and got its reply.
        assert (await pending).body.startswith(b'{"sum":2')


async def test_a_reply_is_not_a_failure_when_the_requester_is_gone(
    make_app: Callable[..., App], admin: Admin
) -> None:
    """The requester gave up (timeout) before the slow handler answered: the late reply is
    dropped, the request is not retried or parked."""
    app = make_app()
    queue = unique("slow")
    calls: list[int] = []

    @app.consumer(queue, queue_type="classic")
    async def slow(body: object, message: Message) -> str:
        calls.append(message.attempt)
        await asyncio.sleep(1.0)
        return "late"

    async with app:
        with pytest.raises(RequestTimeout):
            await app.request("hurry", routing_key=queue, timeout=0.3)
        await asyncio.sleep(1.5)
        assert app.health()["consumers"][0]["in_flight"] == 0
    assert calls == [1]
    assert await admin.count(f"{queue}.parked") == 0
