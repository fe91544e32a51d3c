"""Coalesced acks: one `basic.ack(multiple=True)` for a run of consecutive settled deliveries."""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from .transport.base import Channel, TransportError

__all__ = ["Acker"]

log = logging.getLogger("rabbitflow.acks")


class Acker:
    """Tracks a channel's delivery tags and acks each settled prefix with one `multiple=True` ack.

    A tag is settled when its handler returned (or its retry / parked copy was confirmed), or
    when it was rejected on its own. The ack goes out once a quarter of the prefetch window is
    settled, or `channel.ack_linger` seconds after the first settled tag, whichever comes first: the broker
    never runs out of window, and an idle consumer's acks are not held back. `multiple=True`
    only acks tags still outstanding, so a rejected tag inside the prefix is not touched again.
    No tag is acked before it was settled: at-least-once holds.
    """

    __slots__ = (
        "_batch",
        "_channel",
        "_done",
        "_linger",
        "_loop",
        "_pending",
        "_sending",
        "_settled",
        "_timer",
        "_top",
    )

    def __init__(self, channel: Channel, *, prefetch: int) -> None:
        self._channel = channel
        self._pending: deque[int] = deque()
        self._done: dict[int, bool] = {}
        self._top = 0  # the highest tag of the settled prefix, not acked yet
        self._settled = 0  # tags settled since the last ack
        self._batch = max(1, prefetch // 4)
        self._linger = channel.ack_linger
        self._timer: asyncio.TimerHandle | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    def track(self, tag: int) -> None:
        self._pending.append(tag)

    def settle(self, tag: int, *, ack: bool = True) -> None:
        """`tag` is done; `ack=False` when it was already rejected on its own."""
        pending = self._pending
        if not pending or pending[0] != tag:
            self._done[tag] = ack
            return
        outstanding = len(pending)
        pending.popleft()
        top = tag if ack else 0
        done = self._done
        while pending and pending[0] in done:
            later = pending.popleft()
            if done.pop(later):
                top = later
        if not top:
            return  # never end a multiple-ack on a rejected tag: RabbitMQ would call it unknown
        self._top = top
        self._settled += outstanding - len(pending)  # tags, not calls: one call may release a run
        if self._settled >= self._batch:
            self._flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self._linger, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        top, self._top, self._settled = self._top, 0, 0
        if top and self._channel.is_open:
            task = self._loop.create_task(self._send(top))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, top: int, *, multiple: bool = True) -> None:
        try:
            await self._channel.ack(top, multiple=multiple)
        except TransportError as exc:
            # The channel is gone; the broker redelivers whatever was not acked.
            log.debug("ack of delivery tags <= %d not sent: %s", top, exc)

    async def flush(self) -> None:
        """Send every settled ack now and wait until it is written. Settled tags behind an
        unsettled one (a handler cancelled at shutdown) are acked one by one, so only the
        unsettled deliveries return to the queue."""
        self._flush()
        stragglers = sorted(tag for tag, ack in self._done.items() if ack)
        self._done.clear()
        for tag in stragglers:
            task = self._loop.create_task(self._send(tag, multiple=False))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
