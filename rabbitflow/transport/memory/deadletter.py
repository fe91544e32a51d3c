"""The `x-death` bookkeeping and cycle check of RabbitMQ 3.10's rabbit_dead_letter module."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

__all__ = ["BROKER_DEATH_HEADERS", "is_cycle", "record_death"]

BROKER_DEATH_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-reason",
        "x-first-death-queue",
        "x-first-death-exchange",
        "x-last-death-reason",
        "x-last-death-queue",
        "x-last-death-exchange",
    }
)


def record_death(
    headers: Mapping[str, Any] | None,
    *,
    last_death: bool = False,
    queue: str,
    reason: str,
    exchange: str,
    routing_keys: Sequence[str],
    time: datetime,
    expiration: str | None,
) -> dict[str, Any]:
    """New headers with this death recorded in `x-death`, newest first, one entry per (queue, reason)."""
    out = dict(headers or {})
    info: dict[str, Any] = {
        "count": 1,
        "reason": reason,
        "queue": queue,
        "time": time,
        "exchange": exchange,
        "routing-keys": list(routing_keys),
    }
    if expiration is not None:
        info["original-expiration"] = expiration
    deaths = out.get("x-death")
    if "x-death" not in out:
        # The first death also sets x-first-death-*, which later deaths never change.
        out["x-first-death-reason"] = reason
        out["x-first-death-queue"] = queue
        out["x-first-death-exchange"] = exchange
        out["x-death"] = [info]
    elif isinstance(deaths, list):
        # Up to 3.12 the broker keeps counting on whatever x-death the message carries, even
        # one a client republished; the repeated entry keeps its first time/exchange/keys.
        grouped = _group(deaths)
        match = next(
            (d for d in grouped if d.get("queue") == queue and d.get("reason") == reason),
            None,
        )
        if match is None:
            entry, others = info, grouped
        else:
            entry = dict(sorted({**match, "count": _count(match) + 1}.items()))
            others = [d for d in grouped if d is not match]
        out["x-death"] = [entry, *others]
    else:
        out["x-death"] = [info]  # not an array: RabbitMQ resets it (rabbitmq-server#767)
    if last_death:
        # 3.13+ also name the newest death (https://github.com/rabbitmq/rabbitmq-website/pull/1913).
        out["x-last-death-reason"] = reason
        out["x-last-death-queue"] = queue
        out["x-last-death-exchange"] = exchange
    return out


def _count(death: Mapping[str, Any]) -> int:
    count = death.get("count", 0)
    return count if isinstance(count, int) else 0


def _group(deaths: list[Any]) -> list[dict[str, Any]]:
    """Merge duplicate (queue, reason) tables as group_by_queue_and_reason/1 does."""
    tables = [d for d in deaths if isinstance(d, dict)]
    seen: dict[tuple[Any, Any], dict[str, Any]] = {}
    for table in tables:
        key = (table.get("queue"), table.get("reason"))
        if key not in seen:
            copies = sum(1 for t in tables if (t.get("queue"), t.get("reason")) == key)
            seen[key] = table if "count" in table else {"count": copies, **table}
    return list(seen.values())


def is_cycle(queue: str, deaths: Sequence[Any]) -> bool:
    """Whether dead-lettering into `queue` closes a loop with no `rejected` death in it."""
    for index, death in enumerate(deaths):
        if isinstance(death, dict) and death.get("queue") == queue:
            return all(isinstance(d, dict) and d.get("reason") != "rejected" for d in deaths[: index + 1])
    return False
