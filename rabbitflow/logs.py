"""The fields of a log line: which service, queue, message and attempt it is about.

The consumer marks each delivery it handles (`delivering`, a context variable of the delivery's
task), so every line logged while the handler runs — rabbitflow's and the user's own — can carry
`queue`, `message_id`, `correlation_id` and `attempt`. `ContextFilter` adds them (and `service`,
`worker`) to each record; `JsonFormatter` writes one JSON object per line. The library configures
no logging: the CLI does (`--log-format json`, `--log-config FILE`), or the user's own dictConfig
(docs/operations.md, "Logging").
"""

from __future__ import annotations

import contextvars
import datetime
import logging
import os
from typing import Any

import orjson

from rabbitflow.urls import mask

__all__ = ["FIELDS", "ContextFilter", "JsonFormatter", "current", "delivering", "set_service"]

FIELDS = ("service", "queue", "message_id", "correlation_id", "attempt", "worker")
WORKER_ENV = "RABBITFLOW_WORKER"  # the same name cli/workers.py gives each worker (1..N)

_delivery: contextvars.ContextVar[tuple[str, str | None, str | None, int] | None] = contextvars.ContextVar(
    "rabbitflow_delivery", default=None
)
_service: str | None = None


def delivering(queue: str, message_id: str | None, correlation_id: str | None, attempt: int) -> None:
    """Mark the current task as handling this delivery (each delivery has a task of its own)."""
    _delivery.set((queue, message_id, correlation_id, attempt))


def set_service(name: str | None) -> None:
    """The service this process runs (the CLI sets it when it loads the app)."""
    global _service
    _service = name


def current() -> dict[str, Any]:
    """The fields that apply here and now: inside a handler its queue, message id, correlation id
    and attempt; the service and worker whenever they are known."""
    fields: dict[str, Any] = {}
    if _service is not None:
        fields["service"] = _service
    delivery = _delivery.get()
    if delivery is not None:
        queue, message_id, correlation_id, attempt = delivery
        fields["queue"] = queue
        if message_id is not None:
            fields["message_id"] = message_id
        if correlation_id is not None:
            fields["correlation_id"] = correlation_id
        fields["attempt"] = attempt
    worker = os.environ.get(WORKER_ENV)
    if worker:
        fields["worker"] = worker
    return fields


class ContextFilter(logging.Filter):
    """Adds `service`, `queue`, `message_id`, `correlation_id`, `attempt` and `worker` to each
    record as attributes (None where they do not apply), for a formatter to use:
    `%(queue)s`, or `JsonFormatter`. Put it on a handler, so that it sees every logger's records.
    `service` names the service where the CLI did not (an app embedded in another program)."""

    def __init__(self, name: str = "", service: str | None = None) -> None:
        super().__init__(name)
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        fields = current()
        if self.service is not None:
            fields.setdefault("service", self.service)
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, fields.get(name))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, the fields of
    `ContextFilter` that apply, and `exception` (the traceback) when there is one. Passwords in
    URLs are masked."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": mask(record.getMessage()),
        }
        fields = current()
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is None:
                value = fields.get(name)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exception"] = mask(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exception"] = mask(record.exc_text)
        return orjson.dumps(line, default=str).decode()
