"""Looking into a parking queue, and sending parked messages back where they first went.

Every operation is one *walk* over the messages parked when it began (the count a passive
declare reports then; what is parked meanwhile waits for the next one). Each message met is kept,
moved back to its queue (replay) or dropped (purge), and leaves the parking queue only after
what replaces it was confirmed. How a kept message stays parked depends on the queue type:

- classic: it is held unacked and returned when the walk's channel closes. Classic queues count
  no deliveries and put a returned message back in its place: nothing is written, order is exact.
- quorum: every return counts towards the queue's delivery limit, whatever returns it (measured on
  3.10.8: basic.get then channel close, basic.reject and basic.nack with requeue, basic.recover;
  from 4.3 basic.nack no longer counts, the rest still do), and a message over the limit is
  dead-lettered, or dropped when the queue has none (a parking queue has none; 4.0+ give quorum
  queues a default limit of 20, a policy may set a lower one). So the walk never returns one:
  it republishes an exact copy to the back of the parking queue, then acks the original. It goes
  on to the last message parked when it began, so the kept ones end in their original order;
  a message parked while the walk runs lands between them.

On RabbitMQ the walk's channel is transactional (AMQP tx): copies and acks take effect together,
64 messages at a time, so a walk stopped by anything (an exception, Ctrl-C, a lost connection)
leaves every message parked once: what was not committed never happened. Copies carry the parked
message's property bytes as they arrived (`RawProperties`), edited only to drop headers by name,
so what the client cannot decode is kept. The in-memory broker has no transactions: there each
copy's original is acked at its confirm, and a stopped walk settles what is in flight first.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from typing import Any

from rabbitflow import names
from rabbitflow.errors import ChannelClosed, ConfigError
from rabbitflow.parking.message import (
    COUNTERS,
    Filter,
    GroupCounter,
    Listing,
    ParkedMessage,
    WalkResult,
)
from rabbitflow.runtime.copies import exact_headers
from rabbitflow.transport.amqp.encode import RawProperties
from rabbitflow.transport.amqp.tables import edit_properties
from rabbitflow.transport.base import Channel, Delivery, Transport, clone_properties, persistent_copy

__all__ = ["Progress", "find", "look", "peek", "purge", "replay"]

# Copies in flight before the walk waits for the oldest confirm.
_WINDOW = 64

Progress = Callable[[int, int], None]  # (messages walked, messages parked when it began)


KEEP, MOVE, DROP = "keep", "move", "drop"


async def _missing(transport: Transport, name: str) -> bool:
    channel = await transport.channel()
    try:
        await channel.declare_queue(name, passive=True)
    except ChannelClosed:
        return True  # 404 NOT_FOUND closed the channel
    await channel.close()
    return False


async def _walk(
    transport: Transport,
    queue: str,
    decide: Callable[[ParkedMessage], str],
    *,
    rotate: bool,
    done: Callable[[], bool] = lambda: False,
    progress: Progress | None = None,
) -> int:
    """Meet each message parked for `queue` when it began, head first, and carry out what
    `decide` says of it; once `done()`, the rest are kept (see the module's docstring). Returns
    how many were parked when it began."""
    parked = names.parked_queue(queue)
    if await _missing(transport, parked):
        raise ConfigError(
            f"queue {parked!r} does not exist on {transport.node}: nothing was parked for {queue!r} "
            "yet, or the service's topology is not declared (`rabbitflow topology MODULE:APP --apply`)"
        )
    channel = await transport.transaction_channel()
    if channel is None:
        return await _walk_confirmed(transport, queue, decide, rotate=rotate, done=done, progress=progress)
    moved = False  # since the last commit
    pending = 0
    try:
        found = (await channel.declare_queue(parked, passive=True)).message_count
        if progress is not None:
            progress(0, found)
        seen, rotated = 0, False
        while seen < found and not (done() and not rotated):
            delivery = await channel.get(parked)
            if delivery is None:
                break
            if seen == 0 and any(counter in (delivery.properties.headers or {}) for counter in COUNTERS):
                rotate = True  # a quorum queue after all: it counts returns
            action = KEEP if done() else decide(ParkedMessage.of(delivery, seen))
            seen += 1
            if action == MOVE:
                await _send(channel, delivery, queue, _replayed(delivery))
                moved = True
            elif action == KEEP and rotate:
                rotated = True
                await _send(channel, delivery, parked, _kept(delivery))
            if action != KEEP or rotate:
                await channel.ack(delivery.delivery_tag)
                pending += 1
            # else: held unacked; closing the channel returns it to its place
            if pending >= _WINDOW:
                await _commit(channel, queue if moved else None)
                moved, pending = False, 0
            if progress is not None:
                progress(seen, found)
        if pending:
            await _commit(channel, queue if moved else None)
    finally:
        # Whatever stopped the walk (an error, a cancellation, a lost connection), what was not
        # committed never happens: its copies are dropped and its originals stay parked.
        await channel.close()
    return found


async def _commit(channel: Channel, moved_to: str | None) -> None:
    """The copies and acks since the last commit take effect together. A replay checks first
    that the queue it sends to is still there: a missing one closes the channel (404), which
    takes nothing out of the parking queue, where an unroutable copy would be dropped."""
    if moved_to is not None:
        await channel.declare_queue(moved_to, passive=True)
    await channel.commit()


async def _walk_confirmed(
    transport: Transport,
    queue: str,
    decide: Callable[[ParkedMessage], str],
    *,
    rotate: bool,
    done: Callable[[], bool],
    progress: Progress | None,
) -> int:
    """`_walk` on a transport without transactions (the in-memory broker): each copy's original
    is acked at its confirm; a walk that stops settles what is already in flight first."""
    parked = names.parked_queue(queue)
    channel = await transport.channel()
    window: collections.deque[tuple[asyncio.Future[None], int]] = collections.deque()
    try:
        found = (await channel.declare_queue(parked, passive=True)).message_count
        if progress is not None:
            progress(0, found)
        seen, rotated = 0, False
        while seen < found and not (done() and not rotated):
            delivery = await channel.get(parked)
            if delivery is None:
                break
            if seen == 0 and any(counter in (delivery.properties.headers or {}) for counter in COUNTERS):
                rotate = True
            action = KEEP if done() else decide(ParkedMessage.of(delivery, seen))
            seen += 1
            if action == DROP:
                await channel.ack(delivery.delivery_tag)
            elif action == MOVE:
                future = _send_nowait(channel, delivery, queue, _replayed(delivery))
                window.append((future, delivery.delivery_tag))
            elif rotate:
                rotated = True
                future = _send_nowait(channel, delivery, parked, _kept(delivery))
                window.append((future, delivery.delivery_tag))
            while len(window) >= _WINDOW or (window and window[0][0].done()):
                await _settle(channel, window)
            if progress is not None:
                progress(seen, found)
        while window:
            await _settle(channel, window)
    finally:
        if window:  # stopped: the copies in flight are settled before their originals return
            with contextlib.suppress(Exception):
                await asyncio.shield(_settle_all(channel, window))
        await channel.close()
    return found


async def _settle_all(channel: Channel, window: collections.deque[tuple[asyncio.Future[None], int]]) -> None:
    async with asyncio.timeout(10):
        while window:
            await _settle(channel, window)


def _replayed(delivery: Delivery) -> Any:
    """The properties a replayed copy goes back with: the parked message's, as they arrived,
    without rabbitflow's headers, the broker's death records and counters; persistent."""
    raw = _raw(delivery, _REPLAY_DROPS, persistent=True)
    if raw is not None:
        return raw
    headers = delivery.properties.headers or {}
    kept = names.without(headers, names.RABBITFLOW_HEADERS, names.BROKER_HEADERS, COUNTERS)
    return persistent_copy(delivery.properties, exact_headers(delivery, kept) or None)


def _kept(delivery: Delivery) -> Any:
    """The properties of the copy that keeps a message parked: as they arrived, without the
    broker's counters of this look."""
    raw = _raw(delivery, _COUNTER_DROPS, persistent=False)
    if raw is not None:
        return raw
    headers = delivery.properties.headers or {}
    return clone_properties(
        delivery.properties,
        headers=exact_headers(delivery, names.without(headers, COUNTERS)) or None,
        expiration=delivery.properties.expiration,
        delivery_mode=delivery.properties.delivery_mode,
    )


_COUNTER_DROPS = frozenset(name.encode() for name in COUNTERS)
_REPLAY_DROPS = frozenset(
    name.encode() for name in (*names.RABBITFLOW_HEADERS, *names.BROKER_HEADERS, *COUNTERS)
)


def _raw(delivery: Delivery, drop: frozenset[bytes], *, persistent: bool) -> RawProperties | None:
    """The delivery's property bytes, edited at the byte level only (so every header and property
    the client could not decode goes out as it came); None from a broker that keeps no bytes.
    A property list that cannot be cut goes out unchanged, counters and all (the queue it goes to
    overwrites x-delivery-count if it is a quorum queue; a classic one keeps a stale one)."""
    if delivery.raw_header is None:
        return None
    block = edit_properties(delivery.raw_header, drop_headers=drop, persistent=persistent)
    return RawProperties.of(delivery.properties, block if block is not None else delivery.raw_header[12:])


async def _send(channel: Channel, delivery: Delivery, routing_key: str, properties: Any) -> None:
    await channel.publish(delivery.body, exchange="", routing_key=routing_key, properties=properties)


def _send_nowait(
    channel: Channel, delivery: Delivery, routing_key: str, properties: Any
) -> asyncio.Future[None]:
    return channel.publish_nowait(delivery.body, exchange="", routing_key=routing_key, properties=properties)


async def _settle(channel: Channel, window: collections.deque[tuple[asyncio.Future[None], int]]) -> None:
    """The oldest copy confirmed: its original leaves the parking queue."""
    future, tag = window[0]
    await future
    window.popleft()
    await channel.ack(tag)


async def look(
    transport: Transport,
    queue: str,
    *,
    filter: Filter | None = None,
    limit: int = 20,
    rotate: bool = False,
    progress: Progress | None = None,
) -> Listing:
    """Every message parked for `queue` that matches `filter`, grouped by reason and exception
    type, with the first `limit` of them; all stay parked, in their order. `rotate`: the parking
    queue is a quorum queue (see the module's docstring)."""
    chosen, tally = filter or Filter(), GroupCounter()
    shown: list[ParkedMessage] = []
    total = 0

    def decide(message: ParkedMessage) -> str:
        nonlocal total
        if chosen.matches(message):
            total += 1
            tally.add(message)
            if len(shown) < limit:
                shown.append(message)
        return KEEP

    await _walk(transport, queue, decide, rotate=rotate, progress=progress)
    return Listing(names.parked_queue(queue), total, tally.result(), shown)


async def peek(
    transport: Transport, queue: str, limit: int, *, filter: Filter | None = None, rotate: bool = False
) -> list[ParkedMessage]:
    """Up to `limit` messages of `queue`'s parking queue, head first; all of them stay parked."""
    chosen = filter or Filter()
    shown: list[ParkedMessage] = []

    def decide(message: ParkedMessage) -> str:
        if chosen.matches(message):
            shown.append(message)
        return KEEP

    if limit > 0:
        await _walk(transport, queue, decide, rotate=rotate, done=lambda: len(shown) >= limit)
    return shown


async def find(
    transport: Transport, queue: str, *, filter: Filter | None = None, rotate: bool = False
) -> ParkedMessage | None:
    """The first message parked for `queue` that matches `filter` (the head without one), or
    None; it stays parked."""
    found = await peek(transport, queue, 1, filter=filter, rotate=rotate)
    return found[0] if found else None


async def _act(
    transport: Transport,
    queue: str,
    action: str,
    limit: int | None,
    filter: Filter | None,
    dry_run: bool,
    rotate: bool,
    progress: Progress | None,
) -> WalkResult:
    chosen, tally = filter or Filter(), GroupCounter()
    taken = skipped = 0

    def decide(message: ParkedMessage) -> str:
        nonlocal taken, skipped
        if not chosen.matches(message):
            skipped += 1
            return KEEP
        taken += 1
        tally.add(message)
        return KEEP if dry_run else action

    found = await _walk(
        transport,
        queue,
        decide,
        rotate=rotate,
        done=lambda: limit is not None and taken >= limit,
        progress=progress,
    )
    return WalkResult(names.parked_queue(queue), found, taken, skipped, dry_run, tally.result())


async def replay(
    transport: Transport,
    queue: str,
    limit: int | None = None,
    *,
    filter: Filter | None = None,
    dry_run: bool = False,
    rotate: bool = False,
    progress: Progress | None = None,
) -> WalkResult:
    """Send parked messages back to the queue that parked them (the default exchange, routing key
    `queue`: never to the other queues bound where they were first published, whatever their
    headers say), without rabbitflow's headers, so they start again at attempt 1. It takes at most
    `limit` of those parked when it began that match `filter`; the others stay parked, in their
    order. Each leaves the parking queue only after the broker confirmed its copy."""
    if not dry_run and await _missing(transport, queue):
        raise ConfigError(
            f"queue {queue!r} does not exist on {transport.node}: replayed messages would have nowhere "
            "to go; declare the service's topology first (`rabbitflow topology MODULE:APP --apply`)"
        )
    return await _act(transport, queue, MOVE, limit, filter, dry_run, rotate, progress)


async def purge(
    transport: Transport,
    queue: str,
    limit: int | None = None,
    *,
    filter: Filter | None = None,
    dry_run: bool = False,
    rotate: bool = False,
    progress: Progress | None = None,
) -> WalkResult:
    """Delete at most `limit` of the messages parked for `queue` when it began that match
    `filter`; the others stay parked, unchanged and in their order."""
    return await _act(transport, queue, DROP, limit, filter, dry_run, rotate, progress)
