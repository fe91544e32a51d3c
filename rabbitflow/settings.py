"""The App's options as one frozen object, and the checks every option goes through."""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rabbitflow import names
from rabbitflow.breaker import Breaker
from rabbitflow.errors import ConfigError
from rabbitflow.urls import Endpoint, parse_urls, strategy

if TYPE_CHECKING:
    from rabbitflow.urls import Failover

__all__ = [
    "AMQP_SHORT",
    "ENV_OPTIONS",
    "Settings",
    "check_name",
    "check_positive",
    "check_queue",
    "check_seconds",
    "check_text",
    "default",
    "environment_options",
    "read_env_file",
]

AMQP_SHORT = 2**16 - 1  # prefetch (basic.qos) and heartbeat are unsigned shorts on the wire

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]

# Seconds a consumer may hold deliveries without settling any before health calls it stalled,
# when it has no handler timeout; with one, twice the timeout and a second (the handler, then a
# copy that may take as long to be confirmed).
STALL_AFTER = 60.0


def check_text(
    what: str, value: object, *, allow_empty: bool = False, limit: int = names.MAX_NAME, why: str = ""
) -> str:
    """An AMQP short string (a routing key, say): UTF-8, at most `limit` bytes."""
    if not isinstance(value, str) or (not value and not allow_empty):
        raise ConfigError(f"{what}={value!r}: expected a non-empty string")
    try:
        size = len(value.encode())
    except UnicodeEncodeError as exc:
        raise ConfigError(
            f"{what}={value!r}: not encodable as UTF-8 ({exc.reason} at position {exc.start}); "
            "AMQP names are UTF-8 text"
        ) from None
    if size > limit:
        why = why or f"AMQP names are at most {limit} bytes"
        raise ConfigError(f"{what}={_head(value)}: {size} bytes; {why}")
    return value


def check_name(what: str, value: object, *, limit: int = names.MAX_NAME, why: str = "") -> str:
    """A queue or exchange name: a short string of the characters the AMQP client accepts."""
    value = check_text(what, value, limit=limit, why=why)
    if not names.NAME_CHARACTERS.fullmatch(value):
        bad = "".join(sorted({c for c in value if not names.NAME_CHARACTERS.fullmatch(c)}))
        raise ConfigError(
            f"{what}={_head(value)}: {bad!r} cannot be in a queue or exchange name; use letters "
            "a-z A-Z, digits, space and - _ . : @ # , / + (pamqp, aiormq's AMQP library, refuses others)"
        )
    return value


def check_queue(what: str, value: object) -> str:
    """A consumer's queue: a name that leaves room for the names derived from it."""
    longest = names.retry_queue("Q", names.MAX_DELAY)
    return check_name(
        what,
        value,
        limit=names.MAX_QUEUE,
        why=f"a queue name is at most {names.MAX_QUEUE} bytes, so that the names rabbitflow derives "
        f"from it (Q.parked, and {longest} for the longest delay) fit AMQP's {names.MAX_NAME}",
    )


def _head(value: str) -> str:
    return repr(value) if len(value) <= 60 else f"{value[:40]!r}... ({len(value)} characters)"


def check_positive(
    what: str, value: object, *, optional: bool = True, maximum: int | None = None
) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what}={value!r}: expected a whole number >= 1")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{what}={value!r}: at most {maximum} (an AMQP unsigned short)")
    return value


