"""Message rates for the console's charts: a ring of per-second counts per queue and fate.

Fed either by the `settled` hook (`App(middleware=[Rates()])`: every delivery, by its fate —
handled, retried, parked) or, without it, by the `settled` counters of `app.health()` snapshots
that the console takes whenever a page is viewed (fate `settled`: the count between two
snapshots spread evenly over the seconds between them). Memory is fixed: `seconds` slots per
fate per queue.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rabbitflow.message import Message
from rabbitflow.middleware.base import Middleware, Outcome

__all__ = ["FATES", "Rates"]

# Fates in the order the charts draw them; `settled` is what health snapshots can tell.
FATES = ("handled", "retried", "parked", "settled")


class _Ring:
    """Counts per second for the last `size` seconds: slot = second % size, stamped with its second."""

    __slots__ = ("counts", "stamps")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size
        self.stamps = [-1] * size

    def add(self, second: int, n: int) -> None:
        slot = second % len(self.counts)
        if self.stamps[slot] != second:
            self.stamps[slot], self.counts[slot] = second, 0
        self.counts[slot] += n

    def at(self, second: int) -> int:
        slot = second % len(self.counts)
        return self.counts[slot] if self.stamps[slot] == second else 0


class Rates(Middleware):
    """Per-second counts of settled deliveries per queue, for the last `seconds` seconds.

    Add it to the App (`App(middleware=[Rates()])`) and the console charts every delivery by its
    fate; without it the console charts the health snapshots it takes while someone watches.
    """

    def __init__(self, seconds: int = 600) -> None:
        if seconds < 60:
            raise ValueError(f"Rates(seconds={seconds}): keep at least 60 seconds")
        self.seconds = seconds
        self._rings: dict[tuple[str, str], _Ring] = {}
        self._snapshots: dict[str, tuple[float, int]] = {}  # queue -> (time, settled) of the last one

    # -- feeding ----------------------------------------------------------------------------------

    def settled(self, message: Message, outcome: Outcome) -> None:
        self.count(message.queue, outcome.fate.value)

    def count(self, queue: str, fate: str, n: int = 1, now: float | None = None) -> None:
        second = int(time.time() if now is None else now)
        ring = self._rings.get((queue, fate))
        if ring is None:
            ring = self._rings[queue, fate] = _Ring(self.seconds)
        ring.add(second, n)

    def snapshot(self, health: Mapping[str, Any], now: float | None = None) -> None:
        """Take the `settled` counters of an `app.health()` report; the count since the last
        snapshot is spread over the seconds between them (for a Rates that is not a middleware
        of the app: it would count each delivery twice)."""
        now = time.time() if now is None else now
        for consumer in health.get("consumers", ()):
            queue, settled = str(consumer.get("queue")), int(consumer.get("settled") or 0)
            last = self._snapshots.get(queue)
            self._snapshots[queue] = (now, settled)
            if last is None:
                continue
            then, before = last
            # A new session starts its counter at 0: everything it counted is new.
            delta = settled - before if settled >= before else settled
            first, end = int(then) + 1, int(now)
            span = max(1, min(end - first + 1, self.seconds))
            if delta <= 0:
                continue
            share, extra = divmod(delta, span)
            for i in range(span):
                n = share + (1 if i < extra else 0)
                if n:
                    self.count(queue, "settled", n, now=end - span + 1 + i)

    # -- reading ----------------------------------------------------------------------------------

    def queues(self) -> list[str]:
        return sorted({queue for queue, _ in self._rings})

    def series(
        self,
        queue: str | None = None,
        *,
        minutes: int = 5,
        step: int = 10,
        now: float | None = None,
    ) -> dict[str, list[float]]:
        """Messages per second, averaged over `step`-second buckets, for the last `minutes`
        (oldest first), per fate that has any count; `queue=None` sums every queue. The bucket
        still filling (the current second) is left out."""
        end = int(time.time() if now is None else now) - 1
        buckets = max(1, min(minutes * 60, self.seconds) // step)
        start = end - buckets * step + 1
        found: dict[str, list[float]] = {}
        for (name, fate), ring in self._rings.items():
            if queue is not None and name != queue:
                continue
            values = found.setdefault(fate, [0.0] * buckets)
            for b in range(buckets):
                first = start + b * step
                values[b] += sum(ring.at(s) for s in range(first, first + step)) / step
        return {fate: found[fate] for fate in FATES if fate in found and any(found[fate])}
