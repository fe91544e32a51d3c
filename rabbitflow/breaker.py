"""The circuit breaker: a consumer whose downstream is down stops taking messages, so an outage
parks nothing.

Closed (consuming) → open (paused: the consumer is cancelled, messages wait in the queue) when
the share of failed attempts in the last `window` seconds reaches `threshold` over at least
`min_attempts` attempts → half-open after `cooldown` seconds (one delivery at a time: a probe)
→ closed when the probe succeeds, open again when it fails. `Circuit` is pure: fed outcomes and the
loop's clock, it says the state. `Switch` carries its changes out on a consumer, one at a time.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from rabbitflow.errors import ConfigError, Reject, Retry

__all__ = ["Breaker", "BreakerState", "Circuit", "Switch"]

log = logging.getLogger("rabbitflow.breaker")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True)
class Breaker:
    """When to pause a consumer (`@app.consumer(..., breaker=Breaker())`, or `App(breaker=...)`).

    Args:
        threshold: the share of failed attempts (0 < threshold <= 1) that trips it.
        window: seconds of attempts it looks back over.
        min_attempts: fewer attempts than this in the window never trip it.
        cooldown: seconds it stays open before it lets one probe through.
        trip_on: exceptions that count as failures (like `retry_on`); others count as successes.
        ignore: exceptions that never count, even when they match `trip_on`.

    `Reject` and undecodable bodies never count: they say nothing about a downstream.
    """

    threshold: float = 0.5
    window: float = 30.0
    min_attempts: int = 20
    cooldown: float = 15.0
    trip_on: tuple[type[BaseException], ...] = (Exception,)
    ignore: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if not (isinstance(self.threshold, int | float) and 0 < self.threshold <= 1):
            raise ConfigError(f"Breaker(threshold={self.threshold!r}): expected a share in (0, 1]")
        for what in ("window", "cooldown"):
            value = getattr(self, what)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise ConfigError(f"Breaker({what}={value!r}): expected a finite number of seconds > 0")
        if (
            isinstance(self.min_attempts, bool)
            or not isinstance(self.min_attempts, int)
            or self.min_attempts < 1
        ):
            raise ConfigError(f"Breaker(min_attempts={self.min_attempts!r}): expected a whole number >= 1")
        for what in ("trip_on", "ignore"):
            value = getattr(self, what)
            items = value if isinstance(value, tuple) else (value,)
            if not all(isinstance(t, type) and issubclass(t, BaseException) for t in items):
                raise ConfigError(f"Breaker({what}={value!r}): expected exception classes")
            object.__setattr__(self, what, items)

    def counts(self, exc: BaseException | None) -> bool | None:
        """True: a failure; False: a success; None: not counted."""
        if exc is None:
            return False
        if isinstance(exc, (Reject, *self.ignore)):
            return None
        if isinstance(exc, Retry):
            return True  # the handler asked to come back later: its downstream is not ready
        return isinstance(exc, self.trip_on)


class Circuit:
    """One consumer's breaker state, fed with each attempt's outcome and the time."""

    __slots__ = ("_attempts", "_failures", "breaker", "last_trip", "opened_at", "reason", "state", "trips")

    def __init__(self, breaker: Breaker) -> None:
        self.breaker = breaker
        self.state = BreakerState.CLOSED
        self._attempts: deque[tuple[float, bool]] = deque()  # (time, failed), oldest first
        self._failures = 0
        self.opened_at: float | None = None
        self.reason = ""  # why it is open now; empty while closed
        self.last_trip = ""  # why it opened the last time, kept once it closed again
        self.trips = 0

    def record(self, now: float, exc: BaseException | None) -> BreakerState:
        """An attempt ended with `exc` (None: success); returns the state after it."""
        failed = self.breaker.counts(exc)
        if failed is None:
            return self.state
        if self.state is BreakerState.HALF_OPEN:
            if failed:
                self._open(now, exc)
            else:
                self.state = BreakerState.CLOSED
                self.opened_at = None
                self.reason = ""
                self._attempts.clear()
                self._failures = 0
            return self.state
        if self.state is BreakerState.OPEN:
            return self.state  # a delivery that was in flight when it tripped
        self._attempts.append((now, failed))
        self._failures += failed
        self._forget(now)
        count = len(self._attempts)
        if count >= self.breaker.min_attempts and self._failures >= self.breaker.threshold * count:
            self._open(now, exc)
        return self.state

    def half_open(self) -> None:
        self.state = BreakerState.HALF_OPEN

    def _open(self, now: float, exc: BaseException | None) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.trips += 1
        window = len(self._attempts)
        self.reason = (
            f"{self._failures} of {window} attempts failed in {self.breaker.window:g}s"
            if window
            else "the probe failed"
        ) + (f"; last: {type(exc).__name__}: {exc}" if exc is not None else "")
        self.last_trip = self.reason
        self._attempts.clear()
        self._failures = 0

    def _forget(self, now: float) -> None:
        attempts = self._attempts
        horizon = now - self.breaker.window
        while attempts and attempts[0][0] < horizon:
            _, failed = attempts.popleft()
            self._failures -= failed


class Switch:
    """Carries out a circuit's changes on one consumer: `pause()` has it unsubscribe,
    `consume(prefetch)` subscribe again (1 for the probe, None for its own); the consumer runs
    them one at a time."""

    def __init__(
        self,
        circuit: Circuit,
        queue: str,
        *,
        pause: Callable[[], None],
        consume: Callable[[int | None], None],
    ) -> None:
        self.circuit = circuit
        self._queue = queue
        self._pause = pause
        self._consume = consume
        self._timer: asyncio.TimerHandle | None = None
        self._quiet = False

    def attempted(self, exc: BaseException | None) -> None:
        """An attempt ended with `exc` (None: success)."""
        circuit = self.circuit
        before = circuit.state
        after = circuit.record(asyncio.get_running_loop().time(), exc)
        if after is before or self._quiet:
            return
        if after is BreakerState.OPEN:
            log.warning(
                "queue %s: breaker open (%s); pausing for %gs, messages wait in the queue",
                self._queue,
                circuit.reason,
                circuit.breaker.cooldown,
            )
            self._pause()
            if self._timer is not None:
                self._timer.cancel()
            self._timer = asyncio.get_running_loop().call_later(circuit.breaker.cooldown, self._probe)
        elif after is BreakerState.CLOSED:
            log.info("queue %s: the probe succeeded; breaker closed, consuming again", self._queue)
            self._consume(None)

    def quiet(self) -> None:
        """The consumer stops: no more changes."""
        self._quiet = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _probe(self) -> None:
        self._timer = None
        if self._quiet:
            return
        self.circuit.half_open()
        log.info("queue %s: breaker half-open; letting one message through", self._queue)
        self._consume(1)
