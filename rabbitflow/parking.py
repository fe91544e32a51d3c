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
"""

from __future__ import annotations

import asyncio
import base64
import collections
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from . import names
from .errors import ChannelClosed, ConfigError
from .transport.base import Channel, Delivery, Transport, clone_properties, persistent_copy

__all__ = [
    "REASONS",
    "Filter",
    "Group",
    "Listing",
    "Outcome",
    "ParkedMessage",
    "Progress",
    "find",
    "jsonable",
    "look",
    "peek",
    "purge",
    "replay",
]

# x-rf-reason values rabbitflow writes, and the broker's own dead-letter reasons (a message the
# broker moved to the parking queue carries no x-rf-reason; its x-death says why).
REASONS = ("exhausted", "rejected", "decode-error", "delivery-limit", "not-retryable", "expired", "maxlen")
# Headers a quorum queue writes on delivery: a kept copy starts without them, as a fresh message.
_COUNTERS = ("x-delivery-count", "x-acquired-count")
# Copies in flight before the walk waits for the oldest confirm.
_WINDOW = 64

Progress = Callable[[int, int], None]  # (messages walked, messages parked when it began)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return "" if value is None else str(value)


def _count(value: Any) -> int:
    """A header that should be a count; 0 when it is missing or not a whole number."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    try:
        return int(_text(value).strip())
    except ValueError:
        return 0


def _time(value: Any) -> str | None:
    """ISO 8601 UTC with milliseconds, as copies.py writes x-rf-*-failure."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        value = datetime.fromtimestamp(value, UTC)
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    text = _text(value)
    return text or None


def _death(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The broker's newest death record, when the broker itself dead-lettered the message."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def jsonable(value: Any) -> Any:
    """A header value as JSON can hold it (AMQP tables hold timestamps, bytes, decimals)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return _time(value)
    if isinstance(value, bytes):
        return _text(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """A parked message as an operator reads it; texts are "" where the headers say nothing."""

    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    reason: str
    attempts: int  # 0 when not recorded (or not a number)
    error: str
    exception: str = ""  # the exception's type, `module.QualName`
    traceback: str = ""
    first_failure: str | None = None
    last_failure: str | None = None
    content_type: str | None = None
    position: int = 0  # its place in the parking queue when the walk met it, from 0

    @classmethod
    def of(cls, delivery: Delivery, position: int = 0) -> ParkedMessage:
        # The broker's counters describe this look, not the message: left out.
        headers = names.without(delivery.properties.headers or {}, _COUNTERS)
        death = _death(headers)
        reason = _text(headers.get(names.REASON)) or _text(death.get("reason")).replace("_", "-")
        when = _time(death.get("time"))
        return cls(
            body=delivery.body,
            headers=headers,
            message_id=delivery.properties.message_id,
            reason=reason,
            attempts=_count(headers.get(names.PARKED_ATTEMPTS)),
            error=_text(headers.get(names.ERROR)),
            exception=_text(headers.get(names.EXCEPTION)),
            traceback=_text(headers.get(names.TRACEBACK)),
            first_failure=_time(headers.get(names.FIRST_FAILURE)) or when,
            last_failure=_time(headers.get(names.LAST_FAILURE)) or when,
            content_type=delivery.properties.content_type,
            position=position,
        )

    def _header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return None if value is None else _text(value)

    def summary(self) -> dict[str, Any]:
        """What `list --json` prints of each message."""
        return {
            "position": self.position,
            "message_id": self.message_id,
            "reason": self.reason or None,
            "exception": self.exception or None,
            "error": self.error or None,
            "attempts": self.attempts,
            "first_failure": self.first_failure,
            "last_failure": self.last_failure,
            "original_exchange": self._header(names.ORIGINAL_EXCHANGE),
            "original_routing_key": self._header(names.ORIGINAL_ROUTING_KEY),
            "size": len(self.body),
        }

    def details(self) -> dict[str, Any]:
        """What `show --json` prints: the summary, the traceback, every header and the body
        (text when it is UTF-8, else base64)."""
        try:
            body, encoding = self.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            body, encoding = base64.b64encode(self.body).decode(), "base64"
        return {
            **self.summary(),
            "content_type": self.content_type,
            "traceback": self.traceback or None,
            "headers": jsonable(self.headers),
            "body": body,
            "body_encoding": encoding,
        }


@dataclass(frozen=True, slots=True)
class Filter:
    """Which parked messages an operation is about; every given field must match."""

    reason: str | None = None
    exception: str | None = None  # the full type, or its last part(s): `ValueError`
    message_id: str | None = None

    def __post_init__(self) -> None:
        if self.reason is not None and self.reason not in REASONS:
            raise ConfigError(
                f"reason {self.reason!r} is not one a message is parked with; use one of {', '.join(REASONS)}"
            )
        for what, value in (("exception", self.exception), ("message id", self.message_id)):
            if value is not None and not value.strip():
                raise ConfigError(f"an empty {what} matches nothing; give one, or leave the filter out")

    def matches(self, message: ParkedMessage) -> bool:
        if self.reason is not None and message.reason != self.reason:
            return False
        if self.message_id is not None and message.message_id != self.message_id:
            return False
        if self.exception is not None:
            exc = message.exception
            return exc == self.exception or exc.endswith(f".{self.exception}")
        return True


@dataclass(frozen=True, slots=True)
class Group:
    """Parked messages of one reason and exception type (as ServicePulse groups failures)."""

    reason: str
    exception: str
    count: int
    first_failure: str | None
    last_failure: str | None
    error: str  # the error text of the group's latest failure

    def to_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason or None,
            "exception": self.exception or None,
            "count": self.count,
            "first_failure": self.first_failure,
            "last_failure": self.last_failure,
            "error": self.error or None,
        }


