"""Settlement: how each delivery of a channel ends, and acks that never wait for a neighbour."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence

from rabbitflow.errors import TransportError
from rabbitflow.transport.base import Channel

__all__ = ["Settlement"]

log = logging.getLogger("rabbitflow.runtime.settlement")


class Settlement:
    """The deliveries a consumer holds on one channel, and the end of each.

    Invariant: every tag `received` ends exactly once — `ack` (its handler returned, or its retry
    or parked copy was confirmed), `reject` (to the queue's dead-letter route, its parking queue)
    or `requeue`; a second end of the same tag is ignored. No tag is acked before it ended, and an
    ended tag never waits for another:

    - acks are coalesced: one `basic.ack(multiple=True)` covers the acked tags below the oldest
      tag still held (a multiple ack never ends on a rejected tag: RabbitMQ would call it unknown);
    - acked tags above a held one (a slow handler's) go out in the same flush, each on its own,
      in one write;
    - a flush happens once a quarter of the prefetch window was acked, or `channel.ack_linger`
      seconds after the first ack since the last flush, whichever comes first.

    Rejects and requeues are handed to the channel at once, acks at the flush; one drainer sends
    them all in the order they were handed over, so a single ack is never overtaken by a multiple
    one covering it (a 406 "unknown delivery tag" would close the channel). Memory is bounded by
    the prefetch window, however long one handler holds its delivery.

    Hot path: `received` and `ack` run once per message (benchmarks: consume, mixed).
    """

    __slots__ = (
        "_batch",
        "_channel",
        "_draining",
        "_held",
        "_linger",
        "_loop",
        "_outbox",
        "_ready",
        "_timer",
        "last_settled",
        "settled",
    )

    def __init__(self, channel: Channel, *, prefetch: int) -> None:
        self._channel = channel
        self._held: dict[int, float] = {}  # tag -> loop time received; insertion = tag order
        self._ready: list[int] = []  # acked, not sent yet
        self._batch = max(1, prefetch // 4)
        self._linger = channel.ack_linger
        self._timer: asyncio.TimerHandle | None = None
        self._outbox: deque[tuple[int, Sequence[int], int, bool]] = deque()  # see `_send`
        self._draining: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self.last_settled: float | None = None  # loop time of the last end
        self.settled = 0

    def received(self, tag: int) -> None:
        self._held[tag] = self._loop.time()

    # -- the ends of a delivery ------------------------------------------------------------------

    def ack(self, tag: int) -> None:
        if self._held.pop(tag, None) is None:
            return
        self.settled += 1
        self.last_settled = self._loop.time()
        ready = self._ready
        ready.append(tag)
        if len(ready) >= self._batch:
            self._flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(self._linger, self._flush)

    def reject(self, tag: int) -> None:
        """To the queue's dead-letter route: its parking queue."""
        self._end(tag, requeue=False)

    def requeue(self, tag: int) -> None:
        """Back to the queue, for this or another consumer (a shutdown, a lost session)."""
        self._end(tag, requeue=True)

    def _end(self, tag: int, *, requeue: bool) -> None:
        if self._held.pop(tag, None) is None:
            return
        self.settled += 1
        self.last_settled = self._loop.time()
        if self._channel.is_open:
            self._send(reject=tag, requeue=requeue)

    # -- what health reads -----------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Deliveries received and not ended yet."""
        return len(self._held)

    def oldest(self) -> float | None:
        """Loop time the oldest delivery still held was received."""
        for received in self._held.values():
            return received
        return None

    # -- sending -------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        ready, self._ready = self._ready, []
        if not ready or not self._channel.is_open:
            return
        top = max(ready)
        low = next(iter(self._held), None)
        if low is None or low > top:
            self._send(top=top)
        else:
            below = [tag for tag in ready if tag < low]
            self._send(top=max(below) if below else 0, each=[tag for tag in ready if tag > low])

    def _send(
        self, *, top: int = 0, each: Sequence[int] = (), reject: int = 0, requeue: bool = False
    ) -> None:
        """Queue one settlement for the drainer: a multiple ack up to `top`, single acks of `each`,
        or a reject of `reject`."""
        self._outbox.append((top, each, reject, requeue))
        if self._draining is None:
            self._draining = self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        channel = self._channel
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            while self._outbox:
                top, each, reject, requeue = self._outbox.popleft()
                if debug:
                    log.debug(
                        "channel %s: %s",
                        channel,
                        f"reject {reject} (requeue={requeue})"
                        if reject
                        else f"ack up to {top} (multiple), {len(each)} single ack(s)",
                    )
                try:
                    if reject:
                        await channel.reject(reject, requeue=requeue)
                    if top:
                        await channel.ack(top, multiple=True)
                    if each:
                        await channel.ack_each(each)
                except TransportError as exc:
                    # The channel is gone; the broker redelivers whatever was not acked.
                    log.debug("settlement not sent: %s", exc)
                    self._outbox.clear()
        finally:
            self._draining = None

    async def flush(self) -> None:
        """Send every ack now and wait until everything decided was handed to the channel."""
        self._flush()
        while self._draining is not None:
            await asyncio.shield(self._draining)
