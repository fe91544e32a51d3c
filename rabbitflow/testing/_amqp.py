"""The AMQP details the in-memory broker mimics: field types, argument checks and error texts."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from pamqp import decode, encode
from pamqp.commands import Basic

from ..transport.base import ChannelClosed, Properties

__all__ = [
    "EXCHANGE_ARGS",
    "QUEUE_ARGS",
    "access_refused",
    "assert_args_equivalence",
    "assert_field_equivalence",
    "clone_properties",
    "copy_table",
    "field_type",
    "not_found",
    "parse_expiration",
    "precondition_failed",
    "resource_locked",
    "rs",
    "type_class",
    "validate_queue_arguments",
    "wire_properties",
    "wire_table",
]

VHOST = "/"

# RabbitMQ's names for the field types, keyed by the type octet pamqp writes. pamqp 4 picks the
# smallest integer type, so x-message-ttl=1000 reaches the broker as a 'short'.
_TYPE_NAMES = {
    b"t": "bool",
    b"b": "byte",
    b"B": "unsignedbyte",
    b"s": "short",
    b"u": "unsignedshort",
    b"I": "signedint",
    b"i": "unsignedint",
    b"l": "long",
    b"f": "float",
    b"d": "double",
    b"D": "decimal",
    b"S": "longstr",
    b"T": "timestamp",
    b"F": "table",
    b"A": "array",
    b"x": "binary",
    b"V": "void",
}
_INT_TYPES = frozenset({"byte", "unsignedbyte", "short", "unsignedshort", "signedint", "unsignedint", "long"})

# Arguments compared when a queue is redeclared, in the order RabbitMQ checks them
# (rabbit_amqqueue:declare_args/0); 3.10.8 compares x-delivery-limit too.
QUEUE_ARGS = (
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-dead-letter-strategy",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-version",
    "x-single-active-consumer",
    "x-queue-type",
    "x-quorum-initial-group-size",
    "x-max-age",
    "x-initial-cluster-size",
    "x-queue-leader-locator",
    "x-delivery-limit",
)
EXCHANGE_ARGS = ("alternate-exchange",)


def rs(kind: str, name: str) -> str:
    """How RabbitMQ names a resource in error texts: `queue 'q' in vhost '/'`."""
    return f"{kind} '{name}' in vhost '{VHOST}'"


def not_found(kind: str, name: str) -> ChannelClosed:
    return ChannelClosed(404, f"NOT_FOUND - no {rs(kind, name)}")


def precondition_failed(text: str) -> ChannelClosed:
    return ChannelClosed(406, f"PRECONDITION_FAILED - {text}")


def access_refused(text: str) -> ChannelClosed:
    return ChannelClosed(403, f"ACCESS_REFUSED - {text}")


def resource_locked(name: str) -> ChannelClosed:
    return ChannelClosed(
        405,
        f"RESOURCE_LOCKED - cannot obtain exclusive access to locked {rs('queue', name)}. It "
        "could be originally declared on another connection or the exclusive property value "
        "does not match that of the original declaration.",
    )


def field_type(value: Any) -> str:
    """The type RabbitMQ sees for `value` once pamqp has encoded it."""
    try:
        return _TYPE_NAMES.get(encode.encode_table_value(value)[:1], "unknown")
    except TypeError:
        return "unknown"


def type_class(value: Any) -> str:
    """The class RabbitMQ compares values by: every integer type is one class, floats another."""
    kind = field_type(value)
    if kind in _INT_TYPES:
        return "int"
    return "float" if kind in ("float", "double") else kind


def _erl(value: Any) -> str:
    """A value as RabbitMQ prints it in an error text (~s for binaries, ~p otherwise)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_erl(item) for item in value) + "]"
    return str(value)


def _described(table: Mapping[str, Any], key: str) -> str:
    if key not in table:
        return "none"
    return f"the value '{_erl(table[key])}' of type '{field_type(table[key])}'"


def assert_field_equivalence(kind: str, name: str, key: str, current: Any, received: Any) -> None:
    """Raise 406 like rabbit_misc:assert_field_equivalence/4 when a declared property differs."""
    if current != received:
        raise precondition_failed(
            f"inequivalent arg '{key}' for {rs(kind, name)}: "
            f"received '{_erl(received)}' but current is '{_erl(current)}'"
        )


