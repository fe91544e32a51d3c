"""No parked message, whatever its bytes, can stop a parking-lot command, and a walk that stops
halfway (an exception, a cancellation, a lost connection) leaves the parking queue as it was.

The messages are parked by hand, as bytes (tests/support/rawamqp.py): what an older tool, a
foreign producer or the broker itself (a rejection) leaves in a parking queue."""

from __future__ import annotations

import asyncio
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rabbitflow import App
from rabbitflow.admin import Admin as ServiceAdmin
from rabbitflow.errors import RabbitflowError
from rabbitflow.parking.message import Filter

from ..helpers import BROKER_HOST, BROKER_PORT, Admin, unique
from ..support.rawamqp import (
    get_all,
    longstr,
    properties,
    publish_raw,
    read_properties,
    read_table,
    shortstr,
    table,
)
from ..support.tcpproxy import TcpProxy


def S(text: str | bytes) -> bytes:
    return b"S" + longstr(text.encode() if isinstance(text, str) else text)


def parked(n: int, *, extra: dict[bytes, bytes] | None = None, **props: bytes) -> bytes:
    """The property bytes of a message as rabbitflow parks it, with `extra` headers."""
    headers = {
        b"x-rf-reason": S("exhausted"),
        b"x-rf-attempts": b"b\x03",
        b"x-rf-exception": S("builtins.ValueError"),
        b"x-rf-error": S(f"bad order {n}"),
        b"x-rf-first-failure": S(f"2026-01-01T10:00:0{n % 10}.000Z"),
        b"tenant": S("acme"),
        **(extra or {}),
    }
    values = {"headers": table(headers), "delivery_mode": b"\x02", "message_id": shortstr(f"m-{n}".encode())}
    values.update(props)
    return properties(values)


# What broke the whole lot before: each alone in a parking queue of well-formed messages.
HOSTILE: dict[str, bytes] = {
    # epoch milliseconds where an ISO text belongs (an older tool's): "year 58904 is out of range"
    "ms-first-failure": parked(
        90, extra={b"x-rf-first-failure": b"l" + struct.pack(">q", 1_767_225_600_000)}
    ),
    "huge-last-failure": parked(91, extra={b"x-rf-last-failure": b"l" + struct.pack(">q", 2**63 - 1)}),
    "bytes-reason": parked(92, extra={b"x-rf-reason": b"x" + longstr(b"rejected")}),
    "tables-everywhere": parked(
        93,
        extra={
            b"x-rf-attempts": b"F" + table({b"n": b"b\x01"}),
            b"x-rf-error": b"l" + struct.pack(">q", -(2**63)),
            b"x-rf-exception": b"A" + longstr(S("a") + b"V"),
            b"x-death": S("not a list"),
            b"x-rf-queue": b"d" + struct.pack(">d", 1e308),
        },
    ),
    # what the client cannot decode at all: the headers, the timestamp, the content type
    "timestamp-past-9999": parked(94, extra={b"x-rf-last-failure": b"T" + struct.pack(">Q", 2**64 - 1)}),
    "name-not-utf8": parked(95, extra={b"\xfftenant": S("acme")}),
    "property-timestamp": parked(96, timestamp=struct.pack(">Q", 2**64 - 2)),
    "content-type-not-utf8": parked(97, content_type=shortstr(b"\xff\xfe")),
}


@pytest.fixture(params=["quorum", "classic"])
async def service(request: pytest.FixtureRequest, make_app: Callable[..., App]) -> tuple[App, str]:
    app = make_app()
    queue = unique("hostile")

    @app.consumer(queue, queue_type=request.param, retries=0)
    async def handle(body: bytes) -> None: ...

    await app.declare()
    return app, queue


async def fill(admin: Admin, queue: str, messages: list[bytes]) -> list[tuple[bytes, bytes]]:
    """Parks these property blocks, body `body-<i>` each; returns (properties, body) parked."""
    out = []
    for i, raw in enumerate(messages):
        body = f"body-{i}".encode()
        await publish_raw(admin.channel, body, raw, routing_key=f"{queue}.parked")
        out.append((raw, body))
    return out


async def parked_now(queue: str) -> list[tuple[bytes, bytes]]:
    """(property bytes, body) of every parked message; takes them out, then puts them back."""
    return [(header[12:], body) for header, body in await get_all(f"{queue}.parked")]


