"""Prometheus metrics: FastStream's metric names and labels under the prefix `rabbitflow`, plus
rabbitflow's own (retries, parks, reconnects, stalled and paused consumers).

    metrics = PrometheusMiddleware(registry)
    app = App("orders", middleware=[metrics])
    metrics.bind(app)  # the health gauges: read from app.health() at scrape time

Per-message work is a dict lookup of the queue's (or destination's) pre-bound label children and
the increments themselves; label values are formatted once per queue, delay, reason or exception
type. See docs/observability.md for every metric and the fate -> status mapping.

Needs `prometheus-client` (`pip install rabbitflow[prometheus]`); `import rabbitflow` alone never
imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rabbitflow.errors import ConfigError, Reject, Retry
from rabbitflow.message import Message
from rabbitflow.middleware.base import Fate, Middleware, Outcome, Outgoing

if TYPE_CHECKING:
    from rabbitflow.app import App

__all__ = ["HealthCollector", "PrometheusMiddleware"]

BROKER = "rabbitmq"  # FastStream's `broker` label for its RabbitMQ broker

# FastStream's ProcessingStatus values; "skipped" is an exactly_once consumer's duplicate.
ACKED, NACKED, REJECTED, ERROR, SKIPPED = "acked", "nacked", "rejected", "error", "skipped"
# FastStream's default received-size buckets (bytes): 16 B to 16 MiB by powers of four.
SIZE_BUCKETS = (*(2.0**n for n in range(4, 25, 2)), float("inf"))

_MAX_DESTINATIONS = 1000  # pre-bound publish children kept; beyond, labels are bound per publish
# Signals, not errors: never in *_exceptions_total (FastStream's IgnoredException likewise).
_CONTROL_FLOW = (Retry, Reject)


class _Metrics:
    """One registry's metric objects under one prefix (shared by every middleware using both)."""

    def __init__(self, registry: CollectorRegistry, prefix: str, size_buckets: Sequence[float]) -> None:
        consumer = ("app_name", "broker", "handler")
        producer = ("app_name", "broker", "destination")

        def counter(name: str, doc: str, labels: Sequence[str]) -> Counter:
            return Counter(f"{prefix}_{name}", doc, labels, registry=registry)

        self.received = counter(
            "received_messages_total", "Deliveries received, by consumer queue (handler)", consumer
        )
        self.received_size = Histogram(
            f"{prefix}_received_messages_size_bytes",
            "Body sizes of the deliveries received, in bytes",
            consumer,
            registry=registry,
            buckets=size_buckets,
        )
        self.in_process = Gauge(
            f"{prefix}_received_messages_in_process",
            "Handler calls running now",
            consumer,
            registry=registry,
        )
        self.processed = counter(
            "received_processed_messages_total",
            "Deliveries whose fate is decided, by status (acked, nacked, rejected, error, skipped)",
            (*consumer, "status"),
        )
        self.processed_duration = Histogram(
            f"{prefix}_received_processed_messages_duration_seconds",
            "Seconds each handler call took",
            consumer,
            registry=registry,
        )
        self.processed_exceptions = counter(
            "received_processed_messages_exceptions_total",
            "Failed handler calls (and undecodable bodies), by exception class name",
            (*consumer, "exception_type"),
        )
        self.published = counter(
            "published_messages_total",
            "app.publish calls, by destination and status (success, error)",
            (*producer, "status"),
        )
        self.published_duration = Histogram(
            f"{prefix}_published_messages_duration_seconds",
            "Seconds from app.publish to the broker's confirm (or the failure)",
            producer,
            registry=registry,
        )
        self.published_exceptions = counter(
            "published_messages_exceptions_total",
            "Failed app.publish calls, by exception class name",
            (*producer, "exception_type"),
        )
        self.retries = counter(
            "retries_total",
            "Failed deliveries sent to a retry queue, by queue and delay",
            ("app_name", "queue", "delay"),
        )
        self.parked = counter(
            "parked_messages_total",
            "Deliveries sent to the parking queue, by queue and reason",
            ("app_name", "queue", "reason"),
        )
        self.health = HealthCollector(prefix)
        registry.register(self.health)


