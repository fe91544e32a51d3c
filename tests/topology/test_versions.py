"""compat.concerns: what a plan relies on that a given RabbitMQ does not do or does differently."""

from __future__ import annotations

from typing import Any

import pytest

from rabbitflow import App
from rabbitflow.topology.compiler import Plan, QueuePlan
from rabbitflow.topology.versions import concerns


def plan_of(queue_type: str = "quorum") -> Plan:
    app = App("orders", url="memory://")

    @app.consumer("orders.created", retries=2, delay=[1, 10], queue_type=queue_type)
    async def on_created(body: Any) -> None: ...

    return app.plan


def with_queue(plan: Plan, queue: QueuePlan) -> Plan:
    return Plan(plan.service, plan.exchanges, (*plan.queues, queue), plan.bindings, plan.consumers)


@pytest.mark.parametrize("server_version", ["3.10.8", "3.12.14", "3.13.7"])
def test_nothing_to_say_up_to_3_13(server_version: str) -> None:
    assert concerns(plan_of(), server_version) == []
    assert concerns(plan_of("classic"), server_version) == []


def without_parking_limit(plan: Plan) -> Plan:
    """`plan` as rabbitflow compiled it before parking queues had an explicit delivery limit."""
    queues = tuple(
        QueuePlan(q.name, q.role, q.durable, tuple(a for a in q.args if a[0] != "x-delivery-limit"))
        if q.role == "parked"
        else q
        for q in plan.queues
    )
    return Plan(plan.service, plan.exchanges, queues, plan.bindings, plan.consumers)


@pytest.mark.parametrize("server_version", ["4.0.0", "4.1.4", "4.2.1", "4.3.0"])
def test_4_x_quorum_parking_queue_without_a_delivery_limit(server_version: str) -> None:
    lines = concerns(without_parking_limit(plan_of()), server_version)

    parked = [line for line in lines if line.startswith("queue 'orders.created.parked' (parked)")]
    assert len(parked) == 1
    assert "default x-delivery-limit of 20" in parked[0]
    assert "dropped (it has no dead-letter exchange)" in parked[0]
    assert "explicit, large x-delivery-limit" in parked[0]
    assert not any("retry" in line.split(":")[0] for line in lines)  # retry queues are never read
    assert concerns(plan_of("classic"), server_version) == []  # classic queues have no limit


def test_the_compiled_plan_gives_parking_queues_their_own_delivery_limit() -> None:
    for server_version in ("3.10.8", "4.0.0", "4.2.1"):
        assert concerns(plan_of(), server_version) == []


def test_4_3_names_the_queues_whose_limit_ignores_nack() -> None:
    lines = concerns(plan_of(), "4.3.0")

    assert lines[-1].startswith(
        "queues 'orders.created', 'orders.created.parked': on RabbitMQ 4.3.0 only basic.reject"
    )
    assert not any("basic.nack" in line for line in concerns(plan_of(), "4.2.1"))


def test_an_explicit_limit_on_the_parking_queue_clears_the_concern() -> None:
    plan = without_parking_limit(plan_of())
    queues = tuple(
        QueuePlan(q.name, q.role, q.durable, (*q.args, ("x-delivery-limit", -1))) if q.role == "parked" else q
        for q in plan.queues
    )
    fixed = Plan(plan.service, plan.exchanges, queues, plan.bindings, plan.consumers)

    assert concerns(fixed, "4.0.0") == []


def test_4_3_refuses_transient_queues_and_removed_classic_arguments() -> None:
    plan = with_queue(
        plan_of("classic"),
        QueuePlan(
            "legacy", "consume", False, (("x-queue-master-locator", "min-masters"), ("x-queue-mode", "lazy"))
        ),
    )

    lines = concerns(plan, "4.3.0")

    assert [line.split(": ", 1)[1].split(";")[0] for line in lines] == [
        "RabbitMQ 4.3.0 refuses transient non-exclusive queues (541, connection closed)",
        "RabbitMQ 4.3.0 refuses x-queue-mode (CQv1 was removed)",
        "RabbitMQ 4.3.0 denies x-queue-master-locator by default",
    ]
    assert all(line.startswith("queue 'legacy' (consume)") for line in lines)
    assert concerns(plan, "4.2.1") == []


def test_4_3_consumer_timeout_on_a_classic_queue() -> None:
    plan = with_queue(
        plan_of("classic"), QueuePlan("slow", "consume", True, (("x-consumer-timeout", 60000),))
    )

    [line] = concerns(plan, "4.3.2")

    assert "consumer timeouts on quorum queues only" in line


def test_old_and_unknown_servers() -> None:
    [old] = concerns(plan_of(), "3.9.29")
    assert "older than 3.10" in old
    [unknown] = concerns(plan_of(), "")
    assert unknown.startswith("server version '' is unknown")


async def test_inspect_names_the_version_and_its_concerns_on_the_memory_broker() -> None:
    """What `rabbitflow topology --check` prints: the node's version and what it does otherwise."""
    from rabbitflow import App
    from rabbitflow.testing import MemoryBroker

    app = App("versions", url="memory://", broker=MemoryBroker(version="4.3"))

    @app.consumer("versions.q")
    async def handle(body: object) -> None: ...

    await app.declare()
    report = await app.admin().inspect()
    assert report.server_version == "4.3.0"
    assert report.differences == []
    assert any("not basic.nack" in line for line in report.concerns)
