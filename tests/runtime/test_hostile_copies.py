"""Retry and parked copies carry the producer's properties and headers exactly: each header with
the type octet and value bytes it was published with, `message_id` as published (absent stays
absent). And a return is matched to its publish by the broker's order, never by message id.

The producer here encodes by hand (tests/support/rawamqp.py), so every AMQP field type RabbitMQ
accepts is published, also those no Python client writes (int8, uint16, float32...)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rabbitflow import App, Message, Unroutable

from ..helpers import Admin, unique, wait_for
from ..support.rawamqp import (
    entries_of,
    get_all,
    longstr,
    properties,
    publish_raw,
    read_properties,
    read_table,
    shortstr,
    table,
)

SECONDS = st.integers(0, 2**32 - 1)
MILLISECONDS = st.integers(2**32, 253_402_300_799_000)  # pamqp's reading past 2**32: up to 9999
FLOATS = {"allow_nan": False, "allow_infinity": False}  # RabbitMQ's parser cannot hold NaN


def _packed(kind: bytes, fmt: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return values.map(lambda v: kind + struct.pack(fmt, v))


KEYS = (
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20)
    .filter(lambda k: not k.startswith("x-"))  # the broker's and rabbitflow's own
    .map(str.encode)
)
SCALARS = st.one_of(
    st.booleans().map(lambda v: b"t" + bytes((v,))),
    _packed(b"b", ">b", st.integers(-128, 127)),
    _packed(b"B", ">B", st.integers(0, 255)),
    _packed(b"s", ">h", st.integers(-(2**15), 2**15 - 1)),
    _packed(b"u", ">H", st.integers(0, 2**16 - 1)),
    _packed(b"I", ">i", st.integers(-(2**31), 2**31 - 1)),
    _packed(b"l", ">q", st.integers(-(2**63), 2**63 - 1)),
    _packed(b"f", ">f", st.floats(width=32, **FLOATS)),
    _packed(b"d", ">d", st.floats(**FLOATS)),
    st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1)).map(lambda t: b"D" + struct.pack(">BI", *t)),
    st.binary(max_size=30).map(lambda v: b"S" + longstr(v)),
    st.text(max_size=30).map(lambda v: b"S" + longstr(v.encode())),
    _packed(b"T", ">Q", SECONDS | MILLISECONDS),
    st.just(b"V"),
    st.binary(max_size=30).map(lambda v: b"x" + longstr(v)),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda items: b"A" + longstr(b"".join(items))),
        st.dictionaries(KEYS, inner, max_size=4).map(lambda d: b"F" + table(d)),
    ),
    max_leaves=12,
)
TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30).map(
    lambda t: shortstr(t.encode())
)
PROPERTIES = st.fixed_dictionaries(
    {"headers": st.dictionaries(KEYS, VALUES, max_size=8).map(table)},
    optional={
        "content_type": TEXT,
        "content_encoding": TEXT,
        "delivery_mode": st.sampled_from([b"\x01", b"\x02"]),
        "priority": st.integers(0, 255).map(lambda p: bytes((p,))),
        "correlation_id": TEXT,
        "reply_to": TEXT,
        "message_id": TEXT,
        "timestamp": (SECONDS | MILLISECONDS).map(lambda t: struct.pack(">Q", t)),
        "type": TEXT,
        "user_id": st.just(shortstr(b"guest")),  # the broker refuses any other
        "app_id": TEXT,
    },
)


def _assert_carried_exactly(published: dict[str, bytes], copy: dict[str, Any]) -> None:
    sent = entries_of_published(published)
    for name, raw in sent.items():
        if name == "headers":
            for key, value in raw.items():
                assert copy["headers"].get(key) == value, f"header {key!r}"
        elif name == "delivery_mode":
            assert copy[name] == b"\x02"  # copies are persistent
        else:
            assert copy.get(name) == raw, f"property {name}"
    assert set(copy) - set(sent) <= {"delivery_mode", "headers"}  # nothing invented, message_id neither
    assert not any(key.startswith(b"x-death") or key.startswith(b"x-first-death") for key in copy["headers"])


def entries_of_published(published: dict[str, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = dict(read_properties(b"\x00" * 12 + properties(published)))
    out["headers"] = read_table(out["headers"])
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(published=PROPERTIES)
async def test_retry_and_parked_copies_carry_every_header_and_property_exactly(
    make_app: Callable[..., App], admin: Admin, published: dict[str, bytes]
) -> None:
    app = make_app()
    queue = unique("exact")
    attempts: list[int] = []

    @app.consumer(queue, queue_type="classic", retries=1, delay=0.05)
    async def handle(body: bytes, message: Message) -> None:
        attempts.append(message.attempt)
        raise RuntimeError("fails every time")

    async with app:
        await publish_raw(admin.channel, b"payload", properties(published), routing_key=queue)
        async with asyncio.timeout(10):
            while await admin.count(f"{queue}.parked") < 1:  # noqa: ASYNC110 - the broker's state
                await asyncio.sleep(0.02)
    parked = await get_all(f"{queue}.parked")

    assert attempts == [1, 2]  # the copy came back as a retry, then was parked
    assert len(parked) == 1
    assert parked[0][1] == b"payload"
    copy = entries_of(parked[0][0])
    assert copy["headers"][b"x-rf-reason"] == b"S" + longstr(b"exhausted")
    _assert_carried_exactly(published, copy)


async def test_a_message_published_without_message_id_has_none_on_any_attempt(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("no-id")
    seen: list[str | None] = []

    @app.consumer(queue, retries=2, delay=0.05)
    async def handle(body: bytes, message: Message) -> None:
        seen.append(message.message_id)
        raise RuntimeError("fails every time")

    async with app:
        await publish_raw(
            admin.channel, b"x", properties({"content_type": shortstr(b"text/plain")}), routing_key=queue
        )
        await wait_for(lambda: len(seen) == 3)
        async with asyncio.timeout(10):
            while await admin.count(f"{queue}.parked") < 1:  # noqa: ASYNC110 - the broker's state
                await asyncio.sleep(0.02)
    parked = await get_all(f"{queue}.parked")

    assert seen == [None, None, None]
    assert "message_id" not in entries_of(parked[0][0])


@pytest.mark.parametrize("unroutable_first", [True, False])
async def test_two_publishes_with_one_message_id_one_unroutable_each_get_their_own_outcome(
    make_app: Callable[..., App], admin: Admin, unroutable_first: bool
) -> None:
    app = make_app()
    queue = unique("routed")
    await admin.channel.queue_declare(queue)
    admin.queues.add(queue)

    async with app:
        await app.publish(b"warm-up", routing_key=queue)  # the route's probe, out of the way
        nowhere = app.publish(b"nowhere", routing_key=unique("no-such-queue"), message_id="same")
        routed = app.publish(b"routed", routing_key=queue, message_id="same")
        first, second = (nowhere, routed) if unroutable_first else (routed, nowhere)
        results = await asyncio.gather(first, second, return_exceptions=True)
    outcome = dict(
        zip(["nowhere", "routed"] if unroutable_first else ["routed", "nowhere"], results, strict=True)
    )

    assert isinstance(outcome["nowhere"], Unroutable)
    assert outcome["routed"] is None
    bodies = [m.body for m in await admin.drain(queue)]
    assert bodies == [b"warm-up", b"routed"]