# Metric objects can be registered once per registry: middlewares sharing one share them.
_shared: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _Metrics]] = weakref.WeakKeyDictionary()


def _metrics(registry: CollectorRegistry, prefix: str, size_buckets: Sequence[float]) -> _Metrics:
    by_prefix = _shared.setdefault(registry, {})
    metrics = by_prefix.get(prefix)
    if metrics is None:
        metrics = by_prefix[prefix] = _Metrics(registry, prefix, size_buckets)
    return metrics


class _Consumed:
    """One queue's label children, bound once."""

    __slots__ = (
        "acked",
        "app_name",
        "duration",
        "error",
        "exceptions",
        "in_process",
        "metrics",
        "nacked",
        "parked",
        "queue",
        "received",
        "rejected",
        "retries",
        "size",
        "skipped",
    )

    def __init__(self, metrics: _Metrics, app_name: str, queue: str) -> None:
        labels = (app_name, BROKER, queue)
        self.metrics, self.app_name, self.queue = metrics, app_name, queue
        self.received = metrics.received.labels(*labels)
        self.size = metrics.received_size.labels(*labels)
        self.in_process = metrics.in_process.labels(*labels)
        self.duration = metrics.processed_duration.labels(*labels)
        self.acked = metrics.processed.labels(*labels, ACKED)
        self.nacked = metrics.processed.labels(*labels, NACKED)
        self.rejected = metrics.processed.labels(*labels, REJECTED)
        self.error = metrics.processed.labels(*labels, ERROR)
        self.skipped = metrics.processed.labels(*labels, SKIPPED)
        self.exceptions: dict[type[BaseException], Any] = {}
        self.retries: dict[float, Any] = {}
        self.parked: dict[str, Any] = {}

    def exception(self, kind: type[BaseException]) -> Any:
        child = self.exceptions.get(kind)
        if child is None:
            child = self.exceptions[kind] = self.metrics.processed_exceptions.labels(
                self.app_name, BROKER, self.queue, kind.__name__
            )
        return child

    def retry(self, delay: float) -> Any:
        child = self.retries.get(delay)
        if child is None:
            child = self.retries[delay] = self.metrics.retries.labels(self.app_name, self.queue, f"{delay:g}")
        return child

    def park(self, reason: str) -> Any:
        child = self.parked.get(reason)
        if child is None:
            child = self.parked[reason] = self.metrics.parked.labels(self.app_name, self.queue, reason)
        return child


class _Published:
    """One destination's label children, bound once."""

    __slots__ = ("destination", "duration", "error", "exceptions", "success")

    def __init__(self, metrics: _Metrics, app_name: str, exchange: str, routing_key: str) -> None:
        # FastStream's RabbitMQ destination: "<exchange or 'default'>.<routing key>".
        self.destination = f"{exchange or 'default'}.{routing_key}"
        labels = (app_name, BROKER, self.destination)
        self.success = metrics.published.labels(*labels, "success")
        self.error = metrics.published.labels(*labels, "error")
        self.duration = metrics.published_duration.labels(*labels)
        self.exceptions: dict[type[BaseException], Any] = {}


