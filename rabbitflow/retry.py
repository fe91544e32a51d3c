"""Retry policies and the pure decision of what happens to a failed delivery."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from rabbitflow import names
from rabbitflow.errors import TTL_LIMIT, ConfigError, Reject, Retry

__all__ = ["Action", "Decision", "RetryPolicy", "decide"]


class Action(StrEnum):
    ACK = "ack"
    RETRY = "retry"
    PARK = "park"


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay: float = 0.0
    reason: str = ""  # a value of x-rf-reason when parking


ACK = Decision(Action.ACK)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`retries` retries after the first attempt; attempt k (k >= 1) waits `delays[k-1]`."""

    retries: int
    delays: tuple[float, ...]
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    dont_retry: tuple[type[BaseException], ...] = ()

    @classmethod
    def build(
        cls,
        retries: object,
        delay: object,
        retry_on: object = (Exception,),
        dont_retry: object = (),
    ) -> RetryPolicy:
        """Validate user input into a policy; every problem is a ConfigError saying what to change."""
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries={retries!r}: expected a whole number >= 0")
        delays = _delays(delay)
        return cls(
            retries,
            delays,
            _exception_types("retry_on", retry_on),
            _exception_types("dont_retry", dont_retry),
        )

    def delay_for(self, attempt: int) -> float:
        """The wait before attempt `attempt + 1`, after attempt `attempt` failed."""
        return self.delays[min(attempt, len(self.delays)) - 1]

    @property
    def distinct_delays(self) -> tuple[float, ...]:
        """The delays that need a queue, in ladder order; only the first `retries` rungs are used."""
        used = [self.delay_for(k) for k in range(1, self.retries + 1)]
        return tuple(dict.fromkeys(used))


def _delays(delay: object) -> tuple[float, ...]:
    values: Sequence[object]
    if isinstance(delay, int | float) and not isinstance(delay, bool):
        values = (delay,)
    elif isinstance(delay, Sequence) and not isinstance(delay, str | bytes) and delay:
        values = delay
    else:
        raise ConfigError(
            f"delay={delay!r}: expected seconds as a number (delay=60) or a non-empty ladder "
            "(delay=[1, 10, 60])"
        )
    out: list[float] = []
    for value in values:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
        ):
            raise ConfigError(f"delay={delay!r}: every delay must be a finite number of seconds >= 0")
        if value > names.MAX_DELAY:  # the retry queue's x-message-ttl must fit
            raise ConfigError(f"delay={delay!r}: {value}s is longer than {TTL_LIMIT}")
        if value * 1000 != round(value * 1000):
            raise ConfigError(f"delay={delay!r}: delays have millisecond resolution; round {value}")
        out.append(float(value))
    return tuple(out)


def _exception_types(name: str, value: object) -> tuple[type[BaseException], ...]:
    items = value if isinstance(value, tuple | list) else (value,)
    for item in items:
        if not (isinstance(item, type) and issubclass(item, BaseException)):
            raise ConfigError(f"{name}={value!r}: expected an exception class or a tuple of them")
    return tuple(items)


def decide(policy: RetryPolicy, attempt: int, exc: BaseException | None) -> Decision:
    """What to do with a delivery whose `attempt`-th handler call ended with `exc` (None = success)."""
    if exc is None:
        return ACK
    if isinstance(exc, Reject):
        return Decision(Action.PARK, reason="rejected")
    if isinstance(exc, Retry):
        if attempt > policy.retries:
            return Decision(Action.PARK, reason="exhausted")
        delay = policy.delay_for(attempt) if exc.delay is None else exc.delay
        return Decision(Action.RETRY, delay=delay)
    if isinstance(exc, policy.dont_retry) or not _retried(policy, exc):
        return Decision(Action.PARK, reason="not-retryable")
    if attempt > policy.retries:
        return Decision(Action.PARK, reason="exhausted")
    return Decision(Action.RETRY, delay=policy.delay_for(attempt))


def _retried(policy: RetryPolicy, exc: BaseException) -> bool:
    if isinstance(exc, policy.retry_on):
        return True
    # A BaseException that is no Exception (a cancelled inner task's CancelledError, GeneratorExit)
    # is retried like one whenever Exception is: the default policy retries it.
    return not isinstance(exc, Exception) and any(issubclass(Exception, t) for t in policy.retry_on)