def check_seconds(what: str, value: object, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigError(f"{what}={value!r}: expected a finite number of seconds > 0")
    return float(value)


# -- the environment -----------------------------------------------------------------------------
# Every App option that is a plain value can come from RABBITFLOW_<OPTION> (the URL from
# RABBITFLOW_URL, read by parse_urls). An option given in code wins: App's signature marks its
# defaults with `default(...)`, so an option left out is told apart from one passed explicitly.

T = TypeVar("T")

ENV_OPTIONS: dict[str, Callable[[str], object]] = {
    "failover": str,
    "prefetch": int,
    "concurrency": int,
    "handler_timeout": float,
    "graceful_timeout": float,
    "heartbeat": int,
    "connect_timeout": float,
    "connect_budget": float,
    "publish_timeout": float,
}


class _DefaultInt(int):
    pass


class _DefaultFloat(float):
    pass


class _DefaultStr(str):
    __slots__ = ()


_DEFAULTS = (_DefaultInt, _DefaultFloat, _DefaultStr)


def default(value: T) -> T:
    """`value`, marked as App's default (left out by the caller: the environment may set it)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _DefaultInt(value)  # type: ignore[return-value]
    if isinstance(value, float):
        return _DefaultFloat(value)  # type: ignore[return-value]
    if isinstance(value, str):
        return _DefaultStr(value)  # type: ignore[return-value]
    return value


def _plain(value: object) -> object:
    """A marked default as the plain value it stands for."""
    if isinstance(value, _DefaultInt):
        return int(value)
    if isinstance(value, _DefaultFloat):
        return float(value)
    if isinstance(value, _DefaultStr):
        return str(value)
    return value


def environment_options(options: dict[str, Any], environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`options` with every option the caller left out (a marked default, or None) taken from
    RABBITFLOW_<OPTION> when that is set; a value that does not parse is a ConfigError naming
    the variable."""
    environ = os.environ if environ is None else environ
    resolved = dict(options)
    for option, parse in ENV_OPTIONS.items():
        value = options.get(option)
        given = option in options and value is not None and not isinstance(value, _DEFAULTS)
        variable = f"RABBITFLOW_{option.upper()}"
        text = environ.get(variable, "").strip()
        if given or not text:
            if option in resolved:
                resolved[option] = _plain(value)
            continue
        try:
            resolved[option] = parse(text)
        except ValueError:
            kind = "a whole number" if parse is int else "a number of seconds"
            raise ConfigError(f"{variable}={text!r}: expected {kind}") from None
    return resolved


def read_env_file(path: str | Path) -> dict[str, str]:
    """`NAME=value` lines (`#` comments, blank lines, an optional `export `, quotes around the
    value); a line that is none of these is a ConfigError naming the file and line."""
    variables: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"--env-file {path}: {exc.strerror}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        name, sep, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name.isidentifier():
            raise ConfigError(f"--env-file {path}, line {number}: expected NAME=value")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        variables[name] = value
    return variables


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything `App(...)` was given, validated."""

    name: str
    endpoints: tuple[Endpoint, ...]
    failover: Failover = "round-robin"
    prefetch: int = 64
    concurrency: int = 32
    handler_timeout: float | None = None
    graceful_timeout: float = 30.0
    heartbeat: int = 5
    connect_timeout: float = 5.0
    connect_budget: float = 30.0
    publish_timeout: float = 10.0
    breaker: Breaker | None = None
    max_message_size: int = 16 * 1024 * 1024  # RabbitMQ 4.0's default max_message_size
    lifespan: Lifespan | None = field(default=None, compare=False)
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False)

    @classmethod
    def build(cls, name: object, url: str | Sequence[str] | None, **options: Any) -> Settings:
        """Validate `App(name, url, **options)`; every problem is a ConfigError naming the option.
        Options the caller left out come from RABBITFLOW_* variables when they are set."""
        try:
            options = environment_options(options)
            checked_name = check_name(
                "name",
                name,
                limit=names.MAX_SERVICE,
                why=f"a service name is at most {names.MAX_SERVICE} bytes, so that its exchange "
                f"<name>.dlx fits AMQP's {names.MAX_NAME}",
            )
            if checked_name.startswith("amq."):
                raise ConfigError(
                    f"name={checked_name!r}: RabbitMQ reserves exchange names starting with 'amq.', "
                    f"and the service's exchange would be {names.dead_letter_exchange(checked_name)!r}"
                )
            endpoints = parse_urls(url)
            if "failover" in options:
                strategy(options["failover"])
            for what in ("prefetch", "concurrency", "heartbeat"):
                if what in options:
                    maximum = None if what == "concurrency" else AMQP_SHORT
                    check_positive(what, options[what], optional=False, maximum=maximum)
            for what in ("graceful_timeout", "connect_timeout", "connect_budget", "publish_timeout"):
                if what in options:
                    options[what] = check_seconds(what, options[what])
            if options.get("breaker") is not None and not isinstance(options["breaker"], Breaker):
                raise ConfigError(f"breaker={options['breaker']!r}: expected rabbitflow.Breaker(...) or None")
            if "max_message_size" in options:
                check_positive("max_message_size", options["max_message_size"], optional=False)
            if "handler_timeout" in options:
                options["handler_timeout"] = check_seconds(
                    "handler_timeout", options["handler_timeout"], optional=True
                )
        except ConfigError as exc:
            raise ConfigError(f"App({name!r}): {exc}") from None
        return cls(checked_name, endpoints, **options)

    def stall_after(self, handler_timeout: float | None) -> float:
        """How long a consumer holding deliveries may settle none before it counts as stalled."""
        timeout = self.handler_timeout if handler_timeout is None else handler_timeout
        return STALL_AFTER if timeout is None else 2 * timeout + 1.0
