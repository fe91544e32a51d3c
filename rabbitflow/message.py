"""The delivery as a handler sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Message"]


@dataclass(frozen=True, slots=True)
class Message:
    """One delivery: what the broker sent, and which attempt this is (1 on the first delivery)."""

    body: bytes
    headers: Mapping[str, Any]
    attempt: int
    message_id: str | None
    routing_key: str
    exchange: str
    redelivered: bool
    content_type: str | None
    correlation_id: str | None = None
    reply_to: str | None = None
    queue: str = ""
