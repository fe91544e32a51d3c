"""The consumer registry: `@app.consumer` records and validates each consumer, and the plan
(the topology they need) follows from it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

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
            if spec.queue in self._consumers:
                raise ConfigError(
                    f"@app.consumer({spec.queue!r}): queue {spec.queue!r} already has a consumer "
                    f"({self._consumers[spec.queue].handler_name}); one queue, one consumer"
                )
            plan = compile_plan(self.name, [*self._consumers.values(), spec])
            self._registering()
            self._consumers[spec.queue] = spec
            self._plan = plan
            return handler

        return register

    @property
    def consumers(self) -> tuple[ConsumerSpec, ...]:
        return tuple(self._consumers.values())

    @property
    def plan(self) -> Plan:
        """The topology this service needs (pure; no broker involved)."""
        return self._plan
