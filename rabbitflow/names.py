"""The names rabbitflow gives to broker objects and headers, in one place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "BROKER_HEADERS",
    "DELIVERY_LIMIT",
    "PARKED_ATTEMPTS",
    "PARK_HEADERS",
    "RABBITFLOW_HEADERS",
    "RETRY_ATTEMPT",
    "dead_letter_exchange",
    "delay_label",
    "parked_queue",
    "retry_prefix",
    "retry_queue",
    "without",
]

# rabbitflow's own attempt counter: the attempt a retried copy comes back as. x-death is no safe
# counter: 3.13+/4.x never interpret a client-set x-death on republished copies.
RETRY_ATTEMPT = "x-rf-attempt"
# Quorum backstop: a message delivered this many times without being settled (a handler that
# kills its worker, say) is dead-lettered by the broker to the parking queue.
DELIVERY_LIMIT = 20

REASON = "x-rf-reason"
PARKED_ATTEMPTS = "x-rf-attempts"  # on a parked message: how many attempts it had
EXCEPTION = "x-rf-exception"
ERROR = "x-rf-error"
TRACEBACK = "x-rf-traceback"
QUEUE = "x-rf-queue"
ORIGINAL_EXCHANGE = "x-rf-original-exchange"
ORIGINAL_ROUTING_KEY = "x-rf-original-routing-key"
FIRST_FAILURE = "x-rf-first-failure"
LAST_FAILURE = "x-rf-last-failure"

PARK_HEADERS = (
    REASON,
    PARKED_ATTEMPTS,
    EXCEPTION,
    ERROR,
    TRACEBACK,
    QUEUE,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    FIRST_FAILURE,
    LAST_FAILURE,
)

# What the broker writes into headers; stripped from every copy rabbitflow republishes, so the
# broker starts a fresh death history (and a quorum queue a fresh delivery count).
BROKER_HEADERS = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)
# rabbitflow's own headers, dropped when a parked message is replayed as new.
RABBITFLOW_HEADERS = (RETRY_ATTEMPT, *PARK_HEADERS)


def without(headers: Mapping[str, Any], *groups: tuple[str, ...]) -> dict[str, Any]:
    """A copy of `headers` without the keys in `groups`."""
    copy = dict(headers)
    for group in groups:
        for key in group:
            copy.pop(key, None)
    return copy


def dead_letter_exchange(service: str) -> str:
    """The service's dead-letter / retry exchange."""
    return f"{service}.dlx"


def delay_label(seconds: float) -> str:
    """A delay as it appears in a queue name: whole seconds as `60s`, else milliseconds `500ms`."""
    ms = round(seconds * 1000)
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def retry_prefix(queue: str) -> str:
    """What the names of all of `queue`'s retry queues start with."""
    return f"{queue}.retry."


def retry_queue(queue: str, seconds: float) -> str:
    """The TTL queue holding `queue`'s messages for `seconds` before they return to it."""
    return f"{retry_prefix(queue)}{delay_label(seconds)}"


def parked_queue(queue: str) -> str:
    """Where `queue`'s messages go after their last attempt."""
    return f"{queue}.parked"
