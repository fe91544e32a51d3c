"""`app.request` over direct reply-to (SPEC §1): the reply, concurrency on one channel, timeouts
and refusals, on RabbitMQ and on the memory broker."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict

from rabbitflow import (
    App,
    ChannelClosed,
    DecodeError,
    Message,
    Reject,
    RequestFailed,
    RequestTimeout,
    UnencodableMessage,
    Unroutable,
)

from ..helpers import Admin, unique, wait_for


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


# -- typed replies, error replies, deadlines (issue 24) -------------------------------------------


@dataclass
class Sum:
    sum: int
    attempt: int


class SumModel(BaseModel):
    sum: int
    attempt: int


class SumDict(TypedDict):
    sum: int
    attempt: int


class Order(BaseModel):
    id: int


async def test_a_typed_request_returns_the_validated_reply(app_on: Callable[..., App]) -> None:
    app = app_on()
    queue = unique("adder")
    server(app, queue)
    async with app:
        as_model = await app.request({"a": 1, "b": 2}, routing_key=queue, timeout=5, response_type=SumModel)
        as_dataclass = await app.request({"a": 1, "b": 2}, routing_key=queue, timeout=5, response_type=Sum)
        as_typeddict = await app.request(
            {"a": 1, "b": 2}, routing_key=queue, timeout=5, response_type=SumDict
        )
        with pytest.raises(DecodeError, match="Order"):
            await app.request({"a": 1, "b": 2}, routing_key=queue, timeout=5, response_type=Order)
    assert as_model == SumModel(sum=3, attempt=1)
    assert as_dataclass == Sum(sum=3, attempt=1)
    assert as_typeddict == {"sum": 3, "attempt": 1}


async def test_a_request_that_fails_for_good_answers_its_caller_at_once(app_on: Callable[..., App]) -> None:
    """Rejected, retries exhausted, undecodable: the caller gets RequestFailed with the reason and
    the error text well before its timeout; a request that fails once and then succeeds gets its
    typed reply through the retry."""
    app = app_on()
    queue = unique("picky")
    calls: list[tuple[int, int]] = []

    @app.consumer(queue, queue_type="classic", retries=1, delay=0.1)
    async def picky(order: Order, message: Message) -> dict[str, int]:
        calls.append((order.id, message.attempt))
        if order.id == 1:
            raise Reject("order 1 is cancelled")
        if order.id == 2:
            raise RuntimeError("database down")
        if order.id == 3 and message.attempt == 1:
            raise RuntimeError("flaky")
        return {"sum": order.id, "attempt": message.attempt}

    async with app:
        started = time.monotonic()
        with pytest.raises(RequestFailed) as rejected:
            await app.request({"id": 1}, routing_key=queue, timeout=20)
        with pytest.raises(RequestFailed) as exhausted:
            await app.request({"id": 2}, routing_key=queue, timeout=20)
        with pytest.raises(RequestFailed) as undecodable:
            await app.request({"id": "not a number"}, routing_key=queue, timeout=20)
        retried = await app.request({"id": 3}, routing_key=queue, timeout=20, response_type=Sum)
        took = time.monotonic() - started
    assert took < 5, f"the callers waited {took:.1f}s: the error replies did not come at once"
    assert (rejected.value.reason, rejected.value.error) == ("rejected", "order 1 is cancelled")
    assert (exhausted.value.reason, exhausted.value.error) == ("exhausted", "database down")
    assert exhausted.value.exception == "builtins.RuntimeError"
    assert undecodable.value.reason == "decode-error"
    assert "id" in undecodable.value.error
    assert retried == Sum(sum=3, attempt=2)
    assert calls == [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2)]


async def test_a_request_is_never_handled_after_its_caller_gave_up(
    app_on: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    """One handler at a time, busy for 1 s: a request with a 0.3 s timeout waits behind it; its
    caller gives up, and the consumer drops it (acked, logged) instead of handling or parking it."""
    app = app_on()
    queue = unique("busy")
    handled: list[str] = []

    @app.consumer(queue, queue_type="classic", prefetch=1)
    async def busy(body: str) -> str:
        handled.append(body)
        await asyncio.sleep(1.0)
        return body

    with caplog.at_level(logging.INFO, logger="rabbitflow"):
        async with app:
            first = asyncio.ensure_future(app.request("first", routing_key=queue, timeout=5))
            await wait_for(lambda: handled == ["first"])
            with pytest.raises(RequestTimeout):
                await app.request("hurried", routing_key=queue, timeout=0.3)
            assert (await first).body == b"first"
            await asyncio.sleep(0.3)
            assert app.health()["consumers"][0]["in_flight"] == 0
            assert await app.parked(queue) == []
    assert handled == ["first"]
    assert "expired" in caplog.text or "hurried" not in handled


async def test_one_bad_request_reaches_its_caller_alone(
    make_app: Callable[..., App], admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 22: 100 slow requests in flight, and meanwhile a request to an exchange an operator
    deleted after the app had used it, one over max_message_size and one nobody takes. Each bad
    one fails for its caller alone; the handler runs exactly 100 times (+1 for the first use of
    the exchange); every good caller gets its reply; no future is left with an unretrieved
    exception."""
    app = make_app(max_message_size=1024 * 1024)
    queue = unique("slow")
    doomed = unique("doomed")
    runs: list[int] = []

    @app.consumer(queue, queue_type="classic", prefetch=200, concurrency=200)
    async def slow(body: dict[str, int]) -> dict[str, int]:
        runs.append(body["n"])
        await asyncio.sleep(1.0)
        return body

    await admin.channel.exchange_declare(doomed, exchange_type="direct")
    admin.exchanges.add(doomed)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        async with app:
            await admin.channel.queue_bind(queue, doomed, routing_key="k")
            await app.request({"n": -1}, exchange=doomed, routing_key="k", timeout=10)  # used once
            await admin.channel.exchange_delete(doomed)
            good = [
                asyncio.ensure_future(app.request({"n": n}, routing_key=queue, timeout=20))
                for n in range(100)
            ]
            await wait_for(lambda: len(runs) >= 50)
            with pytest.raises(ChannelClosed) as missing:
                await app.request({"n": 1000}, exchange=doomed, routing_key="k", timeout=10)
            with pytest.raises(UnencodableMessage, match="max_message_size"):
                await app.request(b"x" * (1024 * 1024 + 1), routing_key=queue, timeout=10)
            with pytest.raises(Unroutable):
                await app.request({"n": 1001}, routing_key=unique("nobody"), timeout=10)
            replies = await asyncio.gather(*good)
        gc.collect()
    assert missing.value.code == 404
    assert sorted(r.decode()["n"] for r in replies) == list(range(100))
    assert sorted(runs) == [-1, *range(100)], f"the handler ran {len(runs)} times for 101 requests"
    assert "never retrieved" not in caplog.text


async def test_a_reply_that_can_never_be_sent_is_parked_at_once(app_on: Callable[..., App]) -> None:
    app = app_on(max_message_size=1000)
    queue = unique("big")
    calls: list[int] = []

    @app.consumer(queue, queue_type="classic", retries=3, delay=0.1)
    async def big(body: object, message: Message) -> bytes:
        calls.append(message.attempt)
        return b"x" * 2000

    async with app:
        with pytest.raises(RequestFailed, match="max_message_size") as failed:
            await app.request("hi", routing_key=queue, timeout=10)
        parked = await app.parked(queue)
    assert failed.value.reason == "rejected"
    assert calls == [1]
    assert [p.reason for p in parked] == ["rejected"]
