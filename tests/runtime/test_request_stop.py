"""A request still waiting for its reply when the app stops fails at once, saying so."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from rabbitflow import App, StateError

from ..helpers import unique


async def test_a_request_pending_at_stop_fails_at_once_with_a_clear_error(
    make_app: Callable[..., App],
) -> None:
    app = make_app()
    queue = unique("slow")
    started = asyncio.Event()

    @app.consumer(queue, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        started.set()
        await asyncio.sleep(0.2)  # answers nothing: the request waits for a reply that never comes

    await app.start()
    asking = asyncio.create_task(app.request({"n": 1}, routing_key=queue, timeout=30))
    await asyncio.wait_for(started.wait(), 10)
    stopped = time.monotonic()
    await app.stop()
    with pytest.raises(StateError, match="stopped while this request waited"):
        await asyncio.wait_for(asking, 5)  # not the remaining ~30 s of its timeout
    assert time.monotonic() - stopped < 5
