"""What a topology plan relies on that a RabbitMQ server does not do, or does differently.

`concerns(plan, server_version)` is pure: the plan (from `topology.compiler`) and the version
string a connection reports ("4.3.0"). Each line names the object, what the server does, and
what to do; the sources are the ones cited in `rabbitflow/transport/memory/profile.py`, where the
in-memory broker plays the same rules (docs/compatibility.md has the table).
"""

from __future__ import annotations

from rabbitflow.topology.compiler import Plan, QueuePlan

__all__ = ["concerns"]

_RELEASES = "https://github.com/rabbitmq/rabbitmq-server/releases/tag/"


def _version(server_version: str) -> tuple[int, int] | None:
    parts = server_version.strip().split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def concerns(plan: Plan, server_version: str) -> list[str]:
    """What `plan` relies on that a RabbitMQ `server_version` does not do or does differently,
    one line each, in plan order; [] when nothing (or when the version is unknown: then one line
    saying so)."""
    version = _version(server_version)
    if version is None:
        return [
            f"server version {server_version!r} is unknown: rabbitflow cannot say what this "
            "RabbitMQ does differently (see docs/compatibility.md)"
        ]
    out: list[str] = []
    if version < (3, 10):
        out.append(
            f"RabbitMQ {server_version} is older than 3.10: quorum queues lack message TTL and "
            "at-least-once dead-lettering, which every retry and parking queue relies on; upgrade"
        )
    for queue in plan.queues:
        out.extend(_queue_concerns(queue, server_version, version))
    limited = [q.name for q in plan.queues if "x-delivery-limit" in q.arguments and _quorum(q)]
    if version >= (4, 3) and limited:
        out.append(
            f"queues {', '.join(map(repr, limited))}: on RabbitMQ {server_version} only basic.reject "
            "and lost connections count towards x-delivery-limit, not basic.nack (rabbitflow "
            "rejects; other clients of these queues must too) (https://www.rabbitmq.com/docs/4.3/nack)"
        )
    return out


def _quorum(queue: QueuePlan) -> bool:
    return queue.arguments.get("x-queue-type") == "quorum"


def _queue_concerns(queue: QueuePlan, server_version: str, version: tuple[int, int]) -> list[str]:
    args = queue.arguments
    quorum = _quorum(queue)
    name = f"queue {queue.name!r} ({queue.role})"
    out: list[str] = []
    # Retry queues are never consumed, so nothing returns to them: their default limit is moot.
    if version >= (4, 0) and quorum and "x-delivery-limit" not in args and queue.role != "retry":
        dead_letters = "x-dead-letter-exchange" in args
        fate = "dead-lettered" if dead_letters else "dropped (it has no dead-letter exchange)"
        out.append(
            f"{name}: RabbitMQ {server_version} gives quorum queues a default x-delivery-limit of "
            f"20; a message returned more often is {fate}"
            + (
                " - each peek at a parking queue is such a return; give it an explicit, large "
                "x-delivery-limit (-1 is unlimited from 4.0 only: 3.x drops at the first return), "
                "or a policy's delivery-limit"
                if queue.role == "parked"
                else "; set x-delivery-limit explicitly"
            )
            + f" ({_RELEASES}v4.0.1)"
        )
    if version >= (4, 3) and not queue.durable:
        out.append(
            f"{name}: RabbitMQ {server_version} refuses transient non-exclusive queues "
            f"(541, connection closed); declare it durable ({_RELEASES}v4.3.0)"
        )
    if version >= (4, 3) and "x-queue-mode" in args:
        out.append(
            f"{name}: RabbitMQ {server_version} refuses x-queue-mode (CQv1 was removed); drop the "
            "argument (https://github.com/rabbitmq/rabbitmq-server/pull/14769)"
        )
    if version >= (4, 3) and "x-queue-master-locator" in args:
        out.append(
            f"{name}: RabbitMQ {server_version} denies x-queue-master-locator by default; use "
            f"x-queue-leader-locator ({_RELEASES}v4.3.0)"
        )
    if version >= (4, 3) and "x-queue-version" in args and args["x-queue-version"] == 1:
        out.append(f"{name}: RabbitMQ {server_version} has no CQv1; drop x-queue-version=1")
    if version >= (4, 3) and not quorum and "x-consumer-timeout" in args:
        out.append(
            f"{name}: RabbitMQ {server_version} has consumer timeouts on quorum queues only, and "
            "4.3.2+ refuse x-consumer-timeout on a classic queue "
            "(https://github.com/rabbitmq/rabbitmq-server/issues/17144)"
        )
    return out
