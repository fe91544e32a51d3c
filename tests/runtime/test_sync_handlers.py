"""Sync handlers (`def`): run in worker threads with every semantic of async ones, on RabbitMQ and
on the memory broker."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from rabbitflow import App, Message, Middleware, Reject, Retry
from rabbitflow.names import ORIGIN_MESSAGE_ID, ORIGIN_QUEUE

from ..helpers import unique, wait_for


@pytest.fixture(params=["rabbitmq", "memory"])
def app_on(request: pytest.FixtureRequest, make_app: Callable[..., App]) -> Callable[..., App]:
    if request.param == "rabbitmq":
        return make_app
    return lambda **options: App(unique("svc"), url="memory://", **options)


async def _parked(app: App, queue: str, count: int = 1) -> list[Any]:
    async with asyncio.timeout(15):
        while len(parked := await app.parked(queue)) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    return parked


async def test_a_sync_handler_runs_in_threads_without_blocking_the_loop(app_on: Callable[..., App]) -> None:
    """8 handlers that each block for 0.3 s, concurrency 8: they overlap, and the event loop ticks
    meanwhile."""
    app = app_on(concurrency=8)
    queue = unique("sync")
    threads: set[int] = set()
    done: list[int] = []

    @app.consumer(queue, queue_type="classic")
    def work(body: dict[str, int], message: Message) -> None:
        threads.add(threading.get_ident())
        time.sleep(0.3)
        done.append(body["n"])

    async with app:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        started = time.monotonic()
        for n in range(8):
            await app.publish({"n": n}, routing_key=queue)
        await wait_for(lambda: len(done) == 8)
        took = time.monotonic() - started
        ticker.cancel()
    assert sorted(done) == list(range(8))
    assert threading.get_ident() not in threads
    assert took < 8 * 0.3 / 2, f"8 sync handlers took {took:.2f}s: they did not overlap"
    assert ticks > 10, "the event loop was blocked while the handlers ran"


class Attempts(Middleware):
    def __init__(self) -> None:
        self.failed: list[tuple[int, str]] = []

    def attempt_failed(self, queue: str, attempt: int, exception: BaseException) -> None:
        self.failed.append((attempt, type(exception).__name__))


async def test_retries_parking_and_reject_work_as_for_async_handlers(app_on: Callable[..., App]) -> None:
    seen = Attempts()
    app = app_on(middleware=[seen])
    queue = unique("sync")
    attempts: list[tuple[str, int]] = []

    @app.consumer(queue, queue_type="classic", retries=2, delay=0.05)
    def work(body: str, message: Message) -> None:
        attempts.append((body, message.attempt))
        if body == "retry":
            raise Retry(delay=0.05)
        if body == "reject":
            raise Reject("not this one")
        raise ValueError("boom")

    async with app:
        for body in ("retry", "reject", "boom"):
            await app.publish(body, routing_key=queue)
        parked = await _parked(app, queue, 3)
    reasons = {p.body: (p.reason, p.attempts) for p in parked}
    assert reasons == {b"retry": ("exhausted", 3), b"reject": ("rejected", 1), b"boom": ("exhausted", 3)}
    assert sorted(attempts) == sorted(
        [("retry", 1), ("retry", 2), ("retry", 3), ("reject", 1), ("boom", 1), ("boom", 2), ("boom", 3)]
    )
    assert sorted(seen.failed) == sorted(
        [
            (1, "Retry"),
            (2, "Retry"),
            (3, "Retry"),
            (1, "Reject"),
            (1, "ValueError"),
            (2, "ValueError"),
            (3, "ValueError"),
        ]
    )


async def test_handler_timeout_fails_the_attempt_on_time_and_discards_the_late_result(
    app_on: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    app = app_on()
    queue = unique("sync")
    finished = threading.Event()

    @app.consumer(queue, queue_type="classic", retries=0, handler_timeout=0.2)
    def slow(body: object) -> str:
        time.sleep(1.0)
        finished.set()
        return "late"

    with caplog.at_level(logging.WARNING):
        async with app:
            started = time.monotonic()
            await app.publish("x", routing_key=queue)
            parked = await _parked(app, queue)
            took = time.monotonic() - started
            await asyncio.to_thread(finished.wait, 5)
            await asyncio.sleep(0.1)
    assert took < 0.9, f"parked after {took:.2f}s: the attempt waited for the thread"
    assert parked[0].reason == "exhausted"
    assert parked[0].exception == "builtins.TimeoutError"
    assert "returned after its attempt had ended" in caplog.text


async def test_publish_to_and_publish_sync_carry_the_inputs_correlation(app_on: Callable[..., App]) -> None:
    app = app_on()
    queue, onward, side = unique("sync"), unique("onward"), unique("side")
    got: list[Message] = []

    @app.consumer(queue, queue_type="classic", publish_to=onward)
    def work(body: dict[str, int]) -> dict[str, int]:
        app.publish_sync({"side": body["n"]}, routing_key=side)
        return {"n": body["n"] + 1}

    @app.consumer(onward, queue_type="classic")
    async def on_onward(body: dict[str, int], message: Message) -> None:
        got.append(message)

    @app.consumer(side, queue_type="classic")
    async def on_side(body: dict[str, int], message: Message) -> None:
        got.append(message)

    async with app:
        await app.publish({"n": 1}, routing_key=queue, message_id="input-1")
        await wait_for(lambda: len(got) == 2)
    for message in got:
        assert message.correlation_id == "input-1"
        assert message.headers[ORIGIN_QUEUE] == queue
        assert message.headers[ORIGIN_MESSAGE_ID] == "input-1"
    assert sorted(m.decode().get("n", m.decode().get("side")) for m in got) == [1, 2]
