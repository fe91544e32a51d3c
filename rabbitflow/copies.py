"""What a retry or parked copy carries: the producer's message, plus rabbitflow's headers.

Pure functions of the delivery and the failure; `consumer.Consumer` publishes what they return.
"""

from __future__ import annotations

import struct
import time
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from . import names
from .transport.base import Delivery
from .transport.tables import entries, header_table

__all__ = [
    "attempt",
    "delivery_count",
    "describe",
    "exact_headers",
    "lean",
    "park_headers",
    "retry_headers",
]

_MAX_ERROR = 1000
_MAX_TRACEBACK = 4000


_second: tuple[int, str] = (0, "")


def _now() -> str:
    """ISO 8601 UTC with milliseconds; the formatting of the current second is reused."""
    global _second
    now = time.time()
    whole = int(now)
    if _second[0] != whole:
        _second = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_second[1]}.{int((now - whole) * 1000):03d}Z"


def attempt(delivery: Delivery, headers: Mapping[str, Any], queue: str, retries: int) -> int:
    """Which attempt `delivery` of `queue` is. rabbitflow's header counts only on a copy that came
    back through one of this queue's own retry queues; a forged header on any other message is
    ignored, and no header makes it more than the last attempt."""
    if not _came_back(delivery, headers, queue):
        return 1
    value = headers.get(names.RETRY_ATTEMPT)
    if isinstance(value, int) and not isinstance(value, bool) and value > 1:
        return min(value, retries + 1)
    return 1


def _came_back(delivery: Delivery, headers: Mapping[str, Any], queue: str) -> bool:
    if delivery.exchange != "" or delivery.routing_key != queue:
        return False
    # The broker's own newest death record: 3.13+ writes x-last-death-*, older ones only x-death.
    last_queue = headers.get("x-last-death-queue")
    if last_queue is None:
        deaths = headers.get("x-death")
        if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
            return False
        last_queue, reason = deaths[0].get("queue"), deaths[0].get("reason")
    else:
        reason = headers.get("x-last-death-reason")
    return (
        reason == "expired"
        and isinstance(last_queue, str)
        and last_queue.startswith(names.retry_prefix(queue))
    )


def retry_headers(delivery: Delivery, attempt: int) -> dict[str, Any]:
    """The headers of the copy that brings `delivery` back as attempt `attempt + 1`."""
    copy = _copy_headers(delivery, attempt, _now(), drop=())
    copy[names.RETRY_ATTEMPT] = attempt + 1
    return copy


def park_headers(
    delivery: Delivery, reason: str, attempt: int, queue: str, exc: BaseException | None
) -> dict[str, Any]:
    """The headers of the parked copy of `delivery`, with why and after how many attempts."""
    now = _now()
    copy = _copy_headers(delivery, attempt, now, drop=names.RABBITFLOW_HEADERS)
    copy[names.REASON] = reason
    copy[names.PARKED_ATTEMPTS] = attempt
    copy[names.QUEUE] = queue
    copy[names.LAST_FAILURE] = now
    if exc is not None:
        copy[names.EXCEPTION] = f"{type(exc).__module__}.{type(exc).__qualname__}"
        copy[names.ERROR] = describe(exc)[:_MAX_ERROR]
        tb = "".join(traceback.format_exception(exc))
        copy[names.TRACEBACK] = tb[-_MAX_TRACEBACK:]
    elif reason == "delivery-limit":
        count = delivery_count(delivery.properties.headers or {})
        copy[names.ERROR] = (
            f"delivered {count + 1} times without being settled (a handler that crashes its worker?)"
        )
    return copy


def _copy_headers(delivery: Delivery, attempt: int, now: str, drop: tuple[str, ...]) -> dict[str, Any]:
    """The headers of a copy: the delivery's without the broker's (and `drop`), plus where the
    message was first published and when it first failed. A later attempt is a copy that came
    back through a retry queue and carries both already."""
    headers = delivery.properties.headers or {}
    copy = exact_headers(delivery, names.without(headers, names.BROKER_HEADERS, drop))
    if attempt > 1:
        copy[names.ORIGINAL_EXCHANGE] = str(headers.get(names.ORIGINAL_EXCHANGE, ""))
        copy[names.ORIGINAL_ROUTING_KEY] = str(headers.get(names.ORIGINAL_ROUTING_KEY, delivery.routing_key))
        copy[names.FIRST_FAILURE] = headers.get(names.FIRST_FAILURE) or now
    else:
        copy[names.ORIGINAL_EXCHANGE] = delivery.exchange
        copy[names.ORIGINAL_ROUTING_KEY] = delivery.routing_key
        copy[names.FIRST_FAILURE] = now
    return copy


def exact_headers(delivery: Delivery, headers: dict[str, Any]) -> dict[str, Any]:
    """`headers` (some of the delivery's) with each value as the bytes it arrived in, type octet
    included, where the broker kept them: re-encoding a decoded value would pick its type by
    range (an int32 5 becomes an int8, a double 0.1 a float, a millisecond timestamp seconds)."""
    if delivery.raw_header is None or not headers:
        return headers
    try:
        table = header_table(delivery.raw_header)
        arrived = entries(table) if table is not None else {}
    except (ValueError, IndexError, struct.error):  # not what the decoder read: keep its values
        return headers
    return {key: arrived.get(key, value) for key, value in headers.items()}


def describe(exc: BaseException) -> str:
    """`str(exc)`, or what can be said of an exception whose `__str__` itself fails."""
    try:
        return str(exc)
    except Exception as failure:
        return f"<{type(exc).__name__}: str() failed with {type(failure).__name__}>"


def delivery_count(headers: Mapping[str, Any]) -> int:
    value = headers.get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


def lean(headers: Mapping[str, Any]) -> dict[str, Any] | None:
    """A copy's headers without rabbitflow's long texts (traceback, error), for a copy that does
    not fit the broker's frame; None when it has none to drop."""
    if names.TRACEBACK not in headers and names.ERROR not in headers:
        return None
    return names.without(headers, (names.TRACEBACK, names.ERROR))
