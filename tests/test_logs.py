"""rabbitflow's own DEBUG lines say what it did — connect, declare, subscribe, settle — and never
carry the password (issue "Operate it", SPEC §9)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from rabbitflow import App

from .helpers import unique, wait_for


async def test_debug_lines_tell_connect_declare_subscribe_and_settle(
    make_app: Callable[..., App], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="rabbitflow")
    app = make_app()
    queue = unique("logs")
    handled: list[int] = []

    @app.consumer(queue, queue_type="classic", retries=1, delay=0.2)
    async def handle(body: dict[str, int]) -> None:
        handled.append(body["n"])

    async with app:
        for n in range(3):
            await app.publish({"n": n}, routing_key=queue)
        await wait_for(lambda: len(handled) == 3)
        await wait_for(lambda: app.health()["consumers"][0]["in_flight"] == 0)
    ours = [r for r in caplog.records if r.name.startswith("rabbitflow")]
    text = "\n".join(r.getMessage() for r in ours)
    assert "connecting to amqp://guest:**@" in text
    assert f"declared queue {queue}.parked" in text
    assert f"declared queue {queue}.retry.200ms" in text
    assert f"queue {queue}: consuming (prefetch" in text
    assert "ack up to" in text
    assert ":guest@" not in text  # the password (guest's is "guest") is masked everywhere
