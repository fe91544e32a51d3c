"""A message whose properties the client cannot decode never takes the connection down: it is
parked (rejected to its parking queue, every byte intact), the messages behind it are handled,
and the consumer never reconnects. Before, pamqp raised inside aiormq's frame reader, the
connection dropped, the broker redelivered the message and the connection dropped again."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import pytest

from rabbitflow import App, Message

from ..helpers import Admin, unique, wait_for
from ..support.rawamqp import get_all, properties, publish_raw, read_properties, shortstr, table

JSON = shortstr(b"application/json")
MICROSECONDS = 1_764_000_000_000_000  # 2025-11-24 in microseconds: as milliseconds, year ~55,900

# name -> (the property bytes published, the bytes the parked copy must still hold, what is named)
HOSTILE: dict[str, tuple[dict[str, bytes], bytes, str]] = {
    "content type not UTF-8": (
        {"content_type": shortstr(b"application/\xff\xfejson")},
        b"\xff\xfe",
        "content_type",
    ),
    "header name not UTF-8": (
        {"content_type": JSON, "headers": table({b"tenant-\xc3\x28": b"S" + struct.pack(">I", 4) + b"acme"})},
        b"tenant-\xc3\x28",
        "header name",
    ),
    "timestamp property in microseconds": (
        {"content_type": JSON, "timestamp": struct.pack(">Q", MICROSECONDS)},
        struct.pack(">Q", MICROSECONDS),
        "timestamp",
    ),
    "timestamp header out of range": (
        {"content_type": JSON, "headers": table({b"sent-at": b"T" + struct.pack(">Q", MICROSECONDS)})},
        struct.pack(">Q", MICROSECONDS),
        "sent-at",
    ),
}


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
@pytest.mark.parametrize("case", list(HOSTILE))
async def test_an_undecodable_message_is_parked_and_the_ones_behind_it_are_handled(
    make_app: Callable[..., App], admin: Admin, case: str, queue_type: str, caplog: pytest.LogCaptureFixture
) -> None:
    published, kept, named = HOSTILE[case]
    app = make_app()
    queue = unique("hostile")
    handled: list[Any] = []

    @app.consumer(queue, queue_type=queue_type, retries=2, delay=0.2)
    async def handle(body: Any, message: Message) -> None:
        handled.append(body["n"])

    async with app:
        await publish_raw(admin.channel, b'{"n": -1}', properties(published), routing_key=queue)
        for n in range(20):
            await publish_raw(
                admin.channel, b'{"n": %d}' % n, properties({"content_type": JSON}), routing_key=queue
            )
        await wait_for(lambda: len(handled) == 20)
        async with asyncio.timeout(10):
            while await admin.count(f"{queue}.parked") < 1:  # noqa: ASYNC110 - the broker's state
                await asyncio.sleep(0.05)
        health = app.health()

    assert sorted(handled) == list(range(20))  # every good message, and never the hostile one
    assert health["reconnects"] == 0
    parked = await get_all(f"{queue}.parked")
    assert len(parked) == 1
    header, body = parked[0]
    assert body == b'{"n": -1}'
    assert kept in header  # every byte kept
    sent = read_properties(b"\x00" * 12 + properties(published))
    for name, raw in sent.items():
        if name != "headers":  # the broker adds its x-death record to the table
            assert read_properties(header)[name] == raw
    assert any("decode-error" in r.getMessage() and named in r.getMessage() for r in caplog.records)
