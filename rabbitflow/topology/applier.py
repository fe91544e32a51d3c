"""Declaring a plan on a broker, and comparing a plan with what a broker has."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from rabbitflow.errors import TopologyConflict
from rabbitflow.topology.compiler import ExchangePlan, Plan, QueuePlan
from rabbitflow.transport.base import Channel, ChannelClosed, Transport

log = logging.getLogger("rabbitflow.topology")

__all__ = ["Difference", "apply_plan", "check_plan"]

_ARG = re.compile(r"inequivalent arg '([^']+)'")


def _conflict(kind: str, name: str, exc: ChannelClosed) -> TopologyConflict:
    match = _ARG.search(exc.text)
    argument = match.group(1) if match else ""
    what = f"argument {argument!r}" if argument else "its arguments"
    if kind == "queue":
        way_out = (
            f"RabbitMQ cannot change a queue's arguments in place: move its messages away "
            f"(shovel) and delete it (`rabbitmqctl delete_queue {name}`), or consume a queue "
            "under a new name, or change the consumer's options to match the existing queue"
        )
    else:
        way_out = (
            f"delete the exchange (`rabbitmqadmin delete exchange name={name}`, unbinding its queues), "
            "or use another exchange name, or declare it with the existing type"
        )
    return TopologyConflict(
        f"{kind} {name!r} already exists with a different {what} ({exc.text}); {way_out}",
        kind=kind,
        name=name,
        argument=argument,
    )


async def _declare_exchange(channel: Channel, exchange: ExchangePlan, *, passive: bool) -> None:
    await channel.declare_exchange(
        exchange.name,
        exchange.type,
        durable=exchange.durable,
        arguments=exchange.arguments,
        passive=passive,
    )


async def _declare_queue(channel: Channel, queue: QueuePlan, *, passive: bool) -> None:
    await channel.declare_queue(
        queue.name,
        durable=queue.durable,
        arguments=queue.arguments,
        passive=passive,
    )


async def apply_plan(plan: Plan, transport: Transport) -> None:
    """Declare every object of the plan (idempotent), then verify every dead-letter route."""
    channel = await transport.channel()
    try:
        for exchange in plan.exchanges:
            try:
                await _declare_exchange(channel, exchange, passive=False)
                log.debug("declared exchange %s (%s)", exchange.name, exchange.type)
            except ChannelClosed as exc:
                if exc.code != 406:
                    raise
                raise _conflict("exchange", exchange.name, exc) from None
        for queue in plan.queues:
            try:
                await _declare_queue(channel, queue, passive=False)
                log.debug("declared queue %s %s", queue.name, queue.arguments)
            except ChannelClosed as exc:
                if exc.code != 406:
                    raise
                raise _conflict("queue", queue.name, exc) from None
        for binding in plan.bindings:
            await channel.bind_queue(binding.queue, binding.exchange, binding.routing_key, binding.arguments)
            log.debug("bound %s to %s with %r", binding.queue, binding.exchange, binding.routing_key)
        # RabbitMQ drops dead-lettered messages whose exchange is missing: make sure it is there.
        for queue in plan.queues:
            route = queue.dead_letter_route
            if route is not None and route[0]:
                await channel.declare_exchange(route[0], passive=True)
    finally:
        await channel.close()


@dataclass(frozen=True, slots=True)
class Difference:
    kind: str  # exchange | queue
    name: str
    problem: str  # missing | differs
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.name}: {self.problem}" + (f" ({self.detail})" if self.detail else "")


async def check_plan(plan: Plan, transport: Transport) -> list[Difference]:
    """What the broker lacks or has differently; changes nothing on the broker.

    An existing object is redeclared with the plan's arguments: RabbitMQ answers 406 when they
    differ and does nothing when they match. Bindings cannot be read over AMQP and are not checked.
    """
    differences: list[Difference] = []
    channel = await transport.channel()
    try:
        objects: list[tuple[str, ExchangePlan | QueuePlan]] = [("exchange", e) for e in plan.exchanges] + [
            ("queue", q) for q in plan.queues
        ]
        for kind, obj in objects:
            if not channel.is_open:
                channel = await transport.channel()
            declare = _declare_exchange if kind == "exchange" else _declare_queue
            try:
                await declare(channel, obj, passive=True)  # type: ignore[arg-type]
            except ChannelClosed as exc:
                if exc.code != 404:
                    raise
                differences.append(Difference(kind, obj.name, "missing"))
                continue
            try:
                await declare(channel, obj, passive=False)  # type: ignore[arg-type]
            except ChannelClosed as exc:
                if exc.code != 406:
                    raise
                differences.append(Difference(kind, obj.name, "differs", exc.text))
    finally:
        await channel.close()
    return differences
