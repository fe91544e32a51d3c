"""Failover on real sockets: dead nodes, a reset connection, a black-holed one (no mocks)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest

from rabbitflow import App, ConnectionFailed, Message

from ..helpers import BROKER_HOST, BROKER_NODE, BROKER_PORT, Admin, unique, wait_for
from ..support.tcpproxy import TcpProxy

DEAD = "amqp://guest:guest@127.0.0.1:1/"  # nothing listens on port 1: refused at once


def via(proxy: TcpProxy, password: str = "guest") -> str:
    return f"amqp://guest:{password}@127.0.0.1:{proxy.port}/"


async def test_dead_first_nodes_are_skipped(make_app: Callable[..., App], broker_url: str) -> None:
    app = make_app(url=f"{DEAD};amqp://guest:guest@127.0.0.1:2/;{broker_url}", connect_timeout=1)
    queue = unique("skip")
    got: list[Any] = []

    @app.consumer(queue)
    async def handle(body: Any) -> None:
        got.append(body)

    async with app:
        assert app.health()["node"] == BROKER_NODE
        await app.publish({"ok": True}, routing_key=queue)
        await wait_for(lambda: got == [{"ok": True}])


async def test_all_nodes_down_fails_after_the_budget_without_passwords(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    app = App(
        unique("down"),
        url="amqp://admin:s3cret-pw@127.0.0.1:1/;amqp://admin:s3cret-pw@127.0.0.1:2/",
        connect_budget=1.5,
    )
    started = time.monotonic()
    with pytest.raises(ConnectionFailed) as info:
        await app.start()
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert 1.0 <= elapsed <= 4.0, elapsed
    assert "127.0.0.1:1" in message
    assert "127.0.0.1:2" in message
    assert "s3cret-pw" not in message
    assert "s3cret-pw" not in repr(info.value)
    assert caplog.records, "the attempts are logged"
    assert all("s3cret-pw" not in record.getMessage() for record in caplog.records)


async def test_reset_connection_fails_over_and_resubscribes(
    make_app: Callable[..., App], broker_url: str, admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with TcpProxy(BROKER_PORT, BROKER_HOST) as proxy:
        app = make_app(url=[via(proxy, "pw-in-proxy-url"), broker_url])
        # The proxy URL carries a wrong-looking password only in the URL text; RabbitMQ's guest
        # user is what logs in, through the proxy, so use guest's password there too.
        app.use_url([via(proxy), broker_url])
        queue = unique("reset")
        seen: list[int] = []

        @app.consumer(queue, queue_type="quorum")
        async def handle(body: Any) -> None:
            seen.append(body["n"])

        async with app:
            assert app.health()["node"].endswith(f":{proxy.port}/")
            for n in range(100):
                await app.publish({"n": n}, routing_key=queue)
            await wait_for(lambda: len(set(seen)) == 100)
            proxy.reset()
            # Publishing goes on while the app fails over: nothing may be lost.
            for n in range(100, 200):
                await app.publish({"n": n}, routing_key=queue, timeout=20)
            await wait_for(lambda: len(set(seen)) == 200, timeout=20)
            health = app.health()
            assert health["node"] == BROKER_NODE
            assert health["reconnects"] == 1
            assert health["live_consumers"] == 1
    assert set(seen) == set(range(200))
    assert all("guest:guest" not in r.getMessage() for r in caplog.records)


async def test_black_holed_node_is_detected_by_heartbeat(
    make_app: Callable[..., App], broker_url: str
) -> None:
    async with TcpProxy(BROKER_PORT, BROKER_HOST) as proxy:
        app = make_app(url=[via(proxy), broker_url], heartbeat=1, connect_timeout=2)
        queue = unique("hole")
        seen: list[int] = []

        @app.consumer(queue)
        async def handle(body: Any) -> None:
            seen.append(body["n"])

        async with app:
            await app.publish({"n": 0}, routing_key=queue)
            await wait_for(lambda: seen == [0])
            proxy.blackhole()
            cut = time.monotonic()
            await wait_for(lambda: app.health()["reconnects"] == 1, timeout=30)
            detected = time.monotonic() - cut
            await app.publish({"n": 1}, routing_key=queue)
            await wait_for(lambda: 1 in seen)
            # n=0's ack may have gone into the black hole: then it comes again (at-least-once).
            assert set(seen) == {0, 1}
            print(f"\nblack-holed node detected and failed over in {detected:.1f}s (heartbeat=1)")
            # aiormq declares a silent peer dead after (heartbeat + 1) * 3 s.
            assert detected < 15


async def test_publish_waits_for_the_failover(make_app: Callable[..., App], broker_url: str) -> None:
    async with TcpProxy(BROKER_PORT, BROKER_HOST) as proxy:
        app = make_app(url=[via(proxy), broker_url])
        queue = unique("pubwait")
        seen: list[int] = []

        @app.consumer(queue)
        async def handle(body: Any, message: Message) -> None:
            seen.append(body["n"])

        async with app:
            proxy.reset()
            results = await asyncio.gather(
                *(app.publish({"n": n}, routing_key=queue, timeout=20) for n in range(50)),
                return_exceptions=True,
            )
            assert [r for r in results if r is not None] == []
            await wait_for(lambda: set(seen) == set(range(50)), timeout=20)


async def test_ensure_reruns_the_operation_on_the_new_node(
    make_app: Callable[..., App], broker_url: str, admin: Admin
) -> None:
    async with TcpProxy(BROKER_PORT, BROKER_HOST) as proxy:
        app = make_app(url=[via(proxy), broker_url])
        queue = unique("ensure")
        admin.queues.add(queue)
        calls: list[str] = []
        errors: list[tuple[str, int]] = []

        async def declare_and_count(channel: Any, name: str) -> int:
            calls.append(str(channel.__class__.__name__))
            if len(calls) == 1:
                proxy.reset()  # the node dies while the operation runs
                await asyncio.sleep(0.2)
            declared = await channel.declare_queue(name, durable=True)
            return int(declared.declaration_result.message_count)

        async with app:
            count = await app.ensure(
                declare_and_count,
                queue,
                max_retries=3,
                errback=lambda exc, n: errors.append((type(exc).__name__, n)),
            )
            node = app.health()["node"]
        assert node == BROKER_NODE  # the re-run went to the live node
        assert count == 0
        assert len(calls) == 2
        assert len(errors) == 1
        assert errors[0][1] == 1
        assert await admin.count(queue) == 0


def test_unknown_failover_strategy_is_a_config_error() -> None:
    from rabbitflow import ConfigError

    with pytest.raises(ConfigError, match="round-robin"):
        App("x", failover="random")  # type: ignore[arg-type]


async def test_shuffle_and_custom_strategies_reach_a_live_node(
    make_app: Callable[..., App], broker_url: str
) -> None:
    asked: list[int] = []

    def live_first(nodes: Any) -> Any:
        asked.append(len(nodes))
        return iter(list(reversed(nodes)) * 1000)

    for failover in ("shuffle", live_first):
        app = make_app(url=[DEAD, broker_url], failover=failover, connect_timeout=1)
        async with app:
            assert app.health()["connected"] is True
            assert app.health()["node"] == BROKER_NODE
    assert asked == [2]  # the custom strategy was given both nodes, and used


async def test_a_session_that_dies_right_after_it_opened_backs_off() -> None:
    """A node (or a message) that drops every connection at once must not be reconnected to in
    a hot loop: a session shorter than 2 s counts as a failed connect, and the next one waits
    with the manager's backoff."""
    from rabbitflow.testing import MemoryBroker

    broker = MemoryBroker(realtime=True)
    app = App(unique("flap"), url="memory://", broker=broker)

    @app.consumer(unique("flap"))
    async def handle(body: Any) -> None: ...

    async with app:
        loop = asyncio.get_running_loop()
        end = loop.time() + 2.0
        seen = -1
        while loop.time() < end:
            if app.reconnects != seen and app.health()["connected"]:
                seen = app.reconnects
                broker.disconnect_all()  # every session dies as soon as it is up
            await asyncio.sleep(0.005)
        reconnects = app.reconnects
    # 0.1-0.2 s, then 0.2-0.4 s, 0.4-0.8 s...: a handful in 2 s, not hundreds.
    assert 2 <= reconnects <= 6


async def test_a_lost_connection_is_one_line_not_an_aiormq_traceback(
    make_app: Callable[..., App], broker_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with TcpProxy(BROKER_PORT, BROKER_HOST) as proxy:
        app = make_app(url=[via(proxy), broker_url])
        queue = unique("quiet")

        @app.consumer(queue)
        async def handle(body: Any) -> None: ...

        async with app:
            proxy.reset()
            await wait_for(lambda: app.health()["reconnects"] == 1, timeout=20)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("lost" in r.getMessage() and r.name.startswith("rabbitflow") for r in lines)
    assert not [r for r in lines if r.name.startswith("aiormq") and r.exc_info], [
        r.getMessage() for r in lines
    ]
    # The loss is the one WARNING above; the consumer's channel going with it is no ERROR.
    assert not [r for r in lines if r.levelno >= logging.ERROR], [r.getMessage() for r in lines]