async def settled_count(admin: Admin, queue: str, expected: int, within: float = 10.0) -> None:
    """The queue's ready count reaches `expected` within `within` s, never going past it."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        count = await admin.count(queue)
        assert count <= expected, f"{queue}: {count} messages, more than the {expected} it had"
        if count == expected or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert count == expected, f"{queue}: {count} messages, not the {expected} it had"


def without_counters(raw: bytes) -> tuple[tuple[str, Any], ...]:
    """The property bytes, each property and each header entry as its bytes, without the broker's
    delivery counters (a quorum queue adds x-delivery-count on delivery, and writes the table
    back sorted by name: the entries' order is the broker's, their bytes are the producer's)."""
    props: dict[str, Any] = dict(read_properties(b"\x00" * 12 + raw))
    if "headers" in props:
        entries = read_table(props["headers"])
        for counter in (b"x-delivery-count", b"x-acquired-count"):
            entries.pop(counter, None)
        props["headers"] = tuple(sorted(entries.items()))
    return tuple(sorted(props.items()))


def same_messages(before: list[tuple[bytes, bytes]], after: list[tuple[bytes, bytes]]) -> None:
    """Exactly the messages parked before, none doubled, none lost, each byte for byte."""
    assert Counter((without_counters(p), b) for p, b in after) == Counter(
        (without_counters(p), b) for p, b in before
    )


@pytest.mark.parametrize("hostile", list(HOSTILE))
async def test_one_hostile_parked_message_stops_no_command(
    service: tuple[App, str], admin: Admin, hostile: str
) -> None:
    app, queue = service
    raw = HOSTILE[hostile]
    messages = [parked(n) for n in range(3)] + [raw] + [parked(n) for n in range(3, 5)]
    before = await fill(admin, queue, messages)
    lot = app.admin()

    for _ in range(5):  # each look at a quorum parking queue moves every message to the back
        listing = await lot.list_parked(queue)
        assert listing.total == 6
    assert await admin.count(f"{queue}.parked") == 6  # nothing doubled
    shown = await lot.show_parked(queue, filter=Filter(message_id=f"m-{raw_id(raw)}"))
    assert shown is not None
    assert shown.message_id == f"m-{raw_id(raw)}"
    assert (await lot.replay_parked(queue, dry_run=True)).done == 6
    # every byte of every message is still there after the looks
    same_messages(before, await parked_now(queue))
    for p, b in before:
        await publish_raw(admin.channel, b, p, routing_key=f"{queue}.parked")

    # the operator can remove it by id, and only it
    purged = await lot.purge_parked(queue, filter=Filter(message_id=f"m-{raw_id(raw)}"))
    assert (purged.done, purged.skipped) == (1, 5)
    rest = [m for m in before if m[0] != raw]
    same_messages(rest, await parked_now(queue))
    for p, b in rest:
        await publish_raw(admin.channel, b, p, routing_key=f"{queue}.parked")
    replayed = await lot.replay_parked(queue)
    assert replayed.done == 5
    assert await admin.count(queue) == 5
    assert await admin.count(f"{queue}.parked") == 0


def raw_id(raw: bytes) -> str:
    message_id = read_properties(b"\x00" * 12 + raw)["message_id"]
    return message_id[1:].decode().removeprefix("m-")


def replayed_properties(raw: bytes) -> bytes:
    """What a replay sends back: the parked bytes without rabbitflow's headers, persistent."""
    props = read_properties(b"\x00" * 12 + raw)
    entries = {k: v for k, v in read_table(props["headers"]).items() if not k.startswith(b"x-rf-")}
    if entries:
        props["headers"] = table(entries)
    else:
        del props["headers"]
    props["delivery_mode"] = b"\x02"
    props.pop("expiration", None)
    return properties(props)


async def test_looks_and_replays_keep_what_the_client_cannot_decode_byte_for_byte(
    service: tuple[App, str], admin: Admin
) -> None:
    """A message parked by rejection because a header name is not UTF-8 (or a timestamp is past
    the year 9999) kept its tenant, its trace and x-death only until the first look."""
    app, queue = service
    undecodable = [HOSTILE["name-not-utf8"], HOSTILE["timestamp-past-9999"], HOSTILE["property-timestamp"]]
    before = await fill(admin, queue, [parked(0), *undecodable, parked(1)])
    lot = app.admin()
    for _ in range(3):
        assert (await lot.list_parked(queue)).total == 5
        assert await lot.show_parked(queue, filter=Filter(message_id="m-95")) is not None
    after = await parked_now(queue)
    same_messages(before, after)
    for p, b in before:
        await publish_raw(admin.channel, b, p, routing_key=f"{queue}.parked")

    assert (await lot.replay_parked(queue)).done == 5
    back = [(header[12:], body) for header, body in await get_all(queue)]
    assert Counter((without_counters(p), b) for p, b in back) == Counter(
        (without_counters(replayed_properties(p)), b) for p, b in before
    )


# -- a walk that stops halfway -------------------------------------------------------------------


class Stop(Exception):
    """Raised from inside a walk."""


async def test_a_walk_that_raises_halfway_leaves_every_message_once(
    service: tuple[App, str], admin: Admin
) -> None:
    app, queue = service
    before = await fill(admin, queue, [parked(n) for n in range(6)])
    lot = app.admin()

    def stop_at_three(done: int, total: int) -> None:
        if done == 3:
            raise Stop("the progress bar broke")

    for _ in range(3):
        with pytest.raises(Stop):
            await lot.list_parked(queue, progress=stop_at_three)
    # The rolled-back walk's originals go back to the queue as its channel closes; a quorum queue
    # counts them ready again a moment later. Never more than 6 (nothing doubled), then 6 again.
    await settled_count(admin, f"{queue}.parked", 6)
    with pytest.raises(Stop):
        await lot.replay_parked(queue, progress=stop_at_three)
    with pytest.raises(Stop):
        await lot.purge_parked(queue, progress=stop_at_three)
    await settled_count(admin, f"{queue}.parked", 6)
    after = await parked_now(queue)
    replayed = [(header[12:], body) for header, body in await get_all(queue)]
    # what was replayed before the stop left the lot; nothing is in both places, nothing lost
    assert len(after) + len(replayed) == 6
    same_messages([m for m in before if m[1] not in {b for _, b in replayed}], after)
    for p, b in after:
        await publish_raw(admin.channel, b, p, routing_key=f"{queue}.parked")
    assert (await lot.replay_parked(queue)).done == len(after)
    assert sorted(b for _, b in replayed + [(h, b) for h, b in await get_all(queue)]) == sorted(
        b for _, b in before
    )  # replayed once each, over the two replays


async def test_a_cancelled_walk_leaves_every_message_once(service: tuple[App, str], admin: Admin) -> None:
    """Ctrl-C cancels the CLI's task in the middle of its walk."""
    app, queue = service
    before = await fill(admin, queue, [parked(n) for n in range(6)])
    lot = app.admin()
    for walk in (lot.list_parked, lot.replay_parked):
        tasks: list[asyncio.Future[Any]] = []

        def cancel_at_three(done: int, total: int, tasks: list[asyncio.Future[Any]] = tasks) -> None:
            if done == 3:
                tasks[0].cancel()

        task = asyncio.ensure_future(walk(queue, progress=cancel_at_three))
        tasks.append(task)
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)  # anything still in flight would land now
    await settled_count(admin, f"{queue}.parked", 6)
    after = await parked_now(queue)
    replayed = await get_all(queue)
    assert len(after) + len(replayed) == 6
    same_messages([m for m in before if m[1] not in {b for _, b in replayed}], after)


