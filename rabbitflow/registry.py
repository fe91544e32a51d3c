"""The consumer registry: `@app.consumer` records and validates each consumer, and the plan
(the topology they need) follows from it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from . import names
from .breaker import Breaker
from .errors import ConfigError
from .spec import ConsumerSpec, Handler, build_spec
from .topology.compiler import Plan, compile_plan

__all__ = ["Registry"]

H = TypeVar("H", bound=Handler)


class Registry:
    """The consumers of service `name`, by queue, and their compiled plan."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._consumers: dict[str, ConsumerSpec] = {}
        # Queue Q -> a consumer whose queue is one of Q's derived names (Q.parked, Q.retry.*).
        self._derived: dict[str, ConsumerSpec] = {}
        self._plan = compile_plan(name, ())

    def _registering(self) -> None:
        """Called before a consumer is added; raise to refuse it."""

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

        Every option is checked here, when the module is imported: a bad value, an unknown
        option or a second consumer of the same queue raises `ConfigError`.
        """

        def register(handler: H) -> H:
            spec = build_spec(
                handler,
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
            )
            self._check_names(spec)
            plan = compile_plan(self.name, [*self._consumers.values(), spec])
            self._registering()
            self._consumers[spec.queue] = spec
            for base in names.derived_from(spec.queue):
                self._derived.setdefault(base, spec)
            self._plan = plan
            return handler

        return register

    def _check_names(self, spec: ConsumerSpec) -> None:
        """A new consumer's names may not be another's: its queue, or a name derived from it."""
        where = f"@app.consumer({spec.queue!r})"
        dlx = names.dead_letter_exchange(self.name)
        if spec.exchange == dlx:
            raise ConfigError(
                f"{where}: exchange {dlx!r} is service {self.name!r}'s own dead-letter exchange, "
                "which carries its retries and parked messages; bind to an exchange of your own"
            )
        other = self._consumers.get(spec.queue)
        if other is not None:
            raise ConfigError(
                f"{where}: queue {spec.queue!r} already has a consumer ({other.handler_name}); "
                "one queue, one consumer"
            )
        pairs = [(spec, self._consumers[q]) for q in names.derived_from(spec.queue) if q in self._consumers]
        pairs += [(self._derived[spec.queue], spec)] if spec.queue in self._derived else []
        if pairs:
            derived, base = pairs[0]
            raise ConfigError(
                f"{where}: queue {derived.queue!r} (consumer {derived.handler_name}) is a name "
                f"rabbitflow derives for queue {base.queue!r} (consumer {base.handler_name}): its "
                f"parking queue is {names.parked_queue(base.queue)!r} and its retry queues are "
                f"{names.retry_prefix(base.queue)}<delay>; rename one of the two queues"
            )

    @property
    def consumers(self) -> tuple[ConsumerSpec, ...]:
        return tuple(self._consumers.values())

    @property
    def plan(self) -> Plan:
        """The topology this service needs (pure; no broker involved)."""
        return self._plan
