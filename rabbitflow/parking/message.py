"""What a parked message says, as an operator reads it: its failure, the filters that pick it,
and the groups it falls in. Pure: `parking.py` reads the queue and hands each message here."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rabbitflow import names
from rabbitflow.errors import ConfigError
from rabbitflow.transport.base import Delivery

__all__ = [
    "COUNTERS",
    "REASONS",
    "Filter",
    "Group",
    "GroupCounter",
    "Listing",
    "ParkedMessage",
    "WalkResult",
    "jsonable",
]

# x-rf-reason values rabbitflow writes, and the broker's own dead-letter reasons (a message the
# broker moved to the parking queue carries no x-rf-reason; its x-death says why).
REASONS = (
    "exhausted",
    "rejected",
    "decode-error",
    "delivery-limit",
    "not-retryable",
    "worker-crash",
    "expired",
    "maxlen",
)
# Headers a quorum queue writes on delivery: a kept copy starts without them, as a fresh message.
COUNTERS = ("x-delivery-count", "x-acquired-count")


def _text(value: Any) -> str:
    """A header value as text: bytes as UTF-8 where they are, hex-escaped (`\\xff`) where not;
    anything else as `str` gives it. Never raises: a value rabbitflow cannot interpret is shown."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    if value is None:
        return ""
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _count(value: Any) -> int:
    """A header that should be a count; 0 when it is missing or not a whole number."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    try:
        return int(_text(value).strip())
    except ValueError:
        return 0


def _time(value: Any) -> str | None:
    """ISO 8601 UTC with milliseconds, as copies.py writes x-rf-*-failure. A number is epoch
    seconds, or milliseconds past 2**32 (as AMQP timestamps are read); one out of any date's range
    (or anything else that is no date) is shown as the text it is."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = value if abs(value) <= 0xFFFFFFFF else value / 1000
            value = datetime.fromtimestamp(seconds, UTC)
        except (ValueError, OverflowError, OSError):
            return _text(value)
    if isinstance(value, datetime):
        try:
            moment = value if value.tzinfo else value.replace(tzinfo=UTC)
            moment = moment.astimezone(UTC)
            return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
        except (ValueError, OverflowError):
            return value.isoformat()
    text = _text(value)
    return text or None


# The x-rf-* headers that say how the message failed (shown as such, not as its origin).
_FAILURE = frozenset(
    (
        names.REASON,
        names.PARKED_ATTEMPTS,
        names.EXCEPTION,
        names.ERROR,
        names.TRACEBACK,
        names.FIRST_FAILURE,
        names.LAST_FAILURE,
        names.RETRY_ATTEMPT,
    )
)


