"""The names rabbitflow gives to broker objects and headers, in one place."""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from typing import Any

__all__ = [
    "BROKER_HEADERS",
    "DELIVERY_LIMIT",
    "MAX_DELAY",
    "MAX_NAME",
    "MAX_QUEUE",
    "MAX_SERVICE",
    "MAX_TTL_MS",
    "NAME_CHARACTERS",
    "PARKED_ATTEMPTS",
    "PARKED_DELIVERY_LIMIT",
    "PARK_HEADERS",
    "RABBITFLOW_HEADERS",
    "RETRY_ATTEMPT",
    "dead_letter_exchange",
    "delay_label",
    "derived_from",
    "members_exchange",
    "parked_queue",
    "partition_of",
    "partition_queue",
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
# A parking queue's: far beyond any number of operator looks (see topology/compiler.py).
PARKED_DELIVERY_LIMIT = 1_000_000

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
    "x-acquired-count",  # 4.3: every hand-out of a quorum queue's message
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


def derived_from(name: str) -> list[str]:
    """The queues that `name` is a derived name of: `Q` for `Q.parked` and for any `Q.retry.*`
    (a retry queue planned, or made later for a handler's `Retry(delay=...)`)."""
    bases = [name[: -len(".parked")]] if name.endswith(".parked") else []
    start = name.find(".retry.")
    while start != -1:
        bases.append(name[:start])
        start = name.find(".retry.", start + 1)
    return bases


def partition_queue(queue: str, index: int) -> str:
    """Partition `index` of a partitioned consumer of `queue`: `Q.p3`."""
    return f"{queue}.p{index}"


def members_exchange(queue: str) -> str:
    """The fanout exchange the replicas of a partitioned consumer of `queue` send heartbeats on."""
    return f"{queue}.members"


def partition_of(key: str | bytes | int, partitions: int) -> int:
    """The partition of `key` among `partitions`: CRC-32 (zlib's, ISO-HDLC) of the key's UTF-8
    bytes (an int: of its decimal digits), modulo the number of partitions. A producer in any
    language routes to a partitioned consumer with this rule and the partition as routing key."""
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    data = key.encode() if isinstance(key, str) else key
    if not isinstance(data, bytes):
        raise TypeError(f"a partition key is a str, bytes or int, not {type(key).__name__}")
    return zlib.crc32(data) % partitions


# What AMQP and RabbitMQ can take. Queue, exchange and routing key names are AMQP short strings:
# at most 255 bytes of UTF-8.
MAX_NAME = 255
# pamqp (the frame library under aiormq) refuses a queue or exchange name with any other character.
NAME_CHARACTERS = re.compile(r"[a-zA-Z0-9\-_.:@#,/+ ]*")
# RabbitMQ's largest x-message-ttl: an Erlang timer of 2^32-1 ms (about 49.7 days).
MAX_TTL_MS = 2**32 - 1
MAX_DELAY = MAX_TTL_MS / 1000
# A queue's longest derived name is its retry queue for the longest delay, `Q.retry.4294967295ms`:
# a queue name leaves room for it, so any `Retry(delay=...)` a handler raises has a queue.
MAX_QUEUE = MAX_NAME - len(retry_queue("", MAX_DELAY).encode())
MAX_SERVICE = MAX_NAME - len(dead_letter_exchange("").encode())


# Messages published because of another (a handler's result, a reply, a publish inside a handler)
# say where they came from; their correlation id is the input's (its correlation id, else its id).
ORIGIN_QUEUE = "x-rf-origin-queue"
ORIGIN_MESSAGE_ID = "x-rf-origin-message-id"
# A request's deadline (Unix time in ms): a consumer drops a request whose caller has given up.
DEADLINE = "x-rf-deadline"
# On a reply: the request failed for good (its value is the park reason); x-rf-error and
# x-rf-exception say why. `app.request` raises RequestFailed for it.
ERROR_REPLY = "x-rf-error-reply"
