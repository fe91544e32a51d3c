"""A plan as text, JSON or a Mermaid diagram."""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from rabbitflow.topology.compiler import Plan

__all__ = ["render"]

# queue -> (exchange, routing key): where its consumer publishes what its handler returns
Destinations = Mapping[str, tuple[str, str]]


def render(plan: Plan, fmt: str, publish_to: Destinations | None = None) -> str:
    """The plan in `fmt`; text and mermaid also show `publish_to`, the destinations the
    consumers' results go to (they are not part of the plan: nothing is declared for them)."""
    publish_to = publish_to or {}
    if fmt == "json":
        return orjson.dumps(plan.to_dict(), option=orjson.OPT_INDENT_2).decode()
    if fmt == "mermaid":
        return _mermaid(plan, publish_to)
    if fmt == "text":
        return _text(plan, publish_to)
    raise ValueError(f"unknown format {fmt!r}; use text, json or mermaid")


def _arguments(arguments: dict[str, object]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items()) or "-"


def _destination(exchange: str, routing_key: str) -> str:
    return f"exchange {exchange or '(default)'} with routing key {routing_key!r}"


def _text(plan: Plan, publish_to: Destinations) -> str:
    lines = [f"service {plan.service}", "", "exchanges:"]
    lines += [f"  {e.name or '(default)'}  [{e.type}]  {_arguments(e.arguments)}" for e in plan.exchanges]
    lines += ["", "queues:"]
    width = max((len(q.name) for q in plan.queues), default=0)
    lines += [f"  {q.name:<{width}}  {q.role:<7}  {_arguments(q.arguments)}" for q in plan.queues]
    lines += ["", "bindings:"]
    lines += [f"  {b.exchange} --[{b.routing_key}]--> {b.queue}" for b in plan.bindings]
    lines += ["", "consumers:"]
    lines += [
        f"  {c.queue} -> {c.handler}  retries={c.retries} delays={list(c.delays)}" for c in plan.consumers
    ]
    if publish_to:
        lines += ["", "publishes (publish_to; not declared):"]
        lines += [f"  {queue} -> {_destination(*where)}" for queue, where in sorted(publish_to.items())]
    return "\n".join(lines)


def _label(text: str) -> str:
    """Text inside a quoted Mermaid label: `#` starts an entity, `"` ends the label and `<...>`
    reads as HTML, so all three are written as entities."""
    return text.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def _node_id(kind: str, name: str) -> str:
    safe = "".join(ch if ch.isalnum() else "_" for ch in name)
    return f"{kind}_{safe or 'default'}"


def _mermaid(plan: Plan, publish_to: Destinations) -> str:
    lines = ["flowchart LR"]
    known = {exchange.name for exchange in plan.exchanges}
    for exchange in plan.exchanges:
        lines.append(f'  {_node_id("x", exchange.name)}{{{{"{_label(exchange.name)} ({exchange.type})"}}}}')
    for queue in plan.queues:
        args = queue.arguments
        label = _label(queue.name)
        if "x-message-ttl" in args:
            label += f"<br/>ttl {args['x-message-ttl']} ms"
        lines.append(f'  {_node_id("q", queue.name)}[("{label}")]')
    for binding in plan.bindings:
        lines.append(
            f'  {_node_id("x", binding.exchange)} -- "{_label(binding.routing_key)}" --> '
            f"{_node_id('q', binding.queue)}"
        )
    for queue in plan.queues:
        route = queue.dead_letter_route
        if route is None:
            continue
        target, key = route
        if target == "":
            lines.append(
                f'  {_node_id("q", queue.name)} -. "expired → {_label(key)}" .-> {_node_id("q", key)}'
            )
        else:
            lines.append(
                f'  {_node_id("q", queue.name)} -. "dead-letter: {_label(key)}" .-> {_node_id("x", target)}'
            )
    for consumer in plan.consumers:
        handler = _node_id("h", consumer.handler)
        lines.append(f'  {_node_id("q", consumer.queue)} --> {handler}(["{_label(consumer.handler)}"])')
        lines.append(f'  {handler} -. "retry / park (publish)" .-> {_node_id("x", plan.exchanges[0].name)}')
        if consumer.queue in publish_to:
            destination, key = publish_to[consumer.queue]
            target = _node_id("x", destination)
            if destination not in known:
                known.add(destination)
                lines.append(f'  {target}{{{{"{_label(destination or "(default exchange)")}"}}}}')
            lines.append(f'  {handler} == "publish_to: {_label(key)}" ==> {target}')
    return "\n".join(lines)