def assert_args_equivalence(
    kind: str,
    name: str,
    current: Mapping[str, Any],
    received: Mapping[str, Any],
    keys: tuple[str, ...],
) -> None:
    """Raise 406 naming the first of `keys` whose value differs (rabbit_misc:assert_args_equivalence)."""
    for key in keys:
        if key not in current and key not in received:
            continue
        if key in current and key in received:
            old, new = current[key], received[key]
            if type_class(old) == type_class(new) and old == new:
                continue
            # Both present: RabbitMQ prints the bare values ("received '2000' but current is
            # '1000'"); the typed form is only for an argument missing on one side.
            raise precondition_failed(
                f"inequivalent arg '{key}' for {rs(kind, name)}: "
                f"received '{_erl(new)}' but current is '{_erl(old)}'"
            )
        raise precondition_failed(
            f"inequivalent arg '{key}' for {rs(kind, name)}: "
            f"received {_described(received, key)} but current is {_described(current, key)}"
        )


def _check_int(value: Any, *, zero: bool = True) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{{unacceptable_type,{field_type(value)}}}"
    if value < 0:
        return f"{{value_negative,{value}}}"
    if value == 0 and not zero:
        return "{value_zero,0}"
    return None


def _check_str(value: Any, allowed: tuple[str, ...] = (), error: str = "") -> str | None:
    if not isinstance(value, str):
        return f"{{unacceptable_type,{field_type(value)}}}"
    return error if allowed and value not in allowed else None


def validate_queue_arguments(name: str, args: Mapping[str, Any]) -> None:
    """Refuse the argument values RabbitMQ refuses when it creates a queue (406)."""
    checks: dict[str, Callable[[Any], str | None]] = {
        "x-expires": lambda v: _check_int(v, zero=False),
        "x-message-ttl": _check_int,
        "x-max-length": _check_int,
        "x-max-length-bytes": _check_int,
        "x-delivery-limit": _check_int,
        "x-dead-letter-exchange": _check_str,
        "x-dead-letter-routing-key": lambda v: (
            _check_str(v) or (None if "x-dead-letter-exchange" in args else "routing_key_but_no_dlx_defined")
        ),
        "x-overflow": lambda v: _check_str(
            v, ("drop-head", "reject-publish", "reject-publish-dlx"), "invalid_overflow"
        ),
        "x-queue-type": lambda v: _check_str(
            v, ("classic", "quorum", "stream"), f"\"unsupported queue type '{v}'\""
        ),
        "x-dead-letter-strategy": lambda v: _check_str(
            v, ("at-most-once", "at-least-once"), "invalid_dlx_strategy"
        ),
    }
    for key, check in checks.items():
        if key in args and (error := check(args[key])) is not None:
            raise precondition_failed(f"invalid arg '{key}' for {rs('queue', name)}: {error}")


_EXPIRATION = re.compile(r"([+-]?[0-9]+)(.*)", re.DOTALL)


def parse_expiration(expiration: str) -> int:
    """The per-message TTL in ms, or 406 as rabbit_basic:parse_expiration/1 refuses it."""
    match = _EXPIRATION.fullmatch(expiration)
    if match is None:
        error = "{error,no_integer}"
    elif match.group(2):
        error = f'{{error,{{leftover_string,"{match.group(2)}"}}}}'
    elif int(match.group(1)) < 0:
        error = f"{{error,{{value_negative,{int(match.group(1))}}}}}"
    else:
        return int(match.group(1))
    raise precondition_failed(f"invalid expiration '{expiration}': {error}")


def wire_table(table: Mapping[str, Any] | None) -> dict[str, Any]:
    """A field table as the broker decodes it after pamqp encoded it (TypeError if it can't)."""
    if not table:
        return {}
    return decode.field_table(encode.field_table(dict(table)))[1]


def wire_properties(properties: Properties) -> Properties:
    """Properties after a trip over the wire: pamqp's encoding, limits and decoded types."""
    data = properties.marshal()
    copy = Basic.Properties()
    copy.unmarshal(int.from_bytes(data[:2], "big"), data[2:])
    return copy


def _copy_value(value: Any) -> Any:
    if isinstance(value, dict):
        return copy_table(value)
    if isinstance(value, list):
        return [_copy_value(item) for item in value]
    return bytearray(value) if isinstance(value, bytearray) else value


def copy_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a decoded field table (dicts, lists and immutable leaves)."""
    return {key: _copy_value(value) for key, value in table.items()}


def clone_properties(
    p: Properties,
    *,
    headers: dict[str, Any] | None,
    expiration: str | None,
) -> Properties:
    """A new Properties with these headers and expiration and every other field of `p`."""
    return Basic.Properties(
        content_type=p.content_type,
        content_encoding=p.content_encoding,
        headers=headers,
        delivery_mode=p.delivery_mode,
        priority=p.priority,
        correlation_id=p.correlation_id,
        reply_to=p.reply_to,
        expiration=expiration,
        message_id=p.message_id,
        timestamp=p.timestamp,
        message_type=p.message_type,
        user_id=p.user_id,
        app_id=p.app_id,
    )
