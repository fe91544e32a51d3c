"""The AMQP details the in-memory broker mimics: field types, argument checks and error texts."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from pamqp import decode, encode
from pamqp.commands import Basic

from rabbitflow.transport.base import ChannelClosed, Properties

__all__ = [
    "EXCHANGE_ARGS",
    "QUEUE_ARGS",
    "access_refused",
    "assert_args_equivalence",
    "assert_field_equivalence",
    "compared_queue_args",
    "copy_table",
    "erl",
    "field_type",
    "not_found",
    "parse_expiration",
    "precondition_failed",
    "queue_type_module",
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


def erl(value: Any) -> str:
    """A value as RabbitMQ prints it in an error text (~s for binaries, ~p otherwise)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(erl(item) for item in value) + "]"
    return str(value)


def _described(table: Mapping[str, Any], key: str) -> str:
    if key not in table:
        return "none"
    return f"the value '{erl(table[key])}' of type '{field_type(table[key])}'"


def assert_field_equivalence(kind: str, name: str, key: str, current: Any, received: Any) -> None:
    """Raise 406 like rabbit_misc:assert_field_equivalence/4 when a declared property differs."""
    if current != received:
        raise precondition_failed(
            f"inequivalent arg '{key}' for {rs(kind, name)}: "
            f"received '{erl(received)}' but current is '{erl(current)}'"
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
                f"received '{erl(new)}' but current is '{erl(old)}'"
            )
        raise precondition_failed(
            f"inequivalent arg '{key}' for {rs(kind, name)}: "
            f"received {_described(received, key)} but current is {_described(current, key)}"
        )


def _check_int(value: Any, *, zero: bool = True) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f'"expected integer, got {field_type(value)}"'
    if value < 0:
        return f"{{value_negative,{value}}}"
    if value == 0 and not zero:
        return "{value_zero,0}"
    return None


def _check_str(value: Any, allowed: tuple[str, ...] = (), error: str = "") -> str | None:
    if not isinstance(value, str):
        return f"{{unacceptable_type,{field_type(value)}}}"
    return error if allowed and value not in allowed else None


def _check_bool(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"{{unacceptable_type,{field_type(value)}}}"


def _check_priority(value: Any) -> str | None:
    error = _check_int(value)
    return error or (f"{{max_value_exceeded,{value}}}" if value > 255 else None)


def _check_version(value: Any) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return f"{{unacceptable_type,{field_type(value)}}}"
    return None if value in (1, 2) else f"\"unsupported queue version '{value}'\""


# The x- arguments each queue type refuses (rabbit_queue_type capabilities in 3.10).
_UNSUPPORTED = {
    "classic": frozenset(
        {
            "x-dead-letter-strategy",
            "x-delivery-limit",
            "x-initial-cluster-size",
            "x-max-age",
            "x-max-in-memory-bytes",
            "x-max-in-memory-length",
            "x-queue-leader-locator",
            "x-quorum-initial-group-size",
            "x-stream-max-segment-size-bytes",
        }
    ),
    "quorum": frozenset(
        {
            "x-initial-cluster-size",
            "x-max-age",
            "x-max-priority",
            "x-queue-master-locator",
            "x-queue-mode",
            "x-queue-version",
            "x-stream-max-segment-size-bytes",
        }
    ),
}
_TYPE_MODULES = {"classic": "rabbit_classic_queue", "quorum": "rabbit_quorum_queue"}


def queue_type_module(kind: str) -> str:
    """The queue type as RabbitMQ names it in error texts."""
    return _TYPE_MODULES.get(kind, f"rabbit_{kind}_queue")


def compared_queue_args(kind: str) -> tuple[str, ...]:
    """The arguments a redeclaration of a queue of this type must repeat: 3.10.8 skips the ones
    its type does not support (x-delivery-limit on a classic queue may come and go)."""
    unsupported = _UNSUPPORTED.get(kind, frozenset())
    return tuple(key for key in QUEUE_ARGS if key not in unsupported)


def validate_queue_arguments(name: str, args: Mapping[str, Any]) -> None:
    """Refuse the arguments RabbitMQ 3.10.8 refuses when it creates a queue (406), in its order:
    the checks every queue type shares, then the arguments the type does not support, then the
    type's own checks. x-delivery-limit is never checked (a quorum queue takes "abc")."""
    kind = args.get("x-queue-type", "classic")

    def fail(key: str, error: str) -> ChannelClosed:
        return precondition_failed(f"invalid arg '{key}' for {rs('queue', name)}: {error}")

    dlx = args.get("x-dead-letter-exchange")
    common: dict[str, Callable[[Any], str | None]] = {
        "x-expires": lambda v: _check_int(v, zero=False),
        "x-message-ttl": _check_int,
        "x-dead-letter-exchange": _check_str,
        "x-dead-letter-routing-key": lambda v: (
            _check_str(v) or (None if dlx is not None else "routing_key_but_no_dlx_defined")
        ),
        "x-max-length": _check_int,
        "x-max-length-bytes": _check_int,
        "x-max-in-memory-length": _check_int,
        "x-max-in-memory-bytes": _check_int,
        "x-overflow": lambda v: _check_str(
            v, ("drop-head", "reject-publish", "reject-publish-dlx"), "invalid_overflow"
        ),
        "x-single-active-consumer": _check_bool,
        "x-queue-type": lambda v: _check_str(
            v, ("classic", "quorum", "stream"), f"\"unsupported queue type '{v}'\""
        ),
    }
    for key, check in common.items():
        if key in args and (error := check(args[key])) is not None:
            if key == "x-dead-letter-exchange":  # this one has its own wording
                raise precondition_failed(
                    f"invalid type '{field_type(dlx)}' for arg '{key}' in {rs('queue', name)}"
                )
            raise fail(key, error)
    for key in sorted(args):  # RabbitMQ sorts a field table by key
        if key in _UNSUPPORTED.get(kind, ()):
            raise precondition_failed(
                f"invalid arg '{key}' for {rs('queue', name)} of queue type {queue_type_module(kind)}"
            )
    own: dict[str, Callable[[Any], str | None]] = (
        {
            "x-max-priority": _check_priority,
            "x-queue-mode": lambda v: _check_str(v, ("default", "lazy"), f"\"unsupported queue mode '{v}'\""),
            "x-queue-version": _check_version,
        }
        if kind == "classic"
        else {
            "x-dead-letter-strategy": lambda v: _check_str(
                v, ("at-most-once", "at-least-once"), "invalid_dlx_strategy"
            ),
            "x-quorum-initial-group-size": _check_int,
            "x-queue-leader-locator": lambda v: _check_str(
                v, ("client-local", "balanced", "random", "least-leaders"), "invalid_queue_locator_arg"
            ),
        }
    )
    for key, check in own.items():
        if key in args and (error := check(args[key])) is not None:
            raise fail(key, error)


_EXPIRATION = re.compile(r"([+-]?[0-9]+)(.*)", re.DOTALL)


def parse_expiration(expiration: str) -> int:
    """The per-message TTL in ms, or 406 as rabbit_basic:parse_expiration/1 refuses it."""
    match = _EXPIRATION.fullmatch(expiration)
    # rabbit_channel prints the reason inside parse_expiration's {error, Reason}.
    if match is None:
        error = "no_integer"
    elif match.group(2):
        error = f'{{leftover_string,"{match.group(2)}"}}'
    elif int(match.group(1)) < 0:
        error = f"{{value_negative,{int(match.group(1))}}}"
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
