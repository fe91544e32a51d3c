"""Every delivery ends, whatever the handler does or the broker answers (SPEC §5), on RabbitMQ."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from rabbitflow import App, ChannelClosed, LoginRefused, Message, Middleware, UnencodableMessage

from ..helpers import BROKER_HOST, BROKER_PORT, Admin, unique, wait_for


class Attempts(Middleware):
    """Every failed handler call, as the middleware seam reports it."""

    def __init__(self) -> None:
        self.failed: list[tuple[int, BaseException]] = []

    def attempt_failed(self, queue: str, attempt: int, exception: BaseException) -> None:
        self.failed.append((attempt, exception))


def consumer_health(app: App) -> dict[str, Any]:
    (only,) = app.health()["consumers"]
    return dict(only)


async def test_handlers_publishing_to_a_missing_exchange_stop_nothing(
    make_app: Callable[..., App], admin: Admin
) -> None:
    """1 in 10 handlers publishes to an exchange that does not exist, 1 in 3 fails once, and the
    app publishes elsewhere meanwhile: every message is handled, every other publish confirmed."""
    app = make_app()
    queue, side = unique("mix"), unique("side")
    missing = unique("missing")
    handled: set[int] = set()
    refused: list[int] = []
    calls: Counter[int] = Counter()

    @app.consumer(queue, retries=2, delay=0.2, queue_type="classic", prefetch=32)
    async def handle(body: dict[str, int], message: Message) -> None:
        n = body["n"]
        calls[n] += 1
        if n % 10 == 0 and message.attempt == 1:
            try:
                await app.publish({"from": n}, exchange=missing, routing_key="k")
            except ChannelClosed as exc:
                refused.append(n if exc.code == 404 else -1)
        if n % 3 == 0 and message.attempt == 1:
            raise RuntimeError("fails once")
        handled.add(n)

    side_got: list[int] = []

    @app.consumer(side, queue_type="classic")
    async def on_side(body: dict[str, int]) -> None:
        side_got.append(body["n"])

    async with app:

        async def elsewhere() -> None:
            for i in range(200):
                await app.publish({"n": i}, routing_key=side)

        others = asyncio.create_task(elsewhere())
        await asyncio.gather(*(app.publish({"n": n}, routing_key=queue) for n in range(400)))
        await others
        await wait_for(lambda: len(handled) == 400 and len(side_got) == 200, timeout=30)
        await wait_for(lambda: all(c["in_flight"] == 0 for c in app.health()["consumers"]))
        assert app.health()["healthy"]
    assert sorted(refused) == list(range(0, 400, 10))
    # The missing exchange never closed the channel the other publishes share: none was sent twice.
    assert sorted(side_got) == list(range(200))
    assert max(calls.values()) <= 2
    assert await admin.count(queue) == 0
    assert await admin.count(f"{queue}.parked") == 0


async def test_one_slow_handler_holds_back_no_other_ack(make_app: Callable[..., App], admin: Admin) -> None:
    app = make_app()
    queue = unique("slow")
    release = asyncio.Event()
    done: list[int] = []

    @app.consumer(queue, queue_type="classic", prefetch=16, concurrency=8)
    async def handle(body: dict[str, int]) -> None:
        if body["n"] == 0:
            await release.wait()
        done.append(body["n"])

    async with app:
        await asyncio.gather(*(app.publish({"n": n}, routing_key=queue) for n in range(2000)))
        # Everything but the held one is handled and acked while it still runs.
        await wait_for(lambda: len(done) == 1999, timeout=20)
        await wait_for(lambda: consumer_health(app)["in_flight"] == 1)
        assert await admin.count(queue) == 0
        health = consumer_health(app)
        assert health["running"] == 1
        assert health["oldest_unsettled_age"] > 0
        assert health["healthy"]  # holding one slow delivery while settling others is progress
        release.set()
        await wait_for(lambda: consumer_health(app)["in_flight"] == 0)
    assert sorted(done) == list(range(2000))


@pytest.mark.parametrize(
    "signal",
    [
        asyncio.CancelledError,
        GeneratorExit,
        SystemExit,
        KeyboardInterrupt,
        type("Custom", (BaseException,), {}),
    ],
    ids=lambda cls: cls.__name__,
)
async def test_a_base_exception_from_a_handler_is_a_failed_attempt(
    make_app: Callable[..., App], admin: Admin, signal: type[BaseException]
) -> None:
    attempts = Attempts()
    app = make_app(middleware=[attempts])
    queue = unique("base")
    handled: list[int] = []

    @app.consumer(queue, retries=1, delay=0.1, queue_type="classic", prefetch=4)
    async def handle(body: dict[str, int], message: Message) -> None:
        if message.attempt == 1 and body["n"] < 4:
            raise signal("from the handler")
        handled.append(body["n"])

    async with app:
        for n in range(12):  # three times the prefetch: a stalled consumer would stop at 4
            await app.publish({"n": n}, routing_key=queue)
        await wait_for(lambda: len(handled) == 12, timeout=15)
        assert app.health()["healthy"]
    assert sorted(handled) == list(range(12))
    assert [type(exc) for _, exc in attempts.failed] == [signal] * 4
    assert await admin.count(f"{queue}.parked") == 0


async def test_a_hanging_handler_is_cancelled_at_its_handler_timeout(
    make_app: Callable[..., App], admin: Admin
) -> None:
    attempts = Attempts()
    app = make_app(middleware=[attempts], handler_timeout=0.3)
    queue, stuck = unique("hang"), unique("stuck")
    handled: list[int] = []

    @app.consumer(queue, retries=1, delay=0.1, queue_type="classic")
    async def handle(body: dict[str, int], message: Message) -> None:
        if message.attempt == 1:
            await asyncio.Event().wait()  # never returns
        handled.append(body["n"])

    @app.consumer(stuck, retries=0, queue_type="classic", handler_timeout=0.2)
    async def never(body: Any) -> None:
        await asyncio.Event().wait()

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        await app.publish({"n": 2}, routing_key=stuck)
        await wait_for(lambda: handled == [1], timeout=10)
        parked = await _one(admin, f"{stuck}.parked")
    headers = parked.header.properties.headers
    assert headers["x-rf-exception"] == "builtins.TimeoutError"
    assert "handler_timeout of 0.2s" in headers["x-rf-error"]
    assert isinstance(attempts.failed[0][1], TimeoutError)


async def test_a_deleted_service_exchange_is_declared_again_for_the_retry(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("dlx")
    attempts: list[int] = []

    @app.consumer(queue, retries=2, delay=0.2, queue_type="classic")
    async def handle(body: Any, message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt == 1:
            raise RuntimeError("once")

    async with app:
        await admin.channel.exchange_delete(f"{app.name}.dlx")  # an operator's mistake
        await app.publish({}, routing_key=queue)
        await wait_for(lambda: attempts == [1, 2], timeout=10)
        await asyncio.sleep(0.3)
        assert app.health()["healthy"]
    assert attempts == [1, 2]
    assert await admin.count(queue) == 0


async def test_the_queue_deleted_under_the_consumer_is_declared_and_consumed_again(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("gone")
    got: list[int] = []

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        got.append(body["n"])

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        await wait_for(lambda: got == [1])
        await admin.channel.queue_delete(queue)  # the broker sends basic.cancel
        await wait_for(lambda: consumer_health(app)["resubscribed"] == 1, timeout=10)
        assert consumer_health(app)["subscribed"]
        await app.publish({"n": 2}, routing_key=queue)
        await wait_for(lambda: got == [1, 2])
        assert app.health()["healthy"]


async def test_a_refused_login_fails_at_once_without_the_password(make_app: Callable[..., App]) -> None:
    app = make_app(url=f"amqp://guest:Wr0ng-s3cret@{BROKER_HOST}:{BROKER_PORT}/", connect_budget=30)
    started = time.monotonic()
    with pytest.raises(LoginRefused) as refused:
        await app.start()
    assert time.monotonic() - started < 5  # not the whole 30 s budget
    assert "refused the login of user 'guest'" in str(refused.value)
    assert "Wr0ng-s3cret" not in str(refused.value)
    assert app.state == "closed"


async def test_fifteen_hundred_consumers_start_and_consume(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    prefix = unique("many")
    got: set[int] = set()

    for n in range(1500):

        @app.consumer(f"{prefix}.{n}", queue_type="classic", retries=0, prefetch=1)
        async def handle(body: dict[str, int]) -> None:
            got.add(body["n"])

    async with app:
        assert len(app.health()["consumers"]) == 1500
        assert app.health()["healthy"]
        for n in (0, 749, 1499):
            await app.publish({"n": n}, routing_key=f"{prefix}.{n}")
        await wait_for(lambda: got == {0, 749, 1499}, timeout=10)


async def _one(admin: Admin, queue: str, timeout: float = 10) -> Any:
    found: list[Any] = []

    async def arrived() -> None:
        while not found:
            message = await admin.get(queue)
            if message is not None:
                found.append(message)
            else:
                await asyncio.sleep(0.05)

    await asyncio.wait_for(arrived(), timeout)
    return found[0]


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_copies_near_the_frame_size_never_take_the_connection_down(
    make_app: Callable[..., App], admin: Admin, queue_type: str
) -> None:
    """A producer's headers near frame_max (131,072 bytes): a copy that would not fit with
    rabbitflow's headers is parked without its traceback, or, when even that cannot fit, the
    original is rejected to the parking queue as it came; the connection stays up."""
    app = make_app()
    queue = unique("big")
    calls: Counter[str] = Counter()

    @app.consumer(queue, retries=1, delay=0.1, queue_type=queue_type)
    async def handle(body: dict[str, str], message: Message) -> None:
        calls[body["kind"]] += 1
        if body["kind"] != "plain":
            raise RuntimeError("x" * 900)

    async with app:
        near = {"pad": "p" * 129_500}  # a retry copy fits; the parked copy's traceback does not
        at = {"pad": "p" * 130_900}  # not even a retry copy fits
        await admin.publish(
            b'{"kind":"near"}', routing_key=queue, content_type="application/json", headers=near
        )
        await admin.publish(b'{"kind":"at"}', routing_key=queue, content_type="application/json", headers=at)
        await app.publish({"kind": "plain"}, routing_key=queue)
        parked = [await _one(admin, f"{queue}.parked"), await _one(admin, f"{queue}.parked")]
        await wait_for(lambda: calls["plain"] == 1)
        assert app.reconnects == 0
    by_kind = {m.body: m.header.properties.headers for m in parked}
    lean = by_kind[b'{"kind":"near"}']
    assert lean["x-rf-reason"] == "exhausted"
    assert lean["x-rf-exception"] == "builtins.RuntimeError"
    assert "x-rf-traceback" not in lean
    assert lean["pad"] == near["pad"]
    rejected = by_kind[b'{"kind":"at"}']
    assert rejected["pad"] == at["pad"]  # as the producer sent it, dead-lettered by the broker
    assert rejected["x-death"][0]["reason"] == "rejected"
    assert calls == {"near": 2, "at": 1, "plain": 1}


async def test_a_publish_too_large_for_a_frame_is_refused_before_it_is_sent(
    make_app: Callable[..., App],
) -> None:
    app = make_app()
    queue = unique("toolarge")
    got: list[int] = []

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        got.append(body["n"])

    async with app:
        with pytest.raises(UnencodableMessage, match="frame size of 131072"):
            await app.publish({"n": 0}, routing_key=queue, headers={"pad": "p" * 140_000})
        await app.publish({"n": 1}, routing_key=queue)
        await wait_for(lambda: got == [1])
        assert app.reconnects == 0


async def test_handlers_finishing_during_a_graceful_stop_may_publish(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue, results = unique("finish"), unique("results")
    started = asyncio.Event()

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        started.set()
        await asyncio.sleep(0.5)  # still running when the stop begins
        await app.publish({"done": body["n"]}, routing_key=results)

    await admin.channel.queue_declare(results)
    admin.queues.add(results)
    async with app:
        await app.publish({"n": 7}, routing_key=queue)
        await started.wait()
    done = await _one(admin, results)
    assert done.body == b'{"done":7}'
    assert await admin.count(f"{queue}.retry.10s") == 0


async def test_a_publish_that_cannot_be_encoded_leaves_nothing_on_the_wire(
    make_app: Callable[..., App],
) -> None:
    """Refused before a delivery tag is taken: the connection stays up and later publishes are
    confirmed as themselves."""
    app = make_app()
    queue = unique("unencodable")
    got: list[int] = []

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        got.append(body["n"])

    async with app:
        for bad in ({"huge": 1e300}, {"thing": object()}):
            with pytest.raises(UnencodableMessage, match="cannot encode"):
                await app.publish({"n": 0}, routing_key=queue, headers=bad)
        with pytest.raises(UnencodableMessage, match="cannot encode"):
            await app.publish({"n": 0}, exchange="bad\nname", routing_key=queue)
        await asyncio.gather(*(app.publish({"n": n}, routing_key=queue) for n in range(1, 51)))
        await wait_for(lambda: len(got) == 50)
        assert app.reconnects == 0
    assert sorted(got) == list(range(1, 51))
