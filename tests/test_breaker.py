"""The circuit breaker: pure state, then a real downstream going away (SPEC §1, outage mode)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from rabbitflow import App, Breaker, ConfigError, Message, Middleware, Reject, Retry
from rabbitflow.breaker import BreakerState, Circuit
from rabbitflow.testing import MemoryBroker

from .helpers import Admin, unique, wait_for


def test_it_trips_at_the_threshold_once_enough_attempts_were_seen() -> None:
    circuit = Circuit(Breaker(threshold=0.5, window=10, min_attempts=4, cooldown=5))
    assert circuit.record(0.0, RuntimeError("down")) is BreakerState.CLOSED  # 1 of 1, too few
    assert circuit.record(0.1, None) is BreakerState.CLOSED
    assert circuit.record(0.2, RuntimeError("down")) is BreakerState.CLOSED
    assert circuit.record(0.3, RuntimeError("down")) is BreakerState.OPEN  # 3 of 4
    assert "3 of 4 attempts failed" in circuit.reason
    assert "RuntimeError: down" in circuit.reason
    assert circuit.opened_at == 0.3


def test_old_attempts_leave_the_window() -> None:
    circuit = Circuit(Breaker(threshold=0.5, window=1, min_attempts=3, cooldown=5))
    for t in (0.0, 0.1):
        circuit.record(t, RuntimeError())
    for t in (2.0, 2.1, 2.2):
        circuit.record(t, None)
    assert circuit.record(2.3, RuntimeError()) is BreakerState.CLOSED  # 1 of 4 in the window


def test_rejects_and_ignored_exceptions_never_count_and_retry_does() -> None:
    circuit = Circuit(Breaker(threshold=1.0, min_attempts=2, ignore=(KeyError,)))
    for t in range(5):
        circuit.record(float(t), Reject("bad message"))
        circuit.record(float(t), KeyError("not the downstream"))
    assert circuit.state is BreakerState.CLOSED
    circuit.record(9.0, Retry(1))
    assert circuit.record(9.1, Retry(1)) is BreakerState.OPEN


def test_the_probe_closes_or_opens_it_again() -> None:
    circuit = Circuit(Breaker(threshold=1.0, min_attempts=1, cooldown=1))
    circuit.record(0.0, OSError())
    circuit.half_open()
    assert circuit.record(1.5, OSError()) is BreakerState.OPEN
    assert circuit.opened_at == 1.5
    assert circuit.trips == 2
    circuit.half_open()
    assert circuit.record(3.0, None) is BreakerState.CLOSED
    assert circuit.opened_at is None
    assert circuit.reason == ""
    assert "the probe failed" in circuit.last_trip


@pytest.mark.parametrize(
    "options",
    [{"threshold": 0}, {"threshold": 1.5}, {"window": 0}, {"cooldown": float("inf")}, {"min_attempts": 0}],
)
def test_bad_settings_are_a_config_error(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="Breaker"):
        Breaker(**options)


def test_a_breaker_that_is_not_one_is_a_config_error_at_import() -> None:
    app = App("svc", url="memory://")
    with pytest.raises(ConfigError, match="breaker="):

        @app.consumer("q", breaker={"threshold": 0.5})  # type: ignore[arg-type]
        async def handle(body: Any) -> None: ...


class Downstream:
    """A small HTTP service on localhost that the test turns off (its port refuses) and on."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: asyncio.Server | None = None
        self.served = 0

    async def on(self) -> None:
        self._server = await asyncio.start_server(self._answer, "127.0.0.1", self.port, reuse_address=True)

    async def off(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.served += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    async def call(self) -> None:
        """GET /, as a handler would call its downstream; OSError while it is off."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nhost: downstream\r\n\r\n")
            status = await reader.readline()
            if not status.startswith(b"HTTP/1.1 200"):
                raise OSError(f"downstream answered {status!r}")
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def downstream() -> AsyncIterator[Downstream]:
    service = Downstream()
    await service.on()
    try:
        yield service
    finally:
        await service.off()


BREAKER = pytest.mark.parametrize("with_breaker", [True, False], ids=["breaker", "no-breaker"])


@BREAKER
async def test_an_outage_parks_nothing_with_the_breaker_on_rabbitmq(
    make_app: Callable[..., App], admin: Admin, with_breaker: bool
) -> None:
    await _outage(make_app(), admin, with_breaker)


@BREAKER
async def test_an_outage_parks_nothing_with_the_breaker_on_the_memory_broker(with_breaker: bool) -> None:
    await _outage(App(unique("svc"), url="memory://", broker=MemoryBroker(realtime=True)), None, with_breaker)


async def _outage(app: App, admin: Admin | None, with_breaker: bool, n: int = 500) -> None:
    """`n` messages while the downstream is off for 3 s, retries=2 with 0.2 s delays. Without the
    breaker the ladder parks every message whose three attempts fell into the outage; with it,
    the consumer pauses, nothing is parked, and all `n` are handled once the downstream is back."""
    queue = unique("outage")
    breaker = Breaker(threshold=0.5, window=2, min_attempts=10, cooldown=0.5) if with_breaker else None
    handled: set[int] = set()
    parked: list[str] = []

    class Parks(Middleware):
        def attempt_failed(self, queue: str, attempt: int, exception: BaseException) -> None:
            if attempt == 3:
                parked.append(str(exception))

    app.middleware = (Parks(),)
    async with downstream() as service:

        @app.consumer(queue, retries=2, delay=0.2, queue_type="classic", prefetch=16, breaker=breaker)
        async def handle(body: dict[str, int], message: Message) -> None:
            await service.call()
            handled.add(body["n"])

        async with app:
            await service.off()
            for i in range(n):
                await app.publish({"n": i}, routing_key=queue)
            await asyncio.sleep(3)
            if with_breaker:
                consumer = app.health()["consumers"][0]
                assert consumer["breaker"]["state"] in ("open", "half-open")
                assert (
                    "attempts failed" in consumer["breaker"]["reason"]
                    or "probe" in consumer["breaker"]["reason"]
                )
                assert app.health()["healthy"]  # paused on purpose is not unhealthy
            await service.on()
            if with_breaker:
                await wait_for(lambda: len(handled) == n, timeout=90)
                closed = app.health()["consumers"][0]["breaker"]
                assert closed["state"] == "closed"
                assert closed["reason"] is None  # no outage now: health does not say there is one
                assert "attempts failed" in closed["last_trip"] or "probe" in closed["last_trip"]
            else:
                await wait_for(lambda: len(handled) + len(parked) >= n, timeout=90)
    if with_breaker:
        assert parked == []
    else:
        assert len(parked) > 0.8 * n  # nearly every message exhausted its ladder inside the outage
    if admin is not None:
        assert await admin.count(f"{queue}.parked") == len(parked)
        admin.forget_app(app)


async def test_a_stop_while_the_breaker_trips_lets_running_handlers_finish(
    make_app: Callable[..., App], admin: Admin
) -> None:
    """SIGTERM during an outage: the breaker's pause is under way when the stop begins; the
    handlers still running finish and are acked (a pause cancelled mid-RPC would close the
    channel and send their messages round again)."""
    stopping: list[asyncio.Future[None]] = []
    app = make_app(graceful_timeout=5)

    class StopOnTrip(Middleware):
        def attempt_failed(self, queue: str, attempt: int, exception: BaseException) -> None:
            consumers = app.health()["consumers"]
            if consumers and consumers[0]["breaker"]["state"] == "open" and not stopping:
                stopping.append(asyncio.ensure_future(app.stop()))

    app.middleware = (StopOnTrip(),)
    queue = unique("stoptrip")
    done: list[int] = []

    @app.consumer(
        queue,
        retries=3,
        delay=5,
        queue_type="classic",
        prefetch=8,
        breaker=Breaker(threshold=0.5, window=30, min_attempts=4, cooldown=10),
    )
    async def handle(body: dict[str, int]) -> None:
        if body["n"] < 4:
            await asyncio.sleep(0.5)
            done.append(body["n"])
            return
        raise OSError("downstream down")

    await app.start()
    for n in range(8):
        await app.publish({"n": n}, routing_key=queue)
    await wait_for(lambda: bool(stopping))
    await stopping[0]
    assert sorted(done) == [0, 1, 2, 3]
    assert await admin.count(queue) == 0  # nothing came back for another round


async def test_a_broker_cancel_while_the_breaker_is_open_does_not_resume_consuming() -> None:
    """The queue deleted while the breaker holds the consumer paused: it is declared again by the
    probe, after the cooldown, not at once at full prefetch."""
    broker = MemoryBroker(realtime=True)
    app = App(unique("svc"), url="memory://", broker=broker)
    queue = unique("resub")
    calls: list[int] = []

    @app.consumer(
        queue,
        retries=5,
        delay=0.2,
        queue_type="classic",
        prefetch=4,
        breaker=Breaker(threshold=0.5, window=30, min_attempts=4, cooldown=1.5),
    )
    async def handle(body: dict[str, int]) -> None:
        calls.append(body["n"])
        raise OSError("downstream down")

    async with app:
        for n in range(4):
            await app.publish({"n": n}, routing_key=queue)
        await wait_for(lambda: app.health()["consumers"][0]["breaker"]["state"] == "open")
        seen = len(calls)
        async with app.admin().connection() as transport:
            channel = await transport.channel()
            await channel.delete_queue(queue)
        await asyncio.sleep(0.3)
        await app.declare()
        for n in range(10, 20):
            await app.publish({"n": n}, routing_key=queue)
        await asyncio.sleep(0.5)
        assert [n for n in calls[seen:] if n >= 10] == []  # still paused
        assert app.health()["consumers"][0]["subscribed"] is False
        await wait_for(lambda: any(n >= 10 for n in calls), timeout=5)  # the probe, after the cooldown


@BREAKER
@pytest.mark.looptime
async def test_a_30s_outage_under_5000_messages_in_virtual_time(with_breaker: bool) -> None:
    """The issue's scenario on the memory broker, with the event loop's clock virtual (looptime):
    the downstream is off for 30 s while 5,000 messages arrive, retries=2 with delays [1, 5]. The
    ladder predicts every message parked without the breaker (its three attempts span 6 s, all
    inside the outage); with it, nothing is parked and all 5,000 are handled after recovery."""
    loop = asyncio.get_running_loop()
    app = App(unique("svc"), url="memory://", broker=MemoryBroker(realtime=True))
    breaker = Breaker(threshold=0.5, window=10, min_attempts=20, cooldown=5) if with_breaker else None
    handled: dict[int, float] = {}
    delays = [1.0, 5.0]

    @app.consumer("work", retries=2, delay=delays, prefetch=64, breaker=breaker)
    async def handle(body: dict[str, int], message: Message) -> None:
        await service.call()
        handled[body["n"]] = loop.time()

    async with downstream() as service, app:
        await service.off()
        began = loop.time()
        await asyncio.gather(*(app.publish({"n": n}, routing_key="work") for n in range(5000)))
        await asyncio.sleep(30 - (loop.time() - began))
        if with_breaker:
            assert app.health()["consumers"][0]["breaker"]["state"] in ("open", "half-open")
        await service.on()
        back = loop.time()
        await wait_for(lambda: len(handled) + _parked(app) >= 5000, timeout=600)
    if with_breaker:
        assert _parked(app) == 0
        assert len(handled) == 5000
        assert min(handled.values()) >= back  # nothing got through during the outage
    else:
        assert back - began > sum(delays)  # every ladder fits inside the outage...
        assert _parked(app) == 5000  # ...so every message is parked, as it predicts
        assert handled == {}


def _parked(app: App) -> int:
    broker = app.broker
    assert isinstance(broker, MemoryBroker)
    return len(broker.messages("work.parked")) if "work.parked" in broker.queue_names() else 0
