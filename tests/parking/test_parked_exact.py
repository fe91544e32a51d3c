"""Looking at a quorum parking queue (each look moves every message to the back) and replaying
from it keep the producer's header types: an int32 stays an int32, a double a double."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

from rabbitflow import App, Message

from ..helpers import Admin, unique
from ..support.rawamqp import entries_of, get_all, properties, publish_raw, table

# An int32 that fits an int8 and a double that fits a float: pamqp would shrink both.
PRODUCER = {
    b"count": b"I" + struct.pack(">i", 5),
    b"ratio": b"d" + struct.pack(">d", 0.1),
}


async def test_looks_and_replays_keep_header_types(make_app: Callable[..., App], admin: Admin) -> None:
    app = make_app()
    queue = unique("exactpark")
    calls: list[dict[str, object]] = []

    @app.consumer(queue, retries=0)
    async def handle(body: bytes, message: Message) -> None:
        calls.append(dict(message.headers))
        if len(calls) == 1:
            raise RuntimeError("parked on its first attempt")

    raw = properties({"headers": table(PRODUCER)})
    async with app:
        await publish_raw(admin.channel, b"payload", raw, routing_key=queue)
        async with asyncio.timeout(15):
            while await admin.count(f"{queue}.parked") < 1:  # noqa: ASYNC110 - the broker's state
                await asyncio.sleep(0.05)
        for _ in range(3):  # each look rotates the quorum parking queue through a copy
            listing = await app.admin().list_parked(queue)
            assert listing.total == 1
        async with asyncio.timeout(15):
            while await admin.count(f"{queue}.parked") < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        # Still the producer's bytes in the parking queue after the looks (read without decoding,
        # which takes it out: it goes back as it came).
        (parked,) = await get_all(f"{queue}.parked")
        headers = entries_of(parked[0])["headers"]
        for name, value in PRODUCER.items():
            assert headers[name] == value
        await publish_raw(admin.channel, parked[1], parked[0][12:], routing_key=f"{queue}.parked")
        outcome = await app.admin().replay_parked(queue)
        assert outcome.done == 1
        async with asyncio.timeout(15):
            while len(calls) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    # The replayed message: a double 0.1, not the float 0.10000000149 a re-encoding would give.
    assert calls[1]["ratio"] == 0.1
    assert calls[1]["count"] == 5
