"""OpenTelemetry tracing after the messaging semantic conventions.

    app = App("orders", middleware=[TelemetryMiddleware()])

Each `app.publish` is a PRODUCER span `publish <exchange>` (for the default exchange:
`publish <routing key>`) whose context goes out in the message's headers (W3C `traceparent`,
through the configured propagator). Each delivery is a CONSUMER span `process <queue>`, a child of
the publisher's span, current while the handler runs (a publish inside the handler is its child)
and ended once the delivery's fate is known. Retry and parked copies keep the producer's headers,
so every attempt of a message is a child of the one span that published it; `rabbitflow.attempt`
says which attempt a span is.

Needs `opentelemetry-api` (`pip install rabbitflow[opentelemetry]`) and an SDK to export
anything; `import rabbitflow` alone never imports it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from rabbitflow import __version__, names
from rabbitflow.message import Message
from rabbitflow.middleware.base import Fate, Middleware, Outcome, Outgoing
from rabbitflow.runtime.copies import describe

__all__ = ["TelemetryMiddleware"]

_SCOPE = "rabbitflow"
_SCHEMA = "https://opentelemetry.io/schemas/1.26.0"

# Attribute names (semantic conventions 1.26+; messaging is still "development" there).
SYSTEM = "messaging.system"
OPERATION_TYPE = "messaging.operation.type"
OPERATION_NAME = "messaging.operation.name"
DESTINATION = "messaging.destination.name"
SUBSCRIPTION = "messaging.destination.subscription.name"
ROUTING_KEY = "messaging.rabbitmq.destination.routing_key"
MESSAGE_ID = "messaging.message.id"
CONVERSATION_ID = "messaging.message.conversation_id"
BODY_SIZE = "messaging.message.body.size"
ERROR_TYPE = "error.type"
# rabbitflow's own.
ATTEMPT = "rabbitflow.attempt"
OUTCOME = "rabbitflow.outcome"
RETRY_DELAY = "rabbitflow.retry.delay"
PARKED_REASON = "rabbitflow.parked.reason"


class TelemetryMiddleware(Middleware):
    """Traces what the app publishes and processes."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        """
        Args:
            tracer_provider: where spans go; the global one (`opentelemetry.trace`) when None.
            propagator: how the context is written to and read from message headers; the global
                one (`opentelemetry.propagate`, W3C trace context and baggage by default) when None.
        """
        self._tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider, schema_url=_SCHEMA)
        self._propagator = propagator
        # The process span of the attempt that just ran in this task, until its `settled`.
        self._open: contextvars.ContextVar[tuple[Message, Span, bool] | None] = contextvars.ContextVar(
            "rabbitflow_process_span", default=None
        )

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, outgoing: Outgoing, call_next: Callable[[], Awaitable[None]]) -> None:
        exchange, routing_key = outgoing.exchange, outgoing.routing_key
        attributes: dict[str, Any] = {
            SYSTEM: "rabbitmq",
            OPERATION_TYPE: "send",
            OPERATION_NAME: "publish",
            DESTINATION: exchange,
            BODY_SIZE: len(outgoing.body),
        }
        if routing_key:
            attributes[ROUTING_KEY] = routing_key
        if outgoing.message_id:
            attributes[MESSAGE_ID] = outgoing.message_id
        span = self._tracer.start_span(
            f"publish {exchange or routing_key}", kind=SpanKind.PRODUCER, attributes=attributes
        )
        token = context.attach(trace.set_span_in_context(span))
        try:
            self._inject(outgoing.headers)
            await call_next()
        except BaseException as exc:
            _failed(span, exc)
            raise
        finally:
            context.detach(token)
            span.end()

    # -- consuming -----------------------------------------------------------------------------

    async def attempt(self, message: Message, call_next: Callable[[], Awaitable[Any]]) -> Any:
        parent = self._extract(message.headers)
        span = self._process_span(message, parent)
        token = context.attach(trace.set_span_in_context(span, parent))
        try:
            result = await call_next()
        except asyncio.CancelledError as exc:
            # A handler_timeout (`settled` follows with a TimeoutError) or a shutdown (nothing
            # follows: the delivery's task ends, and the span with it).
            self._open.set((message, span, True))
            task = asyncio.current_task()
            if task is not None:
                task.add_done_callback(functools.partial(_end_abandoned, span, exc))
            raise
        except BaseException as exc:
            _failed(span, exc)
            self._open.set((message, span, False))
            raise
        finally:
            context.detach(token)
        self._open.set((message, span, False))
        return result

    def settled(self, message: Message, outcome: Outcome) -> None:
        # `settled` follows its `attempt` in the same task, with no await in between.
        pending = self._open.get()
        if pending is not None and pending[0] is message:
            _, span, cancelled = pending
            self._open.set(None)
            if cancelled and outcome.exception is not None:
                _failed(span, outcome.exception)
        else:
            # No attempt ran (an undecodable body, the delivery limit): a process span all the same.
            span = self._process_span(message, self._extract(message.headers))
            if outcome.exception is not None:
                _failed(span, outcome.exception)
            else:
                span.set_status(Status(StatusCode.ERROR, outcome.reason or outcome.fate.value))
        span.set_attribute(OUTCOME, outcome.fate.value)
        if outcome.fate is Fate.RETRIED and outcome.delay is not None:
            span.set_attribute(RETRY_DELAY, outcome.delay)
        elif outcome.fate is Fate.PARKED and outcome.reason:
            span.set_attribute(PARKED_REASON, outcome.reason)
        span.end()

    def _process_span(self, message: Message, parent: context.Context) -> Span:
        headers = message.headers
        # A retry copy comes through the service's retry exchange: name where it was published.
        exchange = (
            headers.get(names.ORIGINAL_EXCHANGE, message.exchange)
            if message.attempt > 1
            else message.exchange
        )
        routing_key = (
            headers.get(names.ORIGINAL_ROUTING_KEY, message.routing_key)
            if message.attempt > 1
            else message.routing_key
        )
        attributes: dict[str, Any] = {
            SYSTEM: "rabbitmq",
            OPERATION_TYPE: "process",
            OPERATION_NAME: "process",
            DESTINATION: str(exchange),
            SUBSCRIPTION: message.queue,
            BODY_SIZE: len(message.body),
            ATTEMPT: message.attempt,
        }
        if routing_key:
            attributes[ROUTING_KEY] = str(routing_key)
        if message.message_id:
            attributes[MESSAGE_ID] = message.message_id
        if message.correlation_id:
            attributes[CONVERSATION_ID] = message.correlation_id
        return self._tracer.start_span(
            f"process {message.queue}", context=parent, kind=SpanKind.CONSUMER, attributes=attributes
        )

    # -- propagation ---------------------------------------------------------------------------

    def _inject(self, headers: dict[str, Any]) -> None:
        if self._propagator is None:
            propagate.inject(headers)
        else:
            self._propagator.inject(headers)

    def _extract(self, headers: Mapping[str, Any]) -> context.Context:
        # An empty context, not the current one: a delivery's parent is its publisher, or nothing.
        empty = context.Context()
        if self._propagator is None:
            return propagate.extract(headers, context=empty, getter=_HEADERS)
        return self._propagator.extract(headers, context=empty, getter=_HEADERS)


class _Headers(Getter[Mapping[str, Any]]):
    """Reads an AMQP header table, whose strings may arrive as bytes."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        if isinstance(value, bytes):
            return [value.decode("utf-8", "replace")]
        return [str(value)]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return list(carrier)


_HEADERS = _Headers()


def _end_abandoned(span: Span, exc: BaseException, task: object) -> None:
    """The delivery's task ended without `settled` (a shutdown or a lost session cancelled it)."""
    if span.is_recording():
        _failed(span, exc)
        span.set_attribute(OUTCOME, "abandoned")
        span.end()


def _failed(span: Span, exc: BaseException) -> None:
    kind = type(exc)
    span.record_exception(exc)
    span.set_attribute(ERROR_TYPE, f"{kind.__module__}.{kind.__qualname__}")
    span.set_status(Status(StatusCode.ERROR, f"{kind.__name__}: {describe(exc)}"))
