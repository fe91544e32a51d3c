"""Exchanges, bindings and the four AMQP routing rules (direct, fanout, topic, headers)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from rabbitflow.transport.memory.amqp import erl, field_type, type_class

__all__ = [
    "EXCHANGE_TYPES",
    "Binding",
    "MemoryExchange",
    "headers_match",
    "invalid_x_match",
    "topic_match",
]

EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
X_MATCH = ("all", "any", "all-with-x", "any-with-x")


@dataclass(slots=True)
class Binding:
    """queue <- exchange with a routing key (and arguments, which only headers exchanges read)."""

    queue: str
    routing_key: str
    arguments: dict[str, Any]


@dataclass(slots=True, eq=False)
class MemoryExchange:
    """An exchange and its bindings."""

    name: str
    type: str
    durable: bool
    arguments: dict[str, Any]
    bindings: list[Binding] = field(default_factory=list)

    def bind(self, binding: Binding) -> None:
        # Binding twice with the same key and arguments is a no-op, as in RabbitMQ.
        if binding not in self.bindings:
            self.bindings.append(binding)

    def unbind_queue(self, queue: str) -> None:
        self.bindings = [b for b in self.bindings if b.queue != queue]

    def route(self, routing_key: str, headers: Mapping[str, Any] | None) -> list[str]:
        """The names of the queues a message goes to, each once, in binding order."""
        if self.type == "fanout":
            matched = [b.queue for b in self.bindings]
        elif self.type == "direct":
            matched = [b.queue for b in self.bindings if b.routing_key == routing_key]
        elif self.type == "topic":
            matched = [b.queue for b in self.bindings if topic_match(b.routing_key, routing_key)]
        else:
            matched = [b.queue for b in self.bindings if headers_match(b.arguments, headers)]
        return list(dict.fromkeys(matched))


def _words(key: str) -> tuple[str, ...]:
    # rabbit_exchange_type_topic splits "" into no words at all, and "a." into "a" and "".
    return tuple(key.split(".")) if key else ()


@functools.lru_cache(maxsize=4096)
def topic_match(pattern: str, routing_key: str) -> bool:
    """Whether a topic binding key matches: `*` is one word, `#` zero or more."""
    return _match(_words(pattern), 0, _words(routing_key), 0)


def _match(pattern: tuple[str, ...], i: int, key: tuple[str, ...], j: int) -> bool:
    while i < len(pattern):
        word = pattern[i]
        if word == "#":
            if i + 1 == len(pattern):
                return True
            return any(_match(pattern, i + 1, key, k) for k in range(j, len(key) + 1))
        if j == len(key) or (word != "*" and word != key[j]):
            return False
        i, j = i + 1, j + 1
    return j == len(key)


def headers_match(arguments: Mapping[str, Any], headers: Mapping[str, Any] | None) -> bool:
    """rabbit_exchange_type_headers: `x-match` all (default) or any; `x-` keys are skipped."""
    mode = arguments.get("x-match", "all")
    with_x = mode in ("all-with-x", "any-with-x")
    wanted = [
        (key, value)
        for key, value in arguments.items()
        if key != "x-match" and (with_x or not key.startswith("x-"))
    ]
    headers = headers or {}
    hits = (_field_match(key, value, headers) for key, value in wanted)
    return any(hits) if mode in ("any", "any-with-x") else all(hits)


def _field_match(key: str, value: Any, headers: Mapping[str, Any]) -> bool:
    if key not in headers:
        return False
    if value is None:  # a void binding value asks only for the header's presence
        return True
    found = headers[key]
    return bool(found == value and type_class(found) == type_class(value))


def invalid_x_match(arguments: Mapping[str, Any]) -> str | None:
    """Why rabbit_exchange_type_headers refuses a binding's `x-match`, or None."""
    if "x-match" not in arguments:
        return None
    value = arguments["x-match"]
    if not isinstance(value, str):
        return f"Invalid x-match field type {field_type(value)} (value {erl(value)}); expected longstr"
    if value not in X_MATCH:
        return f'Invalid x-match field value <<"{value}">>; expected all, any, all-with-x, or any-with-x'
    return None
