"""The topology compiler: consumer specs in, a frozen and deterministic plan out. No I/O.

For service S and a consumer of queue Q with delays d1..dn:

    exchange S.dlx (direct)          the service's dead-letter / retry exchange (with a consumer)
    queue Q            consume       dead-letters (reject, delivery limit) to S.dlx → Q.parked
    queue Q.retry.<d>  retry         x-message-ttl=d, dead-letters to "" → Q (to Q only)
    queue Q.parked     parked        no TTL, no expiry

A partitioned consumer of Q (`partitions=N`, docs/partitions.md) has no queue Q and no retry
queues (it retries in place): queues Q.p0..Q.p<N-1> (consume, single active consumer) bound to
its direct exchange E (default: Q) by routing keys "0".."N-1", Q.parked, and the fanout
exchange Q.members its replicas send their heartbeats on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rabbitflow import names
from rabbitflow.errors import ConfigError
from rabbitflow.spec import ConsumerSpec

__all__ = [
    "DELIVERY_LIMIT",
    "Binding",
    "ConsumerPlan",
    "ExchangePlan",
    "Plan",
    "QueuePlan",
    "compile_plan",
    "merge_exchanges",
    "partition_exchange",
    "retry_plan",
]

DELIVERY_LIMIT = names.DELIVERY_LIMIT

Args = tuple[tuple[str, Any], ...]


def _args(mapping: Mapping[str, Any]) -> Args:
    return tuple(sorted(mapping.items()))


@dataclass(frozen=True, slots=True)
class ExchangePlan:
    name: str
    type: str = "direct"
    durable: bool = True
    args: Args = ()

    @property
    def arguments(self) -> dict[str, Any]:
        return dict(self.args)


@dataclass(frozen=True, slots=True)
class QueuePlan:
    name: str
    role: str  # consume | retry | parked
    durable: bool = True
    args: Args = ()

    @property
    def arguments(self) -> dict[str, Any]:
        return dict(self.args)

    @property
    def dead_letter_route(self) -> tuple[str, str] | None:
        args = self.arguments
        if "x-dead-letter-exchange" not in args:
            return None
        return args["x-dead-letter-exchange"], args.get("x-dead-letter-routing-key", "")


@dataclass(frozen=True, slots=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str
    args: Args = ()

    @property
    def arguments(self) -> dict[str, Any]:
        return dict(self.args)


@dataclass(frozen=True, slots=True)
class ConsumerPlan:
    queue: str
    handler: str
    retries: int
    delays: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    service: str
    exchanges: tuple[ExchangePlan, ...]
    queues: tuple[QueuePlan, ...]
    bindings: tuple[Binding, ...]
    consumers: tuple[ConsumerPlan, ...]

    def queue(self, name: str) -> QueuePlan:
        for queue in self.queues:
            if queue.name == name:
                return queue
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON form of SPEC §3."""
        return {
            "service": self.service,
            "exchanges": [
                {"name": e.name, "type": e.type, "durable": e.durable, "arguments": e.arguments}
                for e in self.exchanges
            ],
            "queues": [
                {"name": q.name, "role": q.role, "durable": q.durable, "arguments": q.arguments}
                for q in self.queues
            ],
            "bindings": [
                {
                    "exchange": b.exchange,
                    "queue": b.queue,
                    "routing_key": b.routing_key,
                    "arguments": b.arguments,
                }
                for b in self.bindings
            ],
            "consumers": [
                {"queue": c.queue, "handler": c.handler, "retries": c.retries, "delays": list(c.delays)}
                for c in self.consumers
            ],
        }


def _queue_type_args(queue_type: str) -> dict[str, Any]:
    if queue_type == "quorum":
        # Without reject-publish, at-least-once dead-lettering silently falls back to at-most-once.
        return {
            "x-queue-type": "quorum",
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }
    return {}


def compile_plan(service: str, consumers: Iterable[ConsumerSpec]) -> Plan:
    """The topology the service needs, in a deterministic order. A service without consumers
    needs nothing: publishing declares no exchange of its own."""
    specs = sorted(consumers, key=lambda s: s.queue)
    dlx = names.dead_letter_exchange(service)
    exchanges: dict[str, ExchangePlan] = {dlx: ExchangePlan(dlx, "direct")} if specs else {}
    queues: list[QueuePlan] = []
    bindings: list[Binding] = []
    plans: list[ConsumerPlan] = []
    for spec in specs:
        if spec.partitions is not None:
            _plan_partitions(spec, dlx, exchanges, queues, bindings, plans)
            continue
        queue, parked = spec.queue, names.parked_queue(spec.queue)
        typed = _queue_type_args(spec.queue_type)
        consume_args = {
            **typed,
            "x-dead-letter-exchange": dlx,
            "x-dead-letter-routing-key": parked,
        }
        if spec.queue_type == "quorum":
            consume_args["x-delivery-limit"] = DELIVERY_LIMIT
        queues.append(QueuePlan(queue, "consume", True, _args(consume_args)))
        for delay in spec.policy.distinct_delays:
            retry = _retry_queue(spec, delay)
            queues.append(retry)
            bindings.append(Binding(dlx, retry.name, retry.name))
        # From 4.0 a quorum queue without a limit gets 20 and drops at it when it has no
        # dead-letter exchange (the parking queue has none): each look at a parked message is a
        # return that counts. A limit nobody reaches, on every version (-1 is 4.0+ only).
        parked_args = (
            {"x-queue-type": "quorum", "x-delivery-limit": names.PARKED_DELIVERY_LIMIT}
            if spec.queue_type == "quorum"
            else {}
        )
        queues.append(QueuePlan(parked, "parked", True, _args(parked_args)))
        bindings.append(Binding(dlx, parked, parked))
        if spec.exchange is not None:
            _add_exchange(exchanges, ExchangePlan(spec.exchange, spec.exchange_type))
            bindings.append(Binding(spec.exchange, queue, spec.binding_key))
        plans.append(
            ConsumerPlan(
                queue,
                spec.handler_name,
                spec.policy.retries,
                tuple(spec.policy.delay_for(k) for k in range(1, spec.policy.retries + 1)),
            )
        )
    plan = Plan(service, tuple(exchanges.values()), tuple(queues), tuple(bindings), tuple(plans))
    _check_routes(plan)
    return plan


