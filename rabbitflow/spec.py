"""Consumer specs: what `@app.consumer` records, validated when the decorator runs."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rabbitflow import depends
from rabbitflow.breaker import Breaker
from rabbitflow.codec import Reader, reader_for
from rabbitflow.errors import ConfigError
from rabbitflow.message import Message
from rabbitflow.retry import RetryPolicy
from rabbitflow.settings import AMQP_SHORT, check_name, check_positive, check_queue, check_seconds, check_text

__all__ = ["EXCHANGE_TYPES", "QUEUE_TYPES", "ConsumerSpec", "Handler", "HandlerSignature"]

Handler = Callable[..., Any]  # an `async def`, or a `def` run in a worker thread
EXCHANGE_TYPES = ("direct", "fanout", "topic", "headers")
QUEUE_TYPES = ("quorum", "classic")


@dataclass(frozen=True, slots=True)
class HandlerSignature:
    """How to call a handler: read the body, where (if anywhere) the Message goes, what its
    dependencies and App parameters need (`needs`, None without any), and whether it is a plain
    `def` that runs in a worker thread (`sync`). Worked out once, when the decorator runs."""

    read: Reader
    message_param: str | None
    message_positional: bool
    needs: depends.Plan | None = None
    sync: bool = False

    @property
    def plain(self) -> bool:
        """An `async def` with no dependencies: the consumer's fastest path."""
        return self.needs is None and not self.sync

    @classmethod
    def of(cls, handler: Handler) -> HandlerSignature:
        name = getattr(handler, "__qualname__", repr(handler))
        if inspect.isasyncgenfunction(handler) or inspect.isgeneratorfunction(handler):
            raise ConfigError(
                f"consumer {name}: the handler is a generator; write an `async def` (or a `def`, "
                "which runs in a worker thread) that returns"
            )
        if not callable(handler):
            raise ConfigError(f"consumer {name}: the handler must be a function")
        sync = not inspect.iscoroutinefunction(handler)
        hints = depends.hints_of(handler, f"consumer {name}")
        params = list(inspect.signature(handler).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional or _bare(hints.get(positional[0].name)) is Message:
            raise ConfigError(
                f"consumer {name}: the first parameter receives the message body; "
                "write `async def handler(body, message: Message)`"
            )
        message_param = None
        message_positional = False
        wanted = []
        for p in params[1:]:
            annotation = hints.get(p.name)
            if depends.marker(p, annotation) is not None or depends.is_app(_bare(annotation)):
                if p.kind is p.POSITIONAL_ONLY:
                    raise ConfigError(f"consumer {name}: parameter {p.name!r} is positional-only")
                wanted.append((p.name, p, annotation))
            elif _bare(annotation) is Message:
                message_param = p.name
                message_positional = p.kind == p.POSITIONAL_ONLY
            elif p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise ConfigError(
                    f"consumer {name}: parameter {p.name!r} has no default and is not annotated "
                    "`Message` or `App`, nor a `Depends(...)`; rabbitflow cannot supply it"
                )
        needs = depends.plan(f"consumer {name}", wanted)
        body = _bare(hints.get(positional[0].name))
        return cls(reader_for(body), message_param, message_positional, needs, sync)


def _bare(annotation: object) -> object:
    """`X` of `Annotated[X, ...]`; anything else as it is."""
    return typing.get_args(annotation)[0] if hasattr(annotation, "__metadata__") else annotation


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """One consumer of one queue, as the decorator validated it."""

    queue: str
    handler: Handler = field(compare=False)
    signature: HandlerSignature = field(compare=False)
    policy: RetryPolicy
    exchange: str | None = None
    exchange_type: str = "direct"
    routing_key: str | None = None
    queue_type: str = "quorum"
    prefetch: int | None = None
    concurrency: int | None = None
    handler_timeout: float | None = None
    breaker: Breaker | None = None
    decorator: str = field(default="app", compare=False)  # "router": declared on a Router
    publish_to: tuple[str, str] | None = None  # (exchange, routing_key) for the handler's results
    exactly_once: bool = False  # the handler runs through the app's outbox's inbox (rabbitflow.sql)
    partitions: int | None = None  # ordered partitions: Q.p0..Q.p<n-1>, one active replica each
    partition_key: Callable[[Any], object] | None = field(default=None, compare=False)

    @property
    def handler_name(self) -> str:
        """`module.qualname`, without the `<locals>` of a handler defined inside a function
        (`make_app.<locals>.on_order` reads `make_app.on_order`)."""
        module = getattr(self.handler, "__module__", "")
        qualname = getattr(self.handler, "__qualname__", repr(self.handler)).replace("<locals>.", "")
        return f"{module}.{qualname}" if module else qualname

    @property
    def binding_key(self) -> str:
        return self.queue if self.routing_key is None else self.routing_key


def build_spec(
    handler: Handler,
    queue: object,
    *,
    exchange: object,
    exchange_type: object,
    routing_key: object,
    retries: object,
    delay: object,
    retry_on: object,
    dont_retry: object,
    queue_type: object,
    prefetch: object,
    concurrency: object,
    handler_timeout: object,
    unknown: dict[str, Any],
    breaker: object = None,
    decorator: str = "app",
    publish_to: object = None,
    exactly_once: object = False,
    partitions: object = None,
    partition_key: object = None,
) -> ConsumerSpec:
    """Validate the decorator's options into a spec; every problem is a ConfigError."""
    where = f"@{decorator}.consumer({queue!r})"
    if unknown:
        raise ConfigError(
            f"{where}: unknown option(s) {', '.join(sorted(unknown))}; known: exchange, "
            "exchange_type, routing_key, retries, delay, retry_on, dont_retry, queue_type, "
            "prefetch, concurrency, handler_timeout, breaker, publish_to, exactly_once, partitions, "
            "partition_key"
        )
    try:
        queue = check_queue("queue", queue)
        if queue.startswith("amq."):
            raise ConfigError(f"queue={queue!r}: names starting with 'amq.' are reserved by RabbitMQ")
        if exchange is not None:
            exchange = check_name("exchange", exchange)
        if exchange_type not in EXCHANGE_TYPES:
            raise ConfigError(f"exchange_type={exchange_type!r}: expected one of {', '.join(EXCHANGE_TYPES)}")
        if routing_key is not None:
            routing_key = check_text("routing_key", routing_key, allow_empty=True)
            if exchange is None:
                raise ConfigError(f"routing_key={routing_key!r} needs exchange=...: it binds to one")
        if queue_type not in QUEUE_TYPES:
            raise ConfigError(f"queue_type={queue_type!r}: expected 'quorum' or 'classic'")
        policy = RetryPolicy.build(retries, delay, retry_on, dont_retry)
        if not isinstance(exactly_once, bool):
            raise ConfigError(f"exactly_once={exactly_once!r}: expected True or False")
        if exactly_once and publish_to is not None:
            raise ConfigError(
                "exactly_once=True with publish_to: a return value would be published after "
                "the transaction; stage onward messages with tx.publish(...) instead"
            )
        partitions = _partitions(partitions, partition_key, exchange_type, routing_key)
        signature = HandlerSignature.of(handler)
        return ConsumerSpec(
            queue=queue,
            handler=handler,
            signature=signature,
            policy=policy,
            exchange=exchange,
            exchange_type=str(exchange_type),
            routing_key=routing_key,
            queue_type=str(queue_type),
            prefetch=check_positive("prefetch", prefetch, maximum=AMQP_SHORT),
            concurrency=check_positive("concurrency", concurrency),
            handler_timeout=check_seconds("handler_timeout", handler_timeout, optional=True),
            breaker=_breaker(breaker),
            decorator=decorator,
            publish_to=_publish_to(publish_to),
            exactly_once=exactly_once,
            partitions=partitions,
            partition_key=partition_key,  # type: ignore[arg-type]  # checked by _partitions
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _breaker(value: object) -> Breaker | None:
    if value is None or isinstance(value, Breaker):
        return value
    raise ConfigError(f"breaker={value!r}: expected rabbitflow.Breaker(...) or None")


def _publish_to(value: object) -> tuple[str, str] | None:
    """`"routing_key"` (the default exchange) or `(exchange, routing_key)`."""
    if value is None:
        return None
    if isinstance(value, str):
        return "", check_text("publish_to", value)
    if isinstance(value, tuple) and len(value) == 2:
        exchange, routing_key = value
        exchange = "" if exchange == "" else check_name("publish_to's exchange", exchange)
        return exchange, check_text("publish_to's routing key", routing_key, allow_empty=True)
    raise ConfigError(f"publish_to={value!r}: expected a routing key or an (exchange, routing_key) pair")


MAX_PARTITIONS = 1024


def _partitions(
    partitions: object, partition_key: object, exchange_type: object, routing_key: object
) -> int | None:
    """`partitions=N`: N single-active-consumer queues; the routing key is the partition number."""
    if partitions is None:
        if partition_key is not None:
            raise ConfigError("partition_key=... needs partitions=N")
        return None
    if isinstance(partitions, bool) or not isinstance(partitions, int) or not 0 < partitions <= 1024:
        raise ConfigError(f"partitions={partitions!r}: expected a whole number from 1 to {MAX_PARTITIONS}")
    if partition_key is not None and not callable(partition_key):
        raise ConfigError(f"partition_key={partition_key!r}: expected a function of the body giving its key")
    if exchange_type != "direct":
        raise ConfigError(
            f"exchange_type={exchange_type!r}: a partitioned consumer's exchange is direct, "
            "with partition i bound by routing key 'i'"
        )
    if routing_key is not None:
        raise ConfigError(
            f"routing_key={routing_key!r}: a partitioned consumer's routing keys are the partition "
            "numbers; publish with key=... (or rabbitflow.partition(key, n))"
        )
    return partitions
