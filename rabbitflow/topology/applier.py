"""Declaring a plan on a broker, and comparing a plan with what a broker has."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from rabbitflow.errors import TopologyConflict
from rabbitflow.topology.compiler import Binding, ExchangePlan, Plan, QueuePlan
from rabbitflow.transport.base import Channel, ChannelClosed, Transport

log = logging.getLogger("rabbitflow.topology")

__all__ = ["Difference", "apply_plan", "check_plan"]

T = TypeVar("T")

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
    """Declare every object of the plan (idempotent), then verify every dead-letter route.

    Exchanges, then queues, then bindings, each group declared at once over a few channels
    (a channel's methods wait for one another: one channel would make a round trip per object;
    quorum queues are the slowest to declare). The first refusal is raised."""

    async def exchange(channel: Channel, plan: ExchangePlan) -> None:
        try:
            await _declare_exchange(channel, plan, passive=False)
        except ChannelClosed as exc:
            if exc.code != 406:
                raise
            raise _conflict("exchange", plan.name, exc) from None
        log.debug("declared exchange %s (%s)", plan.name, plan.type)

    async def queue(channel: Channel, plan: QueuePlan) -> None:
        try:
            await _declare_queue(channel, plan, passive=False)
        except ChannelClosed as exc:
            if exc.code != 406:
                raise
            raise _conflict("queue", plan.name, exc) from None
        log.debug("declared queue %s %s", plan.name, plan.arguments)

    async def binding(channel: Channel, plan: Binding) -> None:
        await channel.bind_queue(plan.queue, plan.exchange, plan.routing_key, plan.arguments)
        log.debug("bound %s to %s with %r", plan.queue, plan.exchange, plan.routing_key)

    async def route(channel: Channel, exchange: str) -> None:
        # RabbitMQ drops dead-lettered messages whose exchange is missing: make sure it is there.
        await channel.declare_exchange(exchange, passive=True)

    routes = sorted({dl[0] for q in plan.queues if (dl := q.dead_letter_route) is not None and dl[0]})
    width = min(transport.declare_width, max(len(plan.exchanges), len(plan.queues), len(plan.bindings), 1))
    if width == 1:
        opened: list[Channel | BaseException] = [await transport.channel()]
    else:
        opened = await asyncio.gather(*(transport.channel() for _ in range(width)), return_exceptions=True)
    channels = [c for c in opened if isinstance(c, Channel)]
    try:
        for failure in opened:
            if isinstance(failure, BaseException):
                raise failure
        await _at_once(channels, plan.exchanges, exchange)
        await _at_once(channels, plan.queues, queue)
        await _at_once(channels, plan.bindings, binding)
        await _at_once(channels, routes, route)
    finally:
        if len(channels) == 1:
            if channels[0].is_open:
                await channels[0].close()
        else:
            await asyncio.gather(*(c.close() for c in channels if c.is_open), return_exceptions=True)


async def _at_once(
    channels: list[Channel], items: Sequence[T], declare: Callable[[Channel, T], Awaitable[None]]
) -> None:
    """`declare(channel, item)` for every item, spread over the channels, all at once; raises the
    first refusal once every channel is done (a channel the broker closed takes no more)."""
    if not items:
        return
    width = min(len(channels), len(items))
    if width == 1:
        for item in items:
            await declare(channels[0], item)
        return

    async def share(index: int, channel: Channel) -> BaseException | None:
        for item in items[index::width]:
            try:
                await declare(channel, item)
            except BaseException as exc:  # this channel is closed now: the rest is moot
                return exc
        return None

    outcomes = await asyncio.gather(*(share(i, c) for i, c in enumerate(channels[:width])))
    failed = [exc for exc in outcomes if exc is not None]
    if failed:
        raise next((e for e in failed if isinstance(e, TopologyConflict)), failed[0])


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
