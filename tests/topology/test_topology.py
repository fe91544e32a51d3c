"""The topology compiler (pure), its renderings, and the applier on the real broker."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiormq
import pytest

from rabbitflow import App, TopologyConflict
from rabbitflow.topology.compiler import DELIVERY_LIMIT
from rabbitflow.topology.render import render

from ..helpers import Admin, unique


def orders_app(queue_type: str = "quorum") -> App:
    app = App("orders", url="amqp://guest:guest@localhost/")

    @app.consumer(
        "orders.created",
        exchange="orders",
        routing_key="order.created",
        retries=3,
        delay=[1, 10, 60],
        queue_type=queue_type,
    )
    async def on_created(body: Any) -> None: ...

    @app.consumer("orders.audit", exchange="orders", routing_key="order.created", retries=2, delay=5)
    async def on_audit(body: Any) -> None: ...

    return app


def test_plan_has_dlx_consume_retry_and_parked_queues() -> None:
    plan = orders_app().plan
    assert [e.name for e in plan.exchanges] == ["orders.dlx", "orders"]
    roles = {q.name: q.role for q in plan.queues}
    assert roles == {
        "orders.audit": "consume",
        "orders.audit.retry.5s": "retry",
        "orders.audit.parked": "parked",
        "orders.created": "consume",
        "orders.created.retry.1s": "retry",
        "orders.created.retry.10s": "retry",
        "orders.created.retry.60s": "retry",
        "orders.created.parked": "parked",
    }
    consume = plan.queue("orders.created").arguments
    assert consume == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "orders.dlx",
        "x-dead-letter-routing-key": "orders.created.parked",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": DELIVERY_LIMIT,
    }
    retry = plan.queue("orders.created.retry.10s").arguments
    assert retry["x-message-ttl"] == 10_000
    assert retry["x-dead-letter-exchange"] == ""  # the default exchange: back to this queue only
    assert retry["x-dead-letter-routing-key"] == "orders.created"
    for queue in plan.queues:
        assert "x-expires" not in queue.arguments
    parked = plan.queue("orders.created.parked").arguments
    assert "x-message-ttl" not in parked
    assert "x-dead-letter-exchange" not in parked


def test_classic_queues_carry_no_quorum_arguments() -> None:
    plan = orders_app("classic").plan
    consume = plan.queue("orders.created").arguments
    assert consume == {
        "x-dead-letter-exchange": "orders.dlx",
        "x-dead-letter-routing-key": "orders.created.parked",
    }
    assert plan.queue("orders.created.parked").arguments == {}


def test_plan_is_deterministic_frozen_and_hashable() -> None:
    a, b = orders_app().plan, orders_app().plan
    assert a == b
    assert hash(a) == hash(b)
    with pytest.raises(AttributeError):
        a.service = "other"  # type: ignore[misc]


def test_json_form_is_the_documented_one() -> None:
    data = json.loads(render(orders_app().plan, "json"))
    assert list(data) == ["service", "exchanges", "queues", "bindings", "consumers"]
    assert data["exchanges"][0] == {"name": "orders.dlx", "type": "direct", "durable": True, "arguments": {}}
    assert set(data["queues"][0]) == {"name", "role", "durable", "arguments"}
    assert {
        "exchange": "orders.dlx",
        "queue": "orders.created.retry.1s",
        "routing_key": "orders.created.retry.1s",
        "arguments": {},
    } in data["bindings"]
    assert {
        "exchange": "orders",
        "queue": "orders.created",
        "routing_key": "order.created",
        "arguments": {},
    } in data["bindings"]
    created = next(c for c in data["consumers"] if c["queue"] == "orders.created")
    assert created["retries"] == 3
    assert created["delays"] == [1.0, 10.0, 60.0]
    assert created["handler"].endswith("on_created")


def test_text_and_mermaid_show_every_queue() -> None:
    plan = orders_app().plan
    text, mermaid = render(plan, "text"), render(plan, "mermaid")
    assert mermaid.startswith("flowchart LR")
    for queue in plan.queues:
        assert queue.name in text
        assert queue.name in mermaid
    assert "ttl 60000 ms" in mermaid


async def test_apply_is_idempotent_and_check_reports_nothing(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("topo")

    @app.consumer(queue, exchange=unique("ex"), retries=2, delay=[1, 2])
    async def handle(body: Any) -> None: ...

    admin.forget_app(app)
    node, before = await app.check()
    assert {d.problem for d in before} == {"missing"}
    assert len(before) == len(app.plan.queues) + len(app.plan.exchanges)
    await app.declare()
    await app.declare()
    node, after = await app.check()
    assert after == []
    assert "**" in node


async def test_check_reports_a_differing_argument_and_changes_nothing(
    make_app: Callable[..., App], admin: Admin
) -> None:
    queue = unique("drift")
    await admin.channel.queue_declare(queue, durable=True, arguments={"x-message-ttl": 1000})
    admin.queues.add(queue)
    app = make_app()

    @app.consumer(queue, queue_type="classic")
    async def handle(body: Any) -> None: ...

    await admin.publish(b"kept", routing_key=queue)
    _, differences = await app.check()
    drift = [d for d in differences if d.name == queue]
    assert len(drift) == 1
    assert drift[0].problem == "differs"
    assert "x-dead-letter-exchange" in drift[0].detail or "x-message-ttl" in drift[0].detail
    assert "inequivalent arg 'x-message-ttl'" in drift[0].detail  # the broker names the first it compares
    assert await admin.count(queue) == 1  # the queue and its message are as they were
    assert f"{queue}.parked" in {d.name for d in differences if d.problem == "missing"}
    probe = await admin.channel.connection.channel()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):  # and nothing was declared
        await probe.queue_declare(f"{queue}.parked", passive=True)


async def test_redeclaring_with_other_arguments_is_a_topology_conflict(
    make_app: Callable[..., App], admin: Admin
) -> None:
    queue = unique("conflict")
    await admin.channel.queue_declare(queue, durable=True)  # a plain classic queue
    admin.queues.add(queue)
    app = make_app()

    @app.consumer(queue)  # quorum by default: the broker refuses
    async def handle(body: Any) -> None: ...

    with pytest.raises(TopologyConflict) as info:
        await app.start()
    error = info.value
    assert error.kind == "queue"
    assert error.name == queue
    assert error.argument in {"x-queue-type", "x-dead-letter-exchange"}
    assert "delete_queue" in str(error)
    assert "new name" in str(error)
    assert app.state == "closed"


async def test_a_publish_only_app_declares_nothing(broker_url: str, admin: Admin) -> None:
    """No consumers, no `<name>.dlx`: a service that only publishes leaves no object behind."""
    name, queue = unique("pubonly"), unique("inbox")
    await admin.channel.queue_declare(queue, durable=False, auto_delete=False)
    admin.queues.add(queue)
    admin.exchanges.add(f"{name}.dlx")  # deleted afterwards should the test fail
    app = App(name, url=broker_url)
    assert app.plan.exchanges == app.plan.queues == app.plan.bindings == ()
    async with app:
        await app.publish({"n": 1}, routing_key=queue)
    assert await admin.count(queue) == 1
    probe = await admin.channel.connection.channel()
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity, match=f"no exchange '{name}.dlx'"):
        await probe.exchange_declare(f"{name}.dlx", passive=True)
    _, differences = await app.check()
    assert differences == []


def nested_app() -> App:
    def create_app() -> App:
        app = App("orders", url="amqp://guest:guest@localhost/")

        @app.consumer("orders.created", exchange="orders")
        async def on_order(body: Any) -> None: ...

        return app

    return create_app()


@pytest.mark.parametrize("fmt", ["text", "json", "mermaid"])
def test_a_handler_defined_in_a_function_renders_without_locals(fmt: str) -> None:
    out = render(nested_app().plan, fmt)
    assert "<locals>" not in out
    assert "tests.topology.test_topology.nested_app.create_app.on_order" in out


def test_mermaid_labels_and_ids_survive_any_name() -> None:
    """Quotes, '#' and angle brackets in a name or routing key are escaped in labels; node ids
    stay letters, digits and underscores."""
    app = App("svc", url="amqp://guest:guest@localhost/")

    async def handler(body: Any) -> None: ...

    handler.__qualname__ = 'make."odd"<handler>'
    app.consumer("q#1", exchange="ex 1", routing_key='key "<1>"')(handler)
    mermaid = render(app.plan, "mermaid")
    assert '"odd"' not in mermaid
    assert "<handler>" not in mermaid
    assert "#quot;odd#quot;#lt;handler#gt;" in mermaid
    assert '-- "key #quot;#lt;1#gt;#quot;" -->' in mermaid
    assert '[("q#35;1")]' in mermaid  # '#' starts a Mermaid entity: escaped too
    assert "h_tests_topology_test_topology_make__odd__handler_" in mermaid  # ids: letters, digits, _
