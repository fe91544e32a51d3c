"""The receiver reads what the socket has in one go and hands the deliveries of rabbitflow's own
consumers over itself: however TCP cuts the stream, every delivery arrives whole, the frames of
other consumers and channels reach aiormq in their order, and a big body made of several frames
or an empty one is delivered intact."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest
from aiormq.exceptions import AMQPConnectionError
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.frame import marshal
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat

from rabbitflow import App, ChannelClosed, ConnectionLost, Message
from rabbitflow.transport.amqp import broker as amqp
from rabbitflow.transport.amqp.decode import Receiver
from rabbitflow.transport.base import Delivery
from rabbitflow.urls import parse_urls

from ..helpers import Admin, unique, wait_for

FRAME_MAX = 4096


def _message(channel: int, consumer: str, tag: int, body: bytes, **properties: Any) -> list[bytes]:
    frames = [
        marshal(
            Basic.Deliver(
                consumer_tag=consumer,
                delivery_tag=tag,
                redelivered=tag % 2 == 0,
                exchange="ex",
                routing_key=f"rk.{tag}",
            ),
            channel,
        ),
        marshal(ContentHeader(body_size=len(body), properties=Basic.Properties(**properties)), channel),
    ]
    for start in range(0, len(body), FRAME_MAX):
        frames.append(marshal(ContentBody(body[start : start + FRAME_MAX]), channel))
    return frames


def _stream(rng: random.Random) -> tuple[list[bytes], list[tuple[int, int]], list[tuple[int, str, bytes]]]:
    """Frames of routed and other deliveries, interleaved across channels as the spec allows; the
    routed deliveries expected (tag, routing key, body) and the frames aiormq should see
    (channel, frame kind: 1 method, 2 header, 3 body, 8 heartbeat), in order."""
    routed: list[tuple[int, str, bytes]] = []
    others: list[tuple[int, int]] = []
    frames: list[bytes] = []
    for tag in range(1, 201):
        body = bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 100, FRAME_MAX, 3 * FRAME_MAX + 7])))
        roll = rng.random()
        if roll < 0.6:  # ours, on channel 1: sometimes with channel 2's frames between its own
            mine = _message(1, "ours", tag, body, content_type="application/json", message_id=str(tag))
            if rng.random() < 0.3:
                theirs = _message(2, "theirs", tag, b"other")
                mine[1:1] = theirs
                others += [(2, 1), (2, 2), (2, 3)]
            frames += mine
            routed.append((tag, f"rk.{tag}", body))
        elif roll < 0.75:  # another consumer's, on the routed channel: aiormq's
            message = _message(1, "aiormq's", tag, body)
            frames += message
            others += [(1, 1), (1, 2)] + [(1, 3)] * (len(message) - 2)
        elif roll < 0.9:  # a publisher confirm on the routed channel
            frames.append(marshal(Basic.Ack(delivery_tag=tag), 1))
            others.append((1, 1))
        else:
            frames.append(marshal(Heartbeat(), 0))
            others.append((0, 8))
    return frames, others, routed


@pytest.mark.parametrize("seed", range(8))
async def test_every_delivery_arrives_whole_however_the_stream_is_cut(seed: int) -> None:
    rng = random.Random(seed)
    frames, others, routed = _stream(rng)
    data = b"".join(frames)
    reader = asyncio.StreamReader()
    receiver = Receiver(reader)
    got: list[Delivery] = []
    receiver.route(1, {"ours": got.append})
    seen: list[tuple[int, int]] = []

    async def feed() -> None:
        i = 0
        while i < len(data):  # cuts anywhere: inside frame heads, payloads, end octets
            step = rng.choice([1, 2, 7, 8, 50, 700, 5000, 70000])
            reader.feed_data(data[i : i + step])
            i += step
            await asyncio.sleep(0)
        reader.feed_eof()

    feeding = asyncio.create_task(feed())
    while len(seen) < len(others):
        weight, channel, frame = await receiver.get_frame()
        if weight == 0:
            assert isinstance(frame, Heartbeat)  # the receiver's own, for aiormq's clock
            continue
        kinds = ((ContentHeader, 2), (ContentBody, 3), (Heartbeat, 8))
        seen.append((channel, next((kind for cls, kind in kinds if isinstance(frame, cls)), 1)))
    await feeding
    assert seen == others
    assert [(d.delivery_tag, d.routing_key, d.body) for d in got] == routed
    assert all(d.exchange == "ex" and d.redelivered is (d.delivery_tag % 2 == 0) for d in got)
    assert all(d.properties.message_id == str(d.delivery_tag) for d in got)
    assert all(d.properties.content_type == "application/json" and d.undecodable is None for d in got)
    assert all(d.raw_header is not None for d in got)


async def test_a_stream_cut_inside_a_frame_is_a_lost_connection_not_a_hang() -> None:
    reader = asyncio.StreamReader()
    receiver = Receiver(reader)
    receiver.route(1, {"ours": lambda delivery: None})
    frames = _message(1, "ours", 1, b"x" * 10)
    reader.feed_data(b"".join(frames)[:-5])
    reader.feed_eof()
    weight, _, frame = await asyncio.wait_for(receiver.get_frame(), 5)
    assert isinstance(frame, Heartbeat)  # for aiormq's clock: a delivery is under way
    assert weight == 0
    with pytest.raises(AMQPConnectionError, match="unexpectedly closed"):
        await asyncio.wait_for(receiver.get_frame(), 5)


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_body_of_many_frames_and_an_empty_one_are_handled_intact(
    make_app: Callable[..., App], admin: Admin, queue_type: str
) -> None:
    app = make_app()
    queue = unique("frames")
    handled: list[bytes] = []

    @app.consumer(queue, queue_type=queue_type)
    async def handle(body: bytes, message: Message) -> None:
        handled.append(body)

    big = bytes(random.Random(1).randrange(256) for _ in range(300_000))  # 3 frames at frame_max 128 KiB
    async with app:
        for body in (big, b"", b"small"):
            await admin.publish(body, routing_key=queue, content_type="application/octet-stream")
        await wait_for(lambda: len(handled) == 3)
    assert handled == [big, b"", b"small"]
    assert await admin.count(queue) == 0


async def test_a_handler_still_running_when_the_broker_closes_its_channel_is_cancelled(
    broker_url: str, admin: Admin
) -> None:
    """As aiormq cancelled the tasks it started for a consumer: the message goes back to the
    queue, and nothing goes on working on it for a channel that is gone."""
    queue = unique("closed")
    await admin.channel.queue_declare(queue, durable=True)
    admin.queues.add(queue)
    await admin.publish(b"{}", routing_key=queue)
    transport = await amqp.connect(parse_urls(broker_url)[0], timeout=5, heartbeat=5, name="receiver")
    started = asyncio.Event()
    ended: list[str] = []

    async def on_delivery(delivery: Delivery) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
            ended.append("finished")
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise

    try:
        channel = await transport.channel()
        await channel.consume(queue, on_delivery, prefetch=1)
        await asyncio.wait_for(started.wait(), 10)
        with pytest.raises(ChannelClosed):  # 404: the broker closes the channel
            await channel.declare_queue(unique("absent"), passive=True)
        await wait_for(lambda: ended == ["cancelled"], timeout=5)
    finally:
        await transport.close()
    await asyncio.sleep(0.5)  # the broker requeues what the closed channel held
    assert await admin.count(queue) == 1  # back in the queue, unacked


@pytest.mark.parametrize("settle", ["ack", "reject"])
async def test_a_settlement_made_while_its_channel_closes_never_follows_the_close(
    broker_url: str, admin: Admin, settle: str
) -> None:
    """A handler that ends while its channel closes (a partition handed over, a stop): its ack
    must not reach the broker after our channel.close, which would be a 504 CHANNEL_ERROR that
    closes the whole connection and every other channel on it. The settlement fails here (the
    message comes back with the channel), and the neighbour channel goes on working."""
    queue = unique("closing")
    await admin.channel.queue_declare(queue, durable=True)
    admin.queues.add(queue)
    await admin.publish(b"{}", routing_key=queue)
    transport = await amqp.connect(parse_urls(broker_url)[0], timeout=5, heartbeat=5, name="closing")
    got: list[Delivery] = []

    async def on_delivery(delivery: Delivery) -> None:
        got.append(delivery)

    try:
        neighbour = await transport.channel()
        channel = await transport.channel()
        await channel.consume(queue, on_delivery, prefetch=1)
        await wait_for(lambda: len(got) == 1, timeout=10)
        closing = asyncio.ensure_future(channel.close())
        # aiormq holds its channel's RPC lock from writing channel.close until close-ok comes.
        rpc = channel._channel._Channel__lock  # type: ignore[attr-defined]
        while not rpc.locked():  # noqa: ASYNC110 - until the close is written
            await asyncio.sleep(0)
        tag = got[0].delivery_tag
        settlement = channel.ack(tag) if settle == "ack" else channel.reject(tag, requeue=False)
        with pytest.raises(ConnectionLost):
            await settlement
        await closing
        await asyncio.sleep(0.3)  # a 504 would close the connection by now
        assert transport.is_open
        await neighbour.declare_queue(queue, passive=True)  # the neighbour channel still works
    finally:
        await transport.close()
    await asyncio.sleep(0.5)
    assert await admin.count(queue) == 1  # back in the queue with the closed channel
