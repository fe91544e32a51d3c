"""`async with app:` inside a host program that has its own work going on."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from rabbitflow import App

from .helpers import unique, wait_for


def foreign_tasks(exclude: set[asyncio.Task[Any]]) -> list[str]:
    """Tasks still running, not in `exclude`, whose code belongs to rabbitflow or its AMQP client."""
    names = []
    for task in asyncio.all_tasks() - exclude:
        if task is asyncio.current_task() or task.done():
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        where = code.co_filename if code else ""
        if any(part in where for part in ("rabbitflow", "aiormq", "aio_pika")):
            names.append(f"{task.get_name()} {where}")
    return names


async def test_app_runs_beside_an_http_server_and_a_ticker(make_app: Callable[..., App]) -> None:
    ticks: list[float] = []  # loop time of every tick of the host's own periodic task
    served = 0

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while True:
            ticks.append(loop.time())
            await asyncio.sleep(0.01)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()
        served += 1

    async def get(port: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        body = await reader.read()
        writer.close()
        await writer.wait_closed()
        return body

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tick_task = asyncio.create_task(ticker())
    before = set(asyncio.all_tasks())

    app = make_app()
    queue = unique("embed")
    handled: list[Any] = []

    @app.consumer(queue)
    async def handle(body: Any) -> None:
        handled.append(body)

    try:
        async with app:
            ticks_at_start = len(ticks)
            for n in range(50):
                await app.publish({"n": n}, routing_key=queue)
                if n % 10 == 0:
                    assert (await get(port)).endswith(b"ok")
            await wait_for(lambda: len(handled) == 50)
            assert len(ticks) > ticks_at_start  # the host's own loop kept running
            during = ticks[max(0, ticks_at_start - 1) :]
            # ... and was never held up for long: a 10 ms ticker never waited 250 ms
            assert max(b - a for a, b in itertools.pairwise(during)) < 0.25

        assert served == 5
        assert sorted(b["n"] for b in handled) == list(range(50))
        await asyncio.sleep(0)  # let finished tasks be reaped
        assert foreign_tasks(exclude=before) == []
        assert {t for t in asyncio.all_tasks() - before if not t.done()} == set()
    finally:
        tick_task.cancel()
        server.close()
        await server.wait_closed()