@dataclass(slots=True)
class _Tally:
    """Groups counted as the walk goes, holding no message."""

    groups: dict[tuple[str, str], list[Any]] = field(default_factory=dict)

    def add(self, m: ParkedMessage) -> None:
        entry = self.groups.setdefault((m.reason, m.exception), [0, None, None, ""])
        entry[0] += 1
        first, last = m.first_failure or m.last_failure, m.last_failure or m.first_failure
        if first is not None and (entry[1] is None or first < entry[1]):
            entry[1] = first
        if entry[2] is None or (last is not None and last >= entry[2]):
            entry[2], entry[3] = last, m.error

    def result(self) -> list[Group]:
        found = [
            Group(r, e, n, first, last, error) for (r, e), (n, first, last, error) in self.groups.items()
        ]
        found.sort(key=lambda g: (-g.count, g.reason, g.exception))
        return found


@dataclass(frozen=True, slots=True)
class Listing:
    """What `look` found: the matching messages grouped, and the first `limit` of them."""

    queue: str  # the parking queue
    total: int  # messages that matched (all of them without a filter)
    groups: list[Group]
    messages: list[ParkedMessage]

    def to_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "total": self.total,
            "groups": [g.to_json() for g in self.groups],
            "messages": [m.summary() for m in self.messages],
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a replay or purge did (or, on a dry run, would do)."""

    queue: str  # the parking queue
    found: int  # messages parked when it began
    done: int  # replayed / removed (on a dry run: that would be)
    skipped: int  # did not match the filter: still parked, in their order
    dry_run: bool
    groups: list[Group]  # of the messages done

    @property
    def left(self) -> int:
        """Parked when it began and still parked (skipped, or beyond the limit)."""
        return self.found - self.done if not self.dry_run else self.found


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
            headers = delivery.properties.headers or {}
            if seen == 0 and any(counter in headers for counter in _COUNTERS):
                rotate = True  # a quorum queue after all: it counts returns
            action = KEEP if done() else decide(ParkedMessage.of(delivery, seen))
            seen += 1
            if action == DROP:
                await channel.ack(delivery.delivery_tag)
            elif action == MOVE:
                copy = persistent_copy(
                    delivery.properties,
                    names.without(headers, names.RABBITFLOW_HEADERS, names.BROKER_HEADERS) or None,
                )
                window.append((_send(channel, delivery, queue, copy), delivery.delivery_tag))
            elif rotate:
                rotated = True
                same = clone_properties(
                    delivery.properties,
                    headers=names.without(headers, _COUNTERS) or None,
                    expiration=delivery.properties.expiration,
                    delivery_mode=delivery.properties.delivery_mode,
                )
                window.append((_send(channel, delivery, parked, same), delivery.delivery_tag))
            # else: held unacked; closing the channel returns it to its place
            while len(window) >= _WINDOW or (window and window[0][0].done()):
                await _settle(channel, window)
            if progress is not None:
                progress(seen, found)
        while window:
            await _settle(channel, window)
    finally:
        await channel.close()
        if window:  # failed: the channel's close failed the copies still in flight
            await asyncio.gather(*(future for future, _ in window), return_exceptions=True)
    return found


def _send(channel: Channel, delivery: Delivery, routing_key: str, properties: Any) -> asyncio.Future[None]:
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
    chosen, tally = filter or Filter(), _Tally()
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
) -> Outcome:
    chosen, tally = filter or Filter(), _Tally()
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
    return Outcome(names.parked_queue(queue), found, taken, skipped, dry_run, tally.result())


async def replay(
    transport: Transport,
    queue: str,
    limit: int | None = None,
    *,
    filter: Filter | None = None,
    dry_run: bool = False,
    rotate: bool = False,
    progress: Progress | None = None,
) -> Outcome:
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
) -> Outcome:
    """Delete at most `limit` of the messages parked for `queue` when it began that match
    `filter`; the others stay parked, unchanged and in their order."""
    return await _act(transport, queue, DROP, limit, filter, dry_run, rotate, progress)