def _death(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The broker's newest death record, when the broker itself dead-lettered the message."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return deaths[0]
    return {}


def jsonable(value: Any) -> Any:
    """A header value as JSON can hold it (AMQP tables hold timestamps, bytes, decimals)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return _time(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return _text(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    """A parked message as an operator reads it; texts are "" where the headers say nothing."""

    body: bytes
    headers: dict[str, Any]
    message_id: str | None
    reason: str
    attempts: int  # 0 when not recorded (or not a number)
    error: str
    exception: str = ""  # the exception's type, `module.QualName`
    traceback: str = ""
    first_failure: str | None = None
    last_failure: str | None = None
    content_type: str | None = None
    position: int = 0  # its place in the parking queue when the walk met it, from 0
    correlation_id: str | None = None
    undecodable: str | None = None  # what of its properties the client could not decode

    @classmethod
    def of(cls, delivery: Delivery, position: int = 0) -> ParkedMessage:
        """Never raises: whatever a header holds is read as far as it can be, or shown as text."""
        try:
            return cls._of(delivery, position)
        except Exception as exc:  # a header no rule above foresaw: the message is still listed
            return cls(
                body=delivery.body,
                headers={},
                message_id=_text(getattr(delivery.properties, "message_id", None)) or None,
                reason="",
                attempts=0,
                error=f"rabbitflow cannot read this message's headers ({type(exc).__name__})",
                position=position,
                undecodable=delivery.undecodable,
            )

    @classmethod
    def _of(cls, delivery: Delivery, position: int) -> ParkedMessage:
        # The broker's counters describe this look, not the message: left out.
        headers = delivery.properties.headers
        headers = names.without(headers if isinstance(headers, dict) else {}, COUNTERS)
        death = _death(headers)
        reason = _text(headers.get(names.REASON)) or _text(death.get("reason")).replace("_", "-")
        when = _time(death.get("time"))
        return cls(
            body=delivery.body,
            headers=headers,
            message_id=delivery.properties.message_id,
            reason=reason,
            attempts=_count(headers.get(names.PARKED_ATTEMPTS)),
            error=_text(headers.get(names.ERROR)),
            exception=_text(headers.get(names.EXCEPTION)),
            traceback=_text(headers.get(names.TRACEBACK)),
            first_failure=_time(headers.get(names.FIRST_FAILURE)) or when,
            last_failure=_time(headers.get(names.LAST_FAILURE)) or when,
            content_type=delivery.properties.content_type,
            position=position,
            correlation_id=delivery.properties.correlation_id,
            undecodable=delivery.undecodable,
        )

    def _header(self, name: str) -> str | None:
        value = self.headers.get(name)
        return None if value is None else _text(value)

    def origin(self) -> dict[str, Any]:
        """Where the message came from: its correlation id and every x-rf-* header that is not
        its failure (original exchange and routing key, queue, and any rabbitflow adds later)."""
        found: dict[str, Any] = {}
        if self.correlation_id:
            found["correlation_id"] = self.correlation_id
        for key, value in self.headers.items():
            if isinstance(key, str) and key.startswith("x-rf-") and key not in _FAILURE:
                found[key] = jsonable(value)
        return found

    def summary(self) -> dict[str, Any]:
        """What `list --json` prints of each message."""
        return {
            "position": self.position,
            "message_id": self.message_id,
            "reason": self.reason or None,
            "exception": self.exception or None,
            "error": self.error or None,
            "attempts": self.attempts,
            "first_failure": self.first_failure,
            "last_failure": self.last_failure,
            "original_exchange": self._header(names.ORIGINAL_EXCHANGE),
            "original_routing_key": self._header(names.ORIGINAL_ROUTING_KEY),
            "size": len(self.body),
        }

    def details(self) -> dict[str, Any]:
        """What `show --json` prints: the summary, the traceback, every header and the body
        (text when it is UTF-8, else base64)."""
        try:
            body, encoding = self.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            body, encoding = base64.b64encode(self.body).decode(), "base64"
        return {
            **self.summary(),
            "content_type": self.content_type,
            "correlation_id": self.correlation_id,
            "undecodable": self.undecodable,
            "origin": self.origin(),
            "traceback": self.traceback or None,
            "headers": jsonable(self.headers),
            "body": body,
            "body_encoding": encoding,
        }


@dataclass(frozen=True, slots=True)
class Filter:
    """Which parked messages an operation is about; every given field must match."""

    reason: str | None = None
    exception: str | None = None  # the full type, or its last part(s): `ValueError`
    message_id: str | None = None

    def __post_init__(self) -> None:
        if self.reason is not None and self.reason not in REASONS:
            raise ConfigError(
                f"reason {self.reason!r} is not one a message is parked with; use one of {', '.join(REASONS)}"
            )
        for what, value in (("exception", self.exception), ("message id", self.message_id)):
            if value is not None and not value.strip():
                raise ConfigError(f"an empty {what} matches nothing; give one, or leave the filter out")

    def matches(self, message: ParkedMessage) -> bool:
        if self.reason is not None and message.reason != self.reason:
            return False
        if self.message_id is not None and message.message_id != self.message_id:
            return False
        if self.exception is not None:
            exc = message.exception
            return exc == self.exception or exc.endswith(f".{self.exception}")
        return True


@dataclass(frozen=True, slots=True)
class Group:
    """Parked messages of one reason and exception type (as ServicePulse groups failures)."""

    reason: str
    exception: str
    count: int
    first_failure: str | None
    last_failure: str | None
    error: str  # the error text of the group's latest failure

    def to_json(self) -> dict[str, Any]:
        return {
            "reason": self.reason or None,
            "exception": self.exception or None,
            "count": self.count,
            "first_failure": self.first_failure,
            "last_failure": self.last_failure,
            "error": self.error or None,
        }


@dataclass(slots=True)
class GroupCounter:
    """Groups counted as the walk goes, holding no message."""

    groups: dict[tuple[str, str], list[Any]] = field(default_factory=dict)

    def add(self, m: ParkedMessage) -> None:
        entry = self.groups.setdefault((m.reason, m.exception), [0, None, None, ""])
        entry[0] += 1
        first, last = m.first_failure or m.last_failure, m.last_failure or m.first_failure
        if first is not None and (entry[1] is None or first < entry[1]):
            entry[1] = first
        if entry[2] is None or (last is not None and last >= entry[2]):
            entry[2], entry[3] = last, m.error

    def result(self) -> list[Group]:
        found = [
            Group(r, e, n, first, last, error) for (r, e), (n, first, last, error) in self.groups.items()
        ]
        found.sort(key=lambda g: (-g.count, g.reason, g.exception))
        return found


@dataclass(frozen=True, slots=True)
class Listing:
    """What `look` found: the matching messages grouped, and the first `limit` of them."""

    queue: str  # the parking queue
    total: int  # messages that matched (all of them without a filter)
    groups: list[Group]
    messages: list[ParkedMessage]

    def to_json(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "total": self.total,
            "groups": [g.to_json() for g in self.groups],
            "messages": [m.summary() for m in self.messages],
        }


@dataclass(frozen=True, slots=True)
class WalkResult:
    """What a replay or purge did (or, on a dry run, would do)."""

    queue: str  # the parking queue
    found: int  # messages parked when it began
    done: int  # replayed / removed (on a dry run: that would be)
    skipped: int  # did not match the filter: still parked, in their order
    dry_run: bool
    groups: list[Group]  # of the messages done

    @property
    def left(self) -> int:
        """Parked when it began and still parked (skipped, or beyond the limit)."""
        return self.found - self.done if not self.dry_run else self.found
