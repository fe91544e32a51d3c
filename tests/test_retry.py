"""The retry policy and the pure decision: no broker needed."""

from __future__ import annotations

import pytest

from rabbitflow import ConfigError, Reject, Retry, RetryPolicy
from rabbitflow.retry import Action, decide


class Permanent(Exception):
    pass


def policy(retries: int = 3, delay: object = 60, **kw: object) -> RetryPolicy:
    return RetryPolicy.build(retries, delay, **kw)  # type: ignore[arg-type]


def test_success_is_acked() -> None:
    assert decide(policy(), 1, None).action is Action.ACK


def test_fixed_delay_retries_then_parks_as_exhausted() -> None:
    p = policy(retries=3, delay=60)
    decisions = [decide(p, attempt, RuntimeError("x")) for attempt in (1, 2, 3, 4)]
    assert [(d.action, d.delay) for d in decisions[:3]] == [(Action.RETRY, 60.0)] * 3
    assert (decisions[3].action, decisions[3].reason) == (Action.PARK, "exhausted")


def test_ladder_delays_and_last_value_repeats() -> None:
    p = policy(retries=4, delay=[0.5, 2])
    assert [decide(p, a, ValueError()).delay for a in (1, 2, 3, 4)] == [0.5, 2.0, 2.0, 2.0]
    assert p.distinct_delays == (0.5, 2.0)


def test_unused_ladder_rungs_need_no_queue() -> None:
    assert policy(retries=1, delay=[1, 10, 60]).distinct_delays == (1.0,)
    assert policy(retries=0, delay=[1, 10]).distinct_delays == ()


def test_zero_retries_parks_on_first_failure() -> None:
    d = decide(policy(retries=0), 1, RuntimeError())
    assert (d.action, d.reason) == (Action.PARK, "exhausted")


def test_reject_parks_at_once() -> None:
    d = decide(policy(), 1, Reject("bad order"))
    assert (d.action, d.reason) == (Action.PARK, "rejected")


def test_retry_signal_uses_its_own_delay_and_counts_as_an_attempt() -> None:
    p = policy(retries=2, delay=60)
    assert decide(p, 1, Retry(delay=5)).delay == 5
    assert decide(p, 2, Retry()).delay == 60
    d = decide(p, 3, Retry(delay=5))
    assert (d.action, d.reason) == (Action.PARK, "exhausted")


def test_retry_on_and_dont_retry() -> None:
    p = policy(retry_on=(ConnectionError, TimeoutError), dont_retry=ConnectionRefusedError)
    assert decide(p, 1, ConnectionResetError()).action is Action.RETRY
    assert decide(p, 1, TimeoutError()).action is Action.RETRY
    refused = decide(p, 1, ConnectionRefusedError())
    assert (refused.action, refused.reason) == (Action.PARK, "not-retryable")
    other = decide(p, 1, KeyError("x"))
    assert (other.action, other.reason) == (Action.PARK, "not-retryable")


@pytest.mark.parametrize(
    ("retries", "delay", "message"),
    [
        (-1, 1, "retries=-1"),
        (True, 1, "retries=True"),
        (2.5, 1, "retries=2.5"),
        (3, -1, "finite number of seconds >= 0"),
        (3, float("inf"), "finite number"),
        (3, [], "non-empty ladder"),
        (3, "60", "expected seconds"),
        (3, 0.0001, "millisecond resolution"),
    ],
)
def test_bad_policies_say_what_to_change(retries: object, delay: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        policy(retries, delay)  # type: ignore[arg-type]


def test_bad_exception_filters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="retry_on"):
        policy(retry_on="ValueError")
    with pytest.raises(ConfigError, match="dont_retry"):
        policy(dont_retry=(ValueError, 3))


def test_retry_signal_validates_its_delay() -> None:
    with pytest.raises(ConfigError):
        Retry(delay=-2)