class PrometheusMiddleware(Middleware):
    """Counts what the app consumes and publishes into a Prometheus registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        app_name: str | None = None,
        metrics_prefix: str = "rabbitflow",
        received_messages_size_buckets: Sequence[float] | None = None,
    ) -> None:
        """
        Args:
            registry: where the metrics are registered; `prometheus_client.REGISTRY` when None.
                Several middlewares (one per app) may share one registry: they share its metrics
                and differ by `app_name`.
            app_name: the `app_name` label; when None, the bound app's name (`bind`), else
                `metrics_prefix` (FastStream's default).
            metrics_prefix: the first word of every metric name; `faststream` gives FastStream's
                own names exactly.
            received_messages_size_buckets: bucket bounds in bytes for
                `*_received_messages_size_bytes` (FastStream's 16 B .. 16 MiB by default). The
                first middleware of a registry and prefix sets them.
        """
        self.registry = REGISTRY if registry is None else registry
        self.prefix = metrics_prefix
        self._explicit_name = app_name
        self.app_name = app_name or metrics_prefix
        self._metrics = _metrics(
            self.registry, metrics_prefix, received_messages_size_buckets or SIZE_BUCKETS
        )
        self._consumed: dict[str, _Consumed] = {}
        self._published: dict[tuple[str, str], _Published] = {}
        self._app: App | None = None
        self._bound: _Bound | None = None

    def bind(self, app: App) -> PrometheusMiddleware:
        """Add the health gauges of `app` (reconnects, connected, per consumer: stalled, paused,
        subscribed, in flight), read from `app.health()` when the registry is collected; the
        `app_name` label becomes the app's name unless one was given. Returns the middleware.
        Call once, before the app starts."""
        if self._app is app:
            return self
        if self._app is not None:
            raise ConfigError(
                f"PrometheusMiddleware is bound to App {self._app.name!r} already; give App "
                f"{app.name!r} a PrometheusMiddleware of its own (they may share the registry)"
            )
        if self not in app.middleware:
            raise ConfigError(
                f"App {app.name!r} does not use this PrometheusMiddleware; pass it in "
                "App(..., middleware=[...]) and bind that app"
            )
        self._app = app
        if self._explicit_name is None:
            self.app_name = app.name
            self._consumed.clear()
            self._published.clear()
        self._metrics.health.add(app, self.app_name)
        self._bound = self._metrics.health._bound(app)
        return self

    # -- consuming -----------------------------------------------------------------------------

    def _queue(self, queue: str) -> _Consumed:
        consumed = self._consumed.get(queue)
        if consumed is None:
            consumed = self._consumed[queue] = _Consumed(self._metrics, self.app_name, queue)
        return consumed

    def received(self, message: Message) -> None:
        consumed = self._consumed.get(message.queue) or self._queue(message.queue)
        consumed.received.inc()
        consumed.size.observe(len(message.body))
        if self._bound is not None and self._bound.loop is None:
            self._bound.loop = asyncio.get_running_loop()

    async def attempt(self, message: Message, call_next: Callable[[], Awaitable[Any]]) -> Any:
        consumed = self._consumed.get(message.queue) or self._queue(message.queue)
        consumed.in_process.inc()
        started = time.perf_counter()
        try:
            return await call_next()
        finally:
            consumed.duration.observe(time.perf_counter() - started)
            consumed.in_process.dec()

    def settled(self, message: Message, outcome: Outcome) -> None:
        consumed = self._consumed.get(message.queue) or self._queue(message.queue)
        fate = outcome.fate
        if fate is Fate.HANDLED:
            consumed.acked.inc()
            return
        if fate is Fate.DUPLICATE:
            consumed.skipped.inc()
            return
        exception = outcome.exception
        if exception is not None and not isinstance(exception, _CONTROL_FLOW):
            consumed.exception(type(exception)).inc()
        if fate is Fate.RETRIED:
            consumed.nacked.inc()
            consumed.retry(outcome.delay or 0.0).inc()
        else:
            reason = outcome.reason or ""
            (consumed.rejected if reason == "rejected" else consumed.error).inc()
            consumed.park(reason).inc()

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, outgoing: Outgoing, call_next: Callable[[], Awaitable[None]]) -> None:
        key = (outgoing.exchange, outgoing.routing_key)
        published = self._published.get(key)
        if published is None:
            published = _Published(self._metrics, self.app_name, *key)
            if len(self._published) < _MAX_DESTINATIONS:
                self._published[key] = published
        try:
            await call_next()
        except BaseException as exc:
            published.error.inc()
            kind = type(exc)
            child = published.exceptions.get(kind)
            if child is None:
                child = published.exceptions[kind] = self._metrics.published_exceptions.labels(
                    self.app_name, BROKER, published.destination, kind.__name__
                )
            child.inc()
            raise
        else:
            published.success.inc()
        finally:
            published.duration.observe(time.perf_counter() - outgoing.started)


class _Bound:
    __slots__ = ("app", "app_name", "loop")

    def __init__(self, app: App, app_name: str) -> None:
        self.app = app
        self.app_name = app_name
        self.loop: asyncio.AbstractEventLoop | None = None  # the app's, once seen
        with contextlib.suppress(RuntimeError):
            self.loop = asyncio.get_running_loop()

    def health(self) -> dict[str, Any]:
        try:
            self.loop = asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return self.app.health()
        loop = self.loop
        if loop is None or loop.is_closed() or not loop.is_running():
            # Not running, or never seen running: then health() needs no loop.
            try:
                return self.app.health()
            except RuntimeError:
                return {}

        async def read() -> dict[str, Any]:
            return self.app.health()

        try:
            return asyncio.run_coroutine_threadsafe(read(), loop).result(timeout=5)
        except Exception:
            return {}


class HealthCollector(Collector):
    """`app.health()` of each added app as metrics, read at scrape time.

    Collected on an app's event loop (as `rabbitflow.http` does) it reads the app directly; from
    another thread (`prometheus_client.start_http_server`) it asks the loop the app was seen
    running on. `PrometheusMiddleware.bind` adds its app to its registry's collector; without the
    middleware: `registry.register(HealthCollector().add(app))`.
    """

    def __init__(self, prefix: str = "rabbitflow") -> None:
        self.prefix = prefix
        self._apps: list[_Bound] = []

    def add(self, app: App, app_name: str | None = None) -> HealthCollector:
        """Report `app` under the `app_name` label (default: its name). Returns the collector."""
        name = app_name or app.name
        if any(b.app_name == name for b in self._apps):
            raise ConfigError(
                f"HealthCollector: app_name {name!r} is reported already; give this app another one"
            )
        self._apps.append(_Bound(app, name))
        return self

    def _bound(self, app: App) -> _Bound | None:
        return next((b for b in self._apps if b.app is app), None)

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        reconnects, connected, healthy, stalled, paused, subscribed, in_flight, trips = families
        for bound in self._apps:
            health = bound.health()
            name = bound.app_name
            reconnects.add_metric([name], health.get("reconnects", 0))
            connected.add_metric([name], 1.0 if health.get("connected") else 0.0)
            healthy.add_metric([name], 1.0 if health.get("healthy") else 0.0)
            for consumer in health.get("consumers", ()):
                labels = [name, consumer["queue"]]
                breaker = consumer.get("breaker")
                stalled.add_metric(labels, 1.0 if consumer["stalled"] else 0.0)
                paused.add_metric(labels, 1.0 if breaker and breaker["state"] != "closed" else 0.0)
                subscribed.add_metric(labels, 1.0 if consumer["subscribed"] else 0.0)
                in_flight.add_metric(labels, consumer["in_flight"])
                if breaker:
                    trips.add_metric(labels, breaker["trips"])
        return iter(families)

    def _families(self) -> list[Any]:
        p, app, queue = self.prefix, ["app_name"], ["app_name", "queue"]
        return [
            CounterMetricFamily(
                f"{p}_reconnects", "Failovers to a new session since the app started", labels=app
            ),
            GaugeMetricFamily(f"{p}_connected", "1 while the app has a live session", labels=app),
            GaugeMetricFamily(f"{p}_healthy", "1 while app.health() says healthy", labels=app),
            GaugeMetricFamily(
                f"{p}_consumer_stalled",
                "1 while the consumer holds deliveries and settled none for longer than its bound",
                labels=queue,
            ),
            GaugeMetricFamily(
                f"{p}_consumer_paused", "1 while the consumer's breaker is open or half-open", labels=queue
            ),
            GaugeMetricFamily(f"{p}_consumer_subscribed", "1 while the consumer is subscribed", labels=queue),
            GaugeMetricFamily(
                f"{p}_consumer_in_flight", "Deliveries the consumer holds unsettled", labels=queue
            ),
            CounterMetricFamily(
                f"{p}_consumer_breaker_trips", "Times the consumer's breaker opened", labels=queue
            ),
        ]
