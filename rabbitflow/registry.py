"""The consumer registry: `@app.consumer` and `@router.consumer` record and validate each
consumer, `include_router` adds a router's consumers to an app under the same checks, and the
plan (the topology the app's consumers need) follows from them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from rabbitflow import names
from rabbitflow.breaker import Breaker
from rabbitflow.errors import ConfigError
from rabbitflow.spec import ConsumerSpec, Handler, build_spec
from rabbitflow.topology.compiler import (
    ExchangePlan,
    Plan,
    compile_plan,
    merge_exchanges,
    partition_exchange,
)

__all__ = ["Consumers", "Registry", "Router"]

H = TypeVar("H", bound=Handler)


class Consumers:
    """Consumers by queue, each checked against the others when it is added; what an App and a
    Router have in common."""

    _decorator = "app"  # how the decorator reads in error messages: @app.consumer(...)

    def __init__(self) -> None:
        self._consumers: dict[str, ConsumerSpec] = {}
        # Queue Q -> a consumer whose queue is one of Q's derived names (Q.parked, Q.retry.*).
        self._derived: dict[str, ConsumerSpec] = {}

    def consumer(
        self,
        queue: str,
        *,
        exchange: str | None = None,
        exchange_type: str = "direct",
        routing_key: str | None = None,
        retries: int = 3,
        delay: float | Sequence[float] = 10.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        dont_retry: type[BaseException] | tuple[type[BaseException], ...] = (),
        queue_type: str = "quorum",
        prefetch: int | None = None,
        concurrency: int | None = None,
        handler_timeout: float | None = None,
        breaker: Breaker | None = None,
        publish_to: str | tuple[str, str] | None = None,
        exactly_once: bool = False,
        partitions: int | None = None,
        partition_key: Callable[[Any], object] | None = None,
        **unknown: Any,
    ) -> Callable[[H], H]:
        """Register an async function as the consumer of `queue`.

        Args:
            queue: the queue's name, used verbatim.
            exchange: declare this durable exchange and bind the queue to it.
            exchange_type: "direct", "fanout", "topic" or "headers".
            routing_key: the binding key (default: the queue's name).
            retries: retries after the first attempt; the handler runs at most retries + 1 times.
            delay: seconds before a retry: a number, or a ladder [d1, d2, ...] where retry k
                waits d_k and the last value repeats. Each distinct delay is one TTL queue.
            retry_on: exceptions that are retried; others park the message at once.
            dont_retry: exceptions that are never retried, even when they match `retry_on`.
            queue_type: "quorum" (default; at-least-once dead-lettering) or "classic".
            prefetch: this consumer's prefetch (default: the app's).
            concurrency: handlers of this consumer running at once (default: the app's).
            handler_timeout: seconds before a running handler is cancelled and its attempt fails
                with TimeoutError (default: the app's).
            breaker: a `Breaker` that pauses this consumer while most attempts fail (its
                downstream is down), so an outage parks nothing (default: the app's, if any).
            publish_to: a routing key (on the default exchange) or an (exchange, routing_key)
                pair: the handler's return value, when not None, is published there, and the
                input is acked only once the broker confirmed it (a failed publish is a failed
                attempt). Without it, a return value answers a request (`reply_to` set).
            exactly_once: run the handler `(body, tx: Transaction[, message])` in a database
                transaction of the app's outbox that also records the message id, acked after
                the commit: its database effects happen once per message id, a duplicate is
                acked without calling it (`rabbitflow.sql`, docs/effectively-once.md).
            partitions: ordered partitions (docs/partitions.md): N single-active-consumer queues
                `queue.p0`..`queue.p<N-1>` behind a direct exchange (`exchange`, default: the
                queue's name), routed by `rabbitflow.partition(key, N)`. One key's messages are
                handled one at a time in publish order; the partitions spread over the app's
                replicas; a failing message is retried in place (the partition waits), then parked.
            partition_key: a function of the body giving its key, so that
                `app.publish(body, exchange=...)` finds the partition by itself.

        Every option is checked here, when the module is imported: a bad value, an unknown
        option or a second consumer of the same queue raises `ConfigError`. The handler's body
        annotation is checked too (a pydantic model, dataclass or TypedDict is compiled into
        its validator now, not per message).
        """

        def register(handler: H) -> H:
            runs: Handler = handler
            if exactly_once is True and publish_to is None:
                # Only these consumers import SQLAlchemy (the rabbitflow[sql] extra).
                from rabbitflow.sql.inbox import exactly_once as through_inbox

                runs = through_inbox(handler)
            spec = build_spec(
                runs,
                queue,
                exchange=exchange,
                exchange_type=exchange_type,
                routing_key=routing_key,
                retries=retries,
                delay=delay,
                retry_on=retry_on,
                dont_retry=dont_retry,
                queue_type=queue_type,
                prefetch=prefetch,
                concurrency=concurrency,
                handler_timeout=handler_timeout,
                unknown=unknown,
                breaker=breaker,
                decorator=self._decorator,
                publish_to=publish_to,
                exactly_once=exactly_once,
                partitions=partitions,
                partition_key=partition_key,
            )
            self._add([spec])
            return handler

        return register

    def include_router(self, router: Router) -> None:
        """Add every consumer declared on `router` so far, checked exactly as if it had been
        declared here: a queue that already has a consumer, a name derived from another
        consumer's queue, or an exchange used with two types raises `ConfigError`, and then
        none of the router's consumers is added. Options a consumer left unset (prefetch,
        concurrency, handler_timeout, breaker) take the app's defaults when it starts, as for a
        consumer declared on the app. A router may be included in several apps; once included,
        it takes no more consumers."""
        if not isinstance(router, Router):
            raise ConfigError(f"include_router({router!r}): expected a rabbitflow.Router")
        if router is self:
            raise ConfigError("a router cannot include itself")
        try:
            self._add(router.consumers)
        except ConfigError as exc:
            raise ConfigError(f"{self._decorator}.include_router({router!r}): {exc}") from None
        router._included = True

    def _add(self, specs: Iterable[ConsumerSpec]) -> None:
        """Check `specs` against the consumers so far and each other; add all of them or none."""
        consumers = dict(self._consumers)
        derived = dict(self._derived)
        for spec in specs:
            self._check(spec, consumers, derived)
            consumers[spec.queue] = spec
            for base in names.derived_from(spec.queue):
                derived.setdefault(base, spec)
        self._accept(consumers)
        self._consumers, self._derived = consumers, derived

    def _accept(self, consumers: dict[str, ConsumerSpec]) -> None:
        """Called with the consumers as they would be after an addition; raise to refuse it."""

    def _check(
        self, spec: ConsumerSpec, consumers: dict[str, ConsumerSpec], derived: dict[str, ConsumerSpec]
    ) -> None:
        """A new consumer's names may not be another's: its queue, or a name derived from it;
        and one exchange has one type."""
        where = f"@{spec.decorator}.consumer({spec.queue!r})"
        other = consumers.get(spec.queue)
        if other is not None:
            raise ConfigError(
                f"{where}: queue {spec.queue!r} already has a consumer ({other.handler_name}); "
                "one queue, one consumer"
            )
        pairs = [(spec, consumers[q]) for q in names.derived_from(spec.queue) if q in consumers]
        pairs += [(derived[spec.queue], spec)] if spec.queue in derived else []
        if pairs:
            clash, base = pairs[0]
            raise ConfigError(
                f"{where}: queue {clash.queue!r} (consumer {clash.handler_name}) is a name "
                f"rabbitflow derives for queue {base.queue!r} (consumer {base.handler_name}): its "
                f"parking queue is {names.parked_queue(base.queue)!r} and its retry queues are "
                f"{names.retry_prefix(base.queue)}<delay>; rename one of the two queues"
            )
        if spec.partitions is not None:
            exchange = partition_exchange(spec)
            for other in consumers.values():
                if (
                    other.partitions is not None
                    and other.partitions != spec.partitions
                    and partition_exchange(other) == exchange
                ):
                    raise ConfigError(
                        f"{where}: exchange {exchange!r} routes to {other.handler_name}'s "
                        f"{other.partitions} partitions, so its producers route by "
                        f"partition(key, {other.partitions}); partitions={spec.partitions} here would "
                        "leave partitions no key reaches, or keys no partition takes: give both the "
                        "same count, or this one an exchange of its own"
                    )
        if spec.exchange is None:
            return
        for other in consumers.values():
            if other.exchange == spec.exchange and other.exchange_type != spec.exchange_type:
                raise ConfigError(
                    f"{where}: exchange {spec.exchange!r} is {other.exchange_type!r} for "
                    f"{other.handler_name} and {spec.exchange_type!r} here; give every consumer of "
                    "one exchange the same exchange_type"
                )

    @property
    def consumers(self) -> tuple[ConsumerSpec, ...]:
        return tuple(self._consumers.values())


class Router(Consumers):
    """Consumers declared apart from the app, so that a large service splits across modules:

        router = Router()

        @router.consumer("orders.created", exchange="orders", routing_key="order.created")
        async def on_created(order: Order) -> None: ...

        app.include_router(router)   # in the module that makes the App

    `@router.consumer` takes exactly the options of `@app.consumer` and checks them, and the
    router's queues against each other, when it runs; the checks that need the service (its
    dead-letter exchange, the app's other consumers) run at `app.include_router(router)`.
    """

    _decorator = "router"

    def __init__(self) -> None:
        super().__init__()
        self._included = False

    def _accept(self, consumers: dict[str, ConsumerSpec]) -> None:
        if self._included:
            raise ConfigError(
                f"{self!r} was already included (app.include_router): its consumers were copied "
                "then, so a later one would never run; declare every consumer of a router before "
                "including it"
            )

    def __repr__(self) -> str:
        queues = ", ".join(sorted(self._consumers)) or "no consumers"
        return f"Router({queues})"


class Registry(Consumers):
    """The consumers of service `name`, by queue, and their compiled plan."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self._plan: Plan | None = compile_plan(name, ())
        self._exchanges: dict[str, ExchangePlan] = {}  # of the consumers so far, by name

    def _registering(self) -> None:
        """Called before consumers are added; raise to refuse them."""

    def _check(
        self, spec: ConsumerSpec, consumers: dict[str, ConsumerSpec], derived: dict[str, ConsumerSpec]
    ) -> None:
        dlx = names.dead_letter_exchange(self.name)
        if spec.exchange == dlx:
            raise ConfigError(
                f"@{spec.decorator}.consumer({spec.queue!r}): exchange {dlx!r} is service "
                f"{self.name!r}'s own dead-letter exchange, which carries its retries and parked "
                "messages; bind to an exchange of your own"
            )
        super()._check(spec, consumers, derived)

    def _accept(self, consumers: dict[str, ConsumerSpec]) -> None:
        # Compile what is new, checked now (at import) against the exchanges of the consumers so
        # far: a dead-letter route found for a consumer stays found when others are added, so the
        # whole plan needs compiling only once, when asked for. n consumers cost n, not n².
        added = [spec for queue, spec in consumers.items() if queue not in self._consumers]
        exchanges = merge_exchanges(self._exchanges, compile_plan(self.name, added).exchanges)
        self._registering()
        self._exchanges = exchanges
        self._plan = None

    @property
    def plan(self) -> Plan:
        """The topology this service needs (pure; no broker involved)."""
        if self._plan is None:
            self._plan = compile_plan(self.name, self._consumers.values())
        return self._plan
