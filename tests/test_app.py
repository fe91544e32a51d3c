"""The App on the real broker: round trips, bounded concurrency, publishing, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from rabbitflow import App, ConfigError, Message, PublishTimeout, StateError, Unroutable
from rabbitflow.transport.base import ChannelClosed

from .helpers import BROKER_HOST, BROKER_NODE, BROKER_PORT, BROKER_URL, Admin, unique, wait_for
from .support.tcpproxy import TcpProxy


@dataclass
class Order:
    id: int
    item: str


async def test_json_text_and_bytes_round_trip(make_app: Callable[..., App]) -> None:
    app = make_app()
    seen: list[tuple[Any, str | None, str | None]] = []
    queue = unique("rt")

    @app.consumer(queue, queue_type="classic")
    async def handle(body: Any, message: Message) -> None:
        seen.append((body, message.content_type, message.message_id))

    async with app:
        await app.publish({"id": 1, "tags": ["a", "b"]}, routing_key=queue, message_id="m-1")
        await app.publish("héllo", routing_key=queue)
        await app.publish(b"\x00\xff", routing_key=queue)
        await wait_for(lambda: len(seen) == 3)

    assert seen[0] == ({"id": 1, "tags": ["a", "b"]}, "application/json", "m-1")
    assert seen[1][0] == "héllo"
    assert seen[1][1] is not None
    assert seen[1][1].startswith("text/plain")
    assert seen[2][:2] == (b"\x00\xff", "application/octet-stream")
    assert seen[2][2]  # rabbitflow always sets a message id


async def test_dataclass_body_is_converted(make_app: Callable[..., App]) -> None:
    app = make_app()
    orders: list[Order] = []
    queue = unique("dc")

    @app.consumer(queue, exchange=unique("ex"), routing_key="order.created")
    async def handle(order: Order) -> None:
        orders.append(order)

    async with app:
        exchange = app.consumers[0].exchange
        assert exchange is not None
        await app.publish({"id": 7, "item": "tea"}, exchange=exchange, routing_key="order.created")
        await wait_for(lambda: len(orders) == 1)

    assert orders == [Order(7, "tea")]


async def test_thousand_messages_each_once_with_bounded_concurrency(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app(prefetch=50)
    queue = unique("bulk")
    counts: dict[int, int] = {}
    running = 0
    peak = 0

    @app.consumer(queue, concurrency=8)
    async def handle(body: dict[str, int]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001)
        running -= 1
        counts[body["n"]] = counts.get(body["n"], 0) + 1

    async with app:
        await asyncio.gather(*(app.publish({"n": n}, routing_key=queue) for n in range(1000)))
        await wait_for(lambda: len(counts) == 1000, timeout=30)
        await asyncio.sleep(0.2)  # any duplicate would arrive now

    assert sorted(counts) == list(range(1000))
    assert set(counts.values()) == {1}
    assert peak == 8
    assert await admin.count(queue) == 0  # every message acked


async def test_unroutable_publish_raises_and_publisher_keeps_working(make_app: Callable[..., App]) -> None:
    app = make_app()
    queue = unique("after")
    got: list[Any] = []

    @app.consumer(queue)
    async def handle(body: Any) -> None:
        got.append(body)

    async with app:
        with pytest.raises(Unroutable, match="no queue is bound"):
            await app.publish({"x": 1}, routing_key=unique("nowhere"))
        await app.publish({"x": 2}, routing_key=queue)
        await wait_for(lambda: got == [{"x": 2}])


async def test_publish_to_missing_exchange_is_an_error_and_publisher_recovers(
    make_app: Callable[..., App],
) -> None:
    app = make_app()
    queue = unique("pub")
    got: list[Any] = []

    @app.consumer(queue)
    async def handle(body: Any) -> None:
        got.append(body)

    async with app:
        missing = unique("missing")
        with pytest.raises(ChannelClosed) as closed:
            await app.publish({"x": 1}, exchange=missing, routing_key="k")
        assert closed.value.code == 404
        assert f"no exchange '{missing}'" in str(closed.value)
        await app.publish({"x": 2}, routing_key=queue)
        await wait_for(lambda: got == [{"x": 2}])


async def test_publish_before_start_and_after_stop_is_a_state_error(make_app: Callable[..., App]) -> None:
    app = make_app()
    with pytest.raises(StateError, match="start it first"):
        await app.publish({"x": 1}, routing_key="q")
    async with app:
        pass
    with pytest.raises(StateError):
        await app.publish({"x": 1}, routing_key="q")


async def test_an_app_that_stopped_starts_again_and_consumes(make_app: Callable[..., App]) -> None:
    app = make_app()
    queue = unique("again")
    got: list[int] = []

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        got.append(body["n"])

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        await wait_for(lambda: got == [1])
    assert app.state == "closed"
    async with app:
        assert app.health()["healthy"]
        await app.publish({"n": 2}, routing_key=queue)
        await wait_for(lambda: got == [1, 2])
    with pytest.raises(StateError, match="stop it before"):
        async with app:
            await app.start()


async def test_an_idle_consumer_stops_without_cancelling_handlers_it_does_not_have(
    make_app: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    """With no handler running, a stop whose grace is used up (here: a millisecond) has nothing
    to cancel and says nothing of it (it warned of "0 handler(s) still running" before)."""
    app = make_app(graceful_timeout=0.001)
    queue = unique("idle")
    got: list[int] = []

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        got.append(body["n"])

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        await wait_for(lambda: got == [1])
    assert "still running" not in caplog.text
    assert app.state == "closed"


async def test_publish_times_out_when_no_node_answers(make_app: Callable[..., App]) -> None:
    async with TcpProxy(BROKER_PORT, BROKER_HOST) as proxy:
        app = make_app(url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", connect_timeout=0.5)
        queue = unique("lost")

        @app.consumer(queue)
        async def handle(body: Any) -> None: ...

        async with app:
            proxy.reset()  # the only node dies and refuses new connections
            started = asyncio.get_running_loop().time()
            with pytest.raises(PublishTimeout, match="not confirmed within 1"):
                await app.publish({"x": 1}, routing_key=queue, timeout=1)
            elapsed = asyncio.get_running_loop().time() - started
            assert 0.9 <= elapsed <= 3
            assert app.health()["connected"] is False
            proxy.resume()


async def test_lifespan_wraps_consuming(make_app: Callable[..., App]) -> None:
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[None]:
        events.append("resources up")
        yield
        events.append("resources down")

    app = make_app(lifespan=lifespan)
    queue = unique("life")

    @app.consumer(queue)
    async def handle(body: Any) -> None:
        events.append("handled")
        await asyncio.sleep(0.2)
        events.append("handler done")

    async with app:
        await app.publish({}, routing_key=queue)
        await wait_for(lambda: "handled" in events)
    assert events == ["resources up", "handled", "handler done", "resources down"]


def test_bad_decorator_options_fail_when_decorating() -> None:
    app = App("orders", url="amqp://guest:guest@localhost/")

    async def handler(body: Any) -> None: ...

    with pytest.raises(ConfigError, match=r"retries=-1: expected a whole number >= 0"):
        app.consumer("q", retries=-1)(handler)
    with pytest.raises(ConfigError, match=r"unknown option\(s\) retires"):
        app.consumer("q", retires=3)(handler)
    with pytest.raises(ConfigError, match="delay"):
        app.consumer("q", delay="soon")(handler)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="async def"):  # a `def` is fine; a generator is not
        app.consumer("q")(lambda body: (yield))  # type: ignore[arg-type,return-value]
    app.consumer("q")(handler)
    with pytest.raises(ConfigError, match="already has a consumer"):
        app.consumer("q")(handler)
    with pytest.raises(ConfigError, match="exchange_type"):
        app.consumer("q2", exchange="x", exchange_type="fan-out")(handler)
    app.consumer("q3", exchange="x", exchange_type="fanout")(handler)
    with pytest.raises(ConfigError, match=r"is 'fanout' for .*handler and 'topic' here"):
        app.consumer("q4", exchange="x", exchange_type="topic")(handler)


def test_repr_and_errors_never_show_the_password() -> None:
    app = App("orders", url="amqp://admin:hunter2@rmq1:5672/;amqp://admin:hunter2@rmq2:5672/")
    assert "hunter2" not in repr(app)
    assert "amqp://admin:**@rmq1:5672/" in repr(app)
    with pytest.raises(ConfigError) as info:
        App("orders", url="amqp://admin:hunter2@rmq1:notaport/")
    assert "hunter2" not in str(info.value)


async def test_health_reports_node_and_consumers(make_app: Callable[..., App]) -> None:
    app = make_app(url=BROKER_URL)

    @app.consumer(unique("h1"))
    async def one(body: Any) -> None: ...

    @app.consumer(unique("h2"), queue_type="classic")
    async def two(body: Any) -> None: ...

    assert app.health()["connected"] is False
    async with app:
        health = app.health()
        assert health["connected"] is True
        assert health["node"] == BROKER_NODE
        assert health["live_consumers"] == 2
        assert health["blocked"] is False
    assert app.health()["state"] == "closed"


async def test_stop_starts_no_waiting_handler_and_acks_what_finished(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app(prefetch=10)
    queue = unique("stop")
    started: list[int] = []
    finished: list[int] = []

    @app.consumer(queue, concurrency=2, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        started.append(body["n"])
        await asyncio.sleep(0.3)
        finished.append(body["n"])

    await app.start()
    for n in range(6):
        await app.publish({"n": n}, routing_key=queue)
    await wait_for(lambda: len(started) == 2)
    await app.stop()

    assert started == finished
    assert len(finished) == 2  # the four waiting for a slot were never started
    assert await admin.count(queue) == 4


async def test_graceful_timeout_cancels_the_straggler_and_acks_the_rest(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app(prefetch=10, graceful_timeout=0.5)
    queue = unique("straggler")
    finished: list[int] = []

    @app.consumer(queue, concurrency=10, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        await asyncio.sleep(30 if body["n"] == 0 else 0.05)
        finished.append(body["n"])

    await app.start()
    for n in range(5):
        await app.publish({"n": n}, routing_key=queue)
    await wait_for(lambda: len(finished) == 4)
    await app.stop()

    assert sorted(finished) == [1, 2, 3, 4]
    assert await admin.count(queue) == 1  # only the cancelled one comes back
    message = await admin.get(queue)
    assert message is not None
    assert message.body == b'{"n":0}'


async def test_a_nacked_publish_is_sent_again_until_its_timeout(
    make_app: Callable[..., App], admin: Admin
) -> None:
    full = unique("full")
    # A queue that takes nothing: the broker nacks every publish to it.
    await admin.channel.queue_declare(full, arguments={"x-max-length": 0, "x-overflow": "reject-publish"})
    admin.queues.add(full)
    app = make_app()
    async with app:
        started = asyncio.get_running_loop().time()
        with pytest.raises(PublishTimeout) as timeout:
            await app.publish({"x": 1}, routing_key=full, timeout=1)
        elapsed = asyncio.get_running_loop().time() - started
    assert 0.9 <= elapsed <= 3
    nacks = re.search(r"nacked (\d+) time\(s\)", str(timeout.value))
    assert nacks is not None, str(timeout.value)
    assert int(nacks.group(1)) >= 2  # sent again after the first nack, not given up on
    assert await admin.count(full) == 0


async def test_code_started_by_the_lifespan_may_publish_before_consuming_starts(
    make_app: Callable[..., App],
) -> None:
    queue = unique("early")
    got: list[Any] = []
    publishing: list[asyncio.Task[None]] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: App) -> AsyncIterator[None]:
        # Runs while the app is still starting: the publish waits until the app is connected.
        publishing.append(asyncio.create_task(app.publish({"early": True}, routing_key=queue)))
        yield

    app = make_app(lifespan=lifespan)

    @app.consumer(queue)
    async def handle(body: Any) -> None:
        got.append(body)

    async with app:
        await publishing[0]
        await wait_for(lambda: got == [{"early": True}])
