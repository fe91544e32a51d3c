"""Prometheus metrics (SPEC §9): FastStream's names and labels under `rabbitflow`, and
rabbitflow's own, scraped from a registry after a real app ran on RabbitMQ."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from rabbitflow import App, Breaker, ConfigError, Reject, Unroutable
from rabbitflow.prometheus import PrometheusMiddleware

from ..helpers import Admin, unique, wait_for


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_consuming_and_publishing_counted_with_faststream_names_and_labels(
    make_app: Callable[..., App], admin: Admin
) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMiddleware(registry)
    app = make_app(middleware=[metrics])
    metrics.bind(app)
    queue = unique("prom")
    done: list[str] = []

    @app.consumer(queue, retries=1, delay=0.2, queue_type="classic")
    async def handle(body: dict[str, str]) -> None:
        done.append(body["do"])
        if body["do"] == "fail":
            raise ValueError("downstream said no")
        if body["do"] == "reject":
            raise Reject("not ours")

    async with app:
        for do in ("ok", "ok", "fail", "reject"):
            await app.publish({"do": do}, routing_key=queue)
        await admin.publish(b"{not json", routing_key=queue, content_type="application/json")
        with pytest.raises(Unroutable):
            await app.publish({"do": "lost"}, routing_key=(nobody := unique("nobody")))
        c = {"app_name": app.name, "broker": "rabbitmq", "handler": queue}
        # 4 first deliveries + the undecodable one + the failing one's retry.
        await wait_for(
            lambda: (
                value(
                    registry,
                    "rabbitflow_parked_messages_total",
                    app_name=app.name,
                    queue=queue,
                    reason="exhausted",
                )
                == 1
            ),
            timeout=15,
        )
        assert (
            "# TYPE rabbitflow_received_processed_messages_total counter"
            in generate_latest(registry).decode()
        )

        assert value(registry, "rabbitflow_received_messages_total", **c) == 6
        assert value(registry, "rabbitflow_received_messages_size_bytes_count", **c) == 6
        assert value(registry, "rabbitflow_received_messages_size_bytes_sum", **c) == (
            2 * len(b'{"do":"ok"}') + 2 * len(b'{"do":"fail"}') + len(b'{"do":"reject"}') + len(b"{not json")
        )
        assert value(registry, "rabbitflow_received_messages_in_process", **c) == 0
        # The undecodable one never reached the handler: 5 handler calls timed.
        assert value(registry, "rabbitflow_received_processed_messages_duration_seconds_count", **c) == 5
        status = {
            s: value(registry, "rabbitflow_received_processed_messages_total", **c, status=s)
            for s in ("acked", "nacked", "rejected", "error")
        }
        # ok x2 acked; fail: retried (nacked) then exhausted (error); reject: rejected;
        # the undecodable one: error.
        assert status == {"acked": 2, "nacked": 1, "rejected": 1, "error": 2}
        exceptions = {
            kind: value(
                registry, "rabbitflow_received_processed_messages_exceptions_total", **c, exception_type=kind
            )
            for kind in ("ValueError", "DecodeError", "Reject")
        }
        assert exceptions == {"ValueError": 2, "DecodeError": 1, "Reject": None}  # Reject is no error

        assert value(registry, "rabbitflow_retries_total", app_name=app.name, queue=queue, delay="0.2") == 1
        parked = {
            reason: value(
                registry, "rabbitflow_parked_messages_total", app_name=app.name, queue=queue, reason=reason
            )
            for reason in ("exhausted", "rejected", "decode-error")
        }
        assert parked == {"exhausted": 1, "rejected": 1, "decode-error": 1}

        p = {"app_name": app.name, "broker": "rabbitmq", "destination": f"default.{queue}"}
        assert value(registry, "rabbitflow_published_messages_total", **p, status="success") == 4
        assert value(registry, "rabbitflow_published_messages_duration_seconds_count", **p) == 4
        lost = {**p, "destination": f"default.{nobody}"}
        assert value(registry, "rabbitflow_published_messages_total", **lost, status="error") == 1
        assert value(registry, "rabbitflow_published_messages_total", **lost, status="success") == 0
        assert (
            value(
                registry,
                "rabbitflow_published_messages_exceptions_total",
                **lost,
                exception_type="Unroutable",
            )
            == 1
        )

        # Health, read at scrape time (the last parked copy's confirm ends its delivery).
        await wait_for(lambda: app.health()["consumers"][0]["in_flight"] == 0)
        assert value(registry, "rabbitflow_connected", app_name=app.name) == 1
        assert value(registry, "rabbitflow_healthy", app_name=app.name) == 1
        assert value(registry, "rabbitflow_reconnects_total", app_name=app.name) == 0
        q = {"app_name": app.name, "queue": queue}
        assert value(registry, "rabbitflow_consumer_stalled", **q) == 0
        assert value(registry, "rabbitflow_consumer_paused", **q) == 0
        assert value(registry, "rabbitflow_consumer_subscribed", **q) == 1
        assert value(registry, "rabbitflow_consumer_in_flight", **q) == 0
    assert value(registry, "rabbitflow_connected", app_name=app.name) == 0
    assert value(registry, "rabbitflow_consumer_stalled", app_name=app.name, queue=queue) is None


async def test_a_scrape_from_another_thread_reads_health_on_the_apps_loop(
    make_app: Callable[..., App],
) -> None:
    # prometheus_client.start_http_server scrapes from a thread of its own.
    registry = CollectorRegistry()
    metrics = PrometheusMiddleware(registry, app_name="orders")
    app = make_app(middleware=[metrics])
    metrics.bind(app)
    queue = unique("prom")

    @app.consumer(queue, queue_type="classic")
    async def handle(body: object) -> None: ...

    async with app:
        await app.publish({"n": 1}, routing_key=queue)
        await wait_for(
            lambda: (
                value(
                    registry,
                    "rabbitflow_received_processed_messages_total",
                    app_name="orders",
                    broker="rabbitmq",
                    handler=queue,
                    status="acked",
                )
                == 1
            )
        )
        text = (await asyncio.to_thread(generate_latest, registry)).decode()
    assert f'rabbitflow_consumer_subscribed{{app_name="orders",queue="{queue}"}} 1.0' in text
    assert 'rabbitflow_connected{app_name="orders"} 1.0' in text


async def test_a_tripped_breaker_shows_as_a_paused_consumer(make_app: Callable[..., App]) -> None:
    registry = CollectorRegistry()
    metrics = PrometheusMiddleware(registry)
    app = make_app(middleware=[metrics])
    metrics.bind(app)
    queue = unique("prom")
    breaker = Breaker(threshold=0.5, window=10, min_attempts=3, cooldown=30)

    @app.consumer(queue, retries=3, delay=5, queue_type="classic", breaker=breaker)
    async def handle(body: object) -> None:
        raise ConnectionError("downstream is down")

    async with app:
        for n in range(3):
            await app.publish({"n": n}, routing_key=queue)
        q = {"app_name": app.name, "queue": queue}
        await wait_for(lambda: value(registry, "rabbitflow_consumer_paused", **q) == 1)
        assert value(registry, "rabbitflow_consumer_breaker_trips_total", **q) == 1
        await wait_for(lambda: value(registry, "rabbitflow_consumer_subscribed", **q) == 0)
        assert value(registry, "rabbitflow_healthy", app_name=app.name) == 1  # paused on purpose
        assert value(registry, "rabbitflow_retries_total", **q, delay="5") == 3


def test_two_apps_share_a_registry_apart_by_app_name() -> None:
    registry = CollectorRegistry()
    first, second = PrometheusMiddleware(registry), PrometheusMiddleware(registry)
    a = App("billing", url="memory://", middleware=[first])
    b = App("shipping", url="memory://", middleware=[second])
    first.bind(a)
    second.bind(b)
    assert first.app_name == "billing"
    assert second.app_name == "shipping"
    text = generate_latest(registry).decode()
    assert 'rabbitflow_connected{app_name="billing"} 0.0' in text
    assert 'rabbitflow_connected{app_name="shipping"} 0.0' in text


def test_binding_is_checked() -> None:
    metrics = PrometheusMiddleware(CollectorRegistry())
    with pytest.raises(ConfigError, match="does not use this PrometheusMiddleware"):
        metrics.bind(App("other", url="memory://"))
    app = App("svc", url="memory://", middleware=[metrics])
    assert metrics.bind(app) is metrics.bind(app)
    with pytest.raises(ConfigError, match="bound to App 'svc' already"):
        metrics.bind(App("svc2", url="memory://", middleware=[metrics]))


def test_importing_rabbitflow_imports_neither_prometheus_nor_opentelemetry() -> None:
    code = (
        "import sys, rabbitflow, rabbitflow.http; "
        "print(sorted(m for m in sys.modules if m.startswith(('prometheus_client', 'opentelemetry'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