def partition_exchange(spec: ConsumerSpec) -> str:
    """The direct exchange a partitioned consumer's producers publish to."""
    return spec.queue if spec.exchange is None else spec.exchange


def _plan_partitions(
    spec: ConsumerSpec,
    dlx: str,
    exchanges: dict[str, ExchangePlan],
    queues: list[QueuePlan],
    bindings: list[Binding],
    plans: list[ConsumerPlan],
) -> None:
    assert spec.partitions is not None
    parked = names.parked_queue(spec.queue)
    exchange = partition_exchange(spec)
    _add_exchange(exchanges, ExchangePlan(exchange, "direct"))
    _add_exchange(exchanges, ExchangePlan(names.members_exchange(spec.queue), "fanout"))
    arguments: dict[str, Any] = {
        **_queue_type_args(spec.queue_type),
        "x-dead-letter-exchange": dlx,
        "x-dead-letter-routing-key": parked,
        # The broker delivers a partition to one consumer at a time, whoever else subscribes:
        # a handover may overlap in the replicas' views, never in deliveries.
        "x-single-active-consumer": True,
    }
    if spec.queue_type == "quorum":
        arguments["x-delivery-limit"] = DELIVERY_LIMIT
    for index in range(spec.partitions):
        name = names.partition_queue(spec.queue, index)
        queues.append(QueuePlan(name, "consume", True, _args(arguments)))
        bindings.append(Binding(exchange, name, str(index)))
    parked_args = (
        {"x-queue-type": "quorum", "x-delivery-limit": names.PARKED_DELIVERY_LIMIT}
        if spec.queue_type == "quorum"
        else {}
    )
    queues.append(QueuePlan(parked, "parked", True, _args(parked_args)))
    bindings.append(Binding(dlx, parked, parked))
    delays = tuple(spec.policy.delay_for(k) for k in range(1, spec.policy.retries + 1))
    plans.append(ConsumerPlan(spec.queue, spec.handler_name, spec.policy.retries, delays))


def retry_plan(service: str, spec: ConsumerSpec, delay: float) -> Plan:
    """What a `Retry(delay=...)` the policy did not plan for needs: the retry queue of `delay`,
    bound to the service's exchange, exactly as `compile_plan` would have planned it."""
    dlx = names.dead_letter_exchange(service)
    retry = _retry_queue(spec, delay)
    binding = Binding(dlx, retry.name, retry.name)
    return Plan(service, (ExchangePlan(dlx, "direct"),), (retry,), (binding,), ())


def _retry_queue(spec: ConsumerSpec, delay: float) -> QueuePlan:
    # Queue-level TTL, one queue per delay: RabbitMQ only expires the head of a queue.
    # The dead-letter target is the default exchange and Q's name: Q alone gets it back.
    arguments = {
        **_queue_type_args(spec.queue_type),
        "x-message-ttl": round(delay * 1000),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": spec.queue,
    }
    return QueuePlan(names.retry_queue(spec.queue, delay), "retry", True, _args(arguments))


def merge_exchanges(
    known: Mapping[str, ExchangePlan], added: Iterable[ExchangePlan]
) -> dict[str, ExchangePlan]:
    """`known` with `added`: one exchange, one type, or `ConfigError`."""
    exchanges = dict(known)
    for exchange in added:
        _add_exchange(exchanges, exchange)
    return exchanges


def _add_exchange(exchanges: dict[str, ExchangePlan], exchange: ExchangePlan) -> None:
    known = exchanges.setdefault(exchange.name, exchange)
    if known != exchange:
        raise ConfigError(
            f"exchange {exchange.name!r} is used as {known.type!r} and as {exchange.type!r}; "
            "give every consumer of one exchange the same exchange_type"
        )


def _check_routes(plan: Plan) -> None:
    """Every dead-letter route must reach a queue: RabbitMQ silently drops what has nowhere to go."""
    queue_names = {q.name for q in plan.queues}
    routes = {(b.exchange, b.routing_key) for b in plan.bindings}
    for queue in plan.queues:
        route = queue.dead_letter_route
        if route is None:
            continue
        exchange, key = route
        if (exchange == "" and key not in queue_names) or (exchange and route not in routes):
            raise ConfigError(f"queue {queue.name!r} dead-letters to {route!r}, which routes nowhere")
