"""Tracing (SPEC §9): publish and process spans after the messaging conventions, with the trace
carried in the headers across retries, on RabbitMQ. A private TracerProvider per test: the global
one is never set."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from rabbitflow import App, Message, Unroutable
from rabbitflow.opentelemetry import TelemetryMiddleware
from rabbitflow.prometheus import PrometheusMiddleware
from rabbitflow.testing import TestClient

from ..helpers import Admin, unique, wait_for


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def spans(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_every_attempt_is_a_child_of_the_publish_span(
    make_app: Callable[..., App], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(middleware=[TelemetryMiddleware(provider)])
    queue = unique("otel")
    seen: list[str] = []

    @app.consumer(queue, retries=2, delay=0.2, queue_type="classic")
    async def handle(body: dict[str, int], message: Message) -> None:
        seen.append(message.headers["traceparent"])
        if message.attempt < 3:
            raise ValueError(f"attempt {message.attempt} failed")

    async with app:
        await app.publish({"n": 1}, routing_key=queue, message_id="m-1")
        await wait_for(lambda: len(spans(exporter, f"process {queue}")) == 3, timeout=15)

    (publish,) = spans(exporter, f"publish {queue}")
    assert publish.kind is SpanKind.PRODUCER
    assert publish.parent is None
    assert publish.attributes == {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": "",  # the default exchange
        "messaging.rabbitmq.destination.routing_key": queue,
        "messaging.message.id": "m-1",
        "messaging.message.body.size": len(b'{"n":1}'),
    }
    context = publish.get_span_context()
    # Retry copies kept the producer's traceparent: W3C, naming the publish span.
    (traceparent,) = set(seen)
    assert traceparent.startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")

    attempts = sorted(
        spans(exporter, f"process {queue}"), key=lambda s: int(s.attributes["rabbitflow.attempt"])
    )
    assert [s.attributes["rabbitflow.attempt"] for s in attempts] == [1, 2, 3]
    for span in attempts:
        assert span.kind is SpanKind.CONSUMER
        assert span.context.trace_id == context.trace_id
        assert span.parent is not None
        assert span.parent.span_id == context.span_id
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.operation.type"] == "process"
        assert span.attributes["messaging.destination.subscription.name"] == queue
        # Where it was published, also for the copies that came back through the retry exchange.
        assert span.attributes["messaging.destination.name"] == ""
        assert span.attributes["messaging.rabbitmq.destination.routing_key"] == queue
        assert span.attributes["messaging.message.id"] == "m-1"
    first, second, third = attempts
    for failed, n in ((first, 1), (second, 2)):
        assert failed.status.status_code is StatusCode.ERROR
        assert failed.attributes["error.type"] == "builtins.ValueError"
        assert failed.attributes["rabbitflow.outcome"] == "retried"
        assert failed.attributes["rabbitflow.retry.delay"] == 0.2
        (event,) = failed.events
        assert event.name == "exception"
        assert event.attributes["exception.message"] == f"attempt {n} failed"
    assert third.status.status_code is StatusCode.UNSET
    assert third.attributes["rabbitflow.outcome"] == "handled"
    assert "error.type" not in third.attributes
    assert not third.events


async def test_a_publish_inside_a_handler_is_a_child_of_its_process_span(
    make_app: Callable[..., App], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(middleware=[TelemetryMiddleware(provider)])
    first, second = unique("otel"), unique("otel")
    done: list[int] = []

    @app.consumer(first, queue_type="classic")
    async def forward(body: dict[str, int]) -> None:
        await app.publish({"n": body["n"] + 1}, routing_key=second)

    @app.consumer(second, queue_type="classic")
    async def finish(body: dict[str, int]) -> None:
        done.append(body["n"])

    tracer = provider.get_tracer("test")
    async with app:
        with tracer.start_as_current_span("checkout") as root:
            await app.publish({"n": 1}, routing_key=first)
        await wait_for(lambda: len(spans(exporter, f"process {second}")) == 1)

    (publish_1,) = spans(exporter, f"publish {first}")
    (process_1,) = spans(exporter, f"process {first}")
    (publish_2,) = spans(exporter, f"publish {second}")
    (process_2,) = spans(exporter, f"process {second}")
    chain = [publish_1, process_1, publish_2, process_2]
    parents = [root.get_span_context().span_id, *(s.context.span_id for s in chain[:-1])]
    assert [s.parent.span_id if s.parent else None for s in chain] == parents
    assert {s.context.trace_id for s in chain} == {root.get_span_context().trace_id}
    assert done == [2]


async def test_undecodable_and_parked_deliveries_and_unroutable_publishes_are_errors(
    make_app: Callable[..., App], admin: Admin, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(middleware=[TelemetryMiddleware(provider)])
    queue = unique("otel")

    @app.consumer(queue, retries=0, queue_type="classic")
    async def handle(body: dict[str, int]) -> None:
        raise KeyError("no such order")

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        await admin.publish(b"{not json", routing_key=queue, content_type="application/json")
        with pytest.raises(Unroutable):
            await app.publish({"n": 2}, exchange="amq.direct", routing_key="nobody")
        await wait_for(lambda: len(spans(exporter, f"process {queue}")) == 2)
        await wait_for(lambda: app.health()["consumers"][0]["in_flight"] == 0)

    by_reason = {s.attributes["rabbitflow.parked.reason"]: s for s in spans(exporter, f"process {queue}")}
    exhausted, undecodable = by_reason["exhausted"], by_reason["decode-error"]
    (publish,) = spans(exporter, f"publish {queue}")
    assert exhausted.parent is not None
    assert exhausted.parent.span_id == publish.context.span_id
    assert exhausted.status.status_code is StatusCode.ERROR
    assert exhausted.attributes["error.type"] == "builtins.KeyError"
    assert exhausted.attributes["rabbitflow.outcome"] == "parked"
    # Published behind rabbitflow's back, without a trace: a process span of its own.
    assert undecodable.parent is None
    assert undecodable.status.status_code is StatusCode.ERROR
    assert undecodable.attributes["error.type"] == "rabbitflow.errors.DecodeError"
    assert undecodable.attributes["rabbitflow.outcome"] == "parked"

    (lost,) = spans(exporter, "publish amq.direct")
    assert lost.status.status_code is StatusCode.ERROR
    assert lost.attributes["error.type"] == "rabbitflow.errors.Unroutable"
    assert lost.attributes["messaging.destination.name"] == "amq.direct"

    # The parked copy still carries the publisher's trace.
    parked = {
        m.header.properties.headers["x-rf-reason"]: m.header.properties.headers
        for m in await admin.drain(f"{queue}.parked")
    }
    traceparent = parked["exhausted"]["traceparent"]
    traceparent = traceparent.decode() if isinstance(traceparent, bytes) else str(traceparent)
    assert traceparent.split("-")[2] == f"{publish.context.span_id:016x}"


async def test_a_timed_out_attempt_and_one_cut_short_by_a_stop_each_end_their_span(
    make_app: Callable[..., App], provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = make_app(middleware=[TelemetryMiddleware(provider)], graceful_timeout=0.3)
    slow, stuck = unique("otel"), unique("otel")
    started: list[str] = []

    @app.consumer(slow, retries=0, handler_timeout=0.1, queue_type="classic")
    async def too_slow(body: object) -> None:
        await asyncio.sleep(10)

    @app.consumer(stuck, queue_type="classic")
    async def never_ends(body: object) -> None:
        started.append("stuck")
        await asyncio.sleep(60)

    async with app:
        await app.publish({"n": 1}, routing_key=slow)
        await app.publish({"n": 1}, routing_key=stuck)
        await wait_for(lambda: len(spans(exporter, f"process {slow}")) == 1 and started == ["stuck"])

    (timed_out,) = spans(exporter, f"process {slow}")
    assert timed_out.attributes["error.type"] == "builtins.TimeoutError"
    assert timed_out.attributes["rabbitflow.outcome"] == "parked"
    assert timed_out.attributes["rabbitflow.parked.reason"] == "exhausted"
    (cut_short,) = spans(exporter, f"process {stuck}")
    assert cut_short.status.status_code is StatusCode.ERROR
    assert cut_short.attributes["error.type"] == "asyncio.exceptions.CancelledError"
    assert cut_short.attributes["rabbitflow.outcome"] == "abandoned"


async def test_tracing_and_metrics_together_in_virtual_time(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    # Both middlewares on one app, on the in-memory broker (TestClient) with 60 s retry delays.
    registry = CollectorRegistry()
    metrics = PrometheusMiddleware(registry)
    app = App("orders", url="memory://", middleware=[metrics, TelemetryMiddleware(provider)])
    metrics.bind(app)

    @app.consumer("orders.created", retries=2, delay=60)
    async def handle(body: dict[str, int], message: Message) -> None:
        if message.attempt < 3:
            raise ConnectionError("inventory down")

    async with TestClient(app) as client:
        await app.publish({"id": 1}, routing_key="orders.created")
        await client.drain()

    (publish,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    attempts = spans(exporter, "process orders.created")
    assert sorted(s.attributes["rabbitflow.outcome"] for s in attempts) == ["handled", "retried", "retried"]
    assert {s.parent.span_id for s in attempts if s.parent} == {publish.context.span_id}
    labels = {"app_name": "orders", "broker": "rabbitmq", "handler": "orders.created"}
    processed = "rabbitflow_received_processed_messages_total"
    assert registry.get_sample_value(processed, {**labels, "status": "nacked"}) == 2
    assert registry.get_sample_value(processed, {**labels, "status": "acked"}) == 1
    assert (
        registry.get_sample_value(
            "rabbitflow_retries_total", {"app_name": "orders", "queue": "orders.created", "delay": "60"}
        )
        == 2
    )