async def test_a_walk_that_loses_its_connection_leaves_every_message_once(
    service: tuple[App, str], admin: Admin
) -> None:
    app, queue = service
    before = await fill(admin, queue, [parked(n) for n in range(40)])
    async with TcpProxy(BROKER_PORT, BROKER_HOST) as proxy:
        app.use_url(f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
        lot: ServiceAdmin = app.admin()
        lot.budget = 2

        def cut_at(n: int) -> Callable[[int, int], None]:
            def progress(done: int, total: int) -> None:
                if done == n:
                    proxy.reset()

            return progress

        for n in (5, 20, 33):
            with pytest.raises((RabbitflowError, ConnectionError, asyncio.TimeoutError)):
                await lot.list_parked(queue, progress=cut_at(n))
            proxy.resume()
        with pytest.raises((RabbitflowError, ConnectionError, asyncio.TimeoutError)):
            await lot.replay_parked(queue, progress=cut_at(25))
        proxy.resume()
    await asyncio.sleep(0.3)
    await settled_count(admin, f"{queue}.parked", 40)
    after = await parked_now(queue)
    replayed = await get_all(queue)
    assert len(after) + len(replayed) == 40, (len(after), len(replayed))
    same_messages([m for m in before if m[1] not in {b for _, b in replayed}], after)


# -- fuzz: any headers and properties --------------------------------------------------------------


def _packed(kind: bytes, fmt: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return values.map(lambda v: kind + struct.pack(fmt, v))


SCALARS = st.one_of(
    st.booleans().map(lambda v: b"t" + bytes((v,))),
    _packed(b"b", ">b", st.integers(-128, 127)),
    _packed(b"I", ">i", st.integers(-(2**31), 2**31 - 1)),
    _packed(b"l", ">q", st.integers(-(2**63), 2**63 - 1)),
    _packed(b"d", ">d", st.floats(allow_nan=False, allow_infinity=False)),
    st.tuples(st.integers(0, 255), st.integers(0, 2**32 - 1)).map(lambda t: b"D" + struct.pack(">BI", *t)),
    st.binary(max_size=20).map(lambda v: b"S" + longstr(v)),
    st.text(max_size=20).map(lambda v: b"S" + longstr(v.encode())),
    _packed(b"T", ">Q", st.integers(0, 2**64 - 1)),
    st.just(b"V"),
    st.binary(max_size=20).map(lambda v: b"x" + longstr(v)),
)
NAMES = st.one_of(
    st.sampled_from(
        [
            b"x-rf-reason",
            b"x-rf-attempts",
            b"x-rf-exception",
            b"x-rf-error",
            b"x-rf-traceback",
            b"x-rf-queue",
            b"x-rf-original-exchange",
            b"x-rf-original-routing-key",
            b"x-rf-first-failure",
            b"x-rf-last-failure",
            b"x-death",
            b"x-rf-origin-queue",
        ]
    ),
    st.binary(min_size=1, max_size=12),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: b"A" + longstr(b"".join(items))),
        st.dictionaries(NAMES, inner, max_size=3).map(lambda d: b"F" + table(d)),
    ),
    max_leaves=8,
)
SHORT = st.binary(max_size=20).map(shortstr)
PROPERTIES = st.fixed_dictionaries(
    {"headers": st.dictionaries(NAMES, VALUES, max_size=6).map(table)},
    optional={
        "content_type": SHORT,
        "content_encoding": SHORT,
        "delivery_mode": st.sampled_from([b"\x01", b"\x02"]),  # the broker refuses any other
        "priority": st.integers(0, 255).map(lambda p: bytes((p,))),
        "correlation_id": SHORT,
        "reply_to": SHORT,
        "expiration": st.just(shortstr(b"600000")),
        "timestamp": st.integers(0, 2**64 - 1).map(lambda t: struct.pack(">Q", t)),
        "type": SHORT,
        "app_id": SHORT,
    },
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(published=PROPERTIES)
@example(published={"headers": table({})})  # an empty table stays (4.0.5 adds no counter to drop)
async def test_any_parked_message_is_listed_shown_and_kept_byte_for_byte(
    service: tuple[App, str], admin: Admin, published: dict[str, bytes]
) -> None:
    app, queue = service
    await admin.channel.queue_purge(f"{queue}.parked")
    published = {**published, "message_id": shortstr(b"fuzzed")}
    raw = properties(published)
    before = await fill(admin, queue, [parked(0), raw, parked(1)])
    lot = app.admin()
    assert (await lot.list_parked(queue)).total == 3
    shown = await lot.show_parked(queue, filter=Filter(message_id="fuzzed"))
    assert shown is not None
    shown.details()
    assert (await lot.list_parked(queue)).total == 3
    same_messages(before, await parked_now(queue))
    for p, b in before:
        await publish_raw(admin.channel, b, p, routing_key=f"{queue}.parked")
    assert (await lot.purge_parked(queue, filter=Filter(message_id="fuzzed"))).done == 1
    assert (await lot.replay_parked(queue)).done == 2
    assert len(await get_all(queue)) == 2
