"""A plan as text, JSON or a Mermaid diagram."""

from __future__ import annotations

import orjson

from rabbitflow.topology.compiler import Plan

__all__ = ["render"]


def render(plan: Plan, fmt: str) -> str:
    if fmt == "json":
        return orjson.dumps(plan.to_dict(), option=orjson.OPT_INDENT_2).decode()
    if fmt == "mermaid":
        return _mermaid(plan)
    if fmt == "text":
        return _text(plan)
    raise ValueError(f"unknown format {fmt!r}; use text, json or mermaid")


def _arguments(arguments: dict[str, object]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in arguments.items()) or "-"


def _text(plan: Plan) -> str:
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
    return "\n".join(lines)


def _label(text: str) -> str:
    """Text inside a quoted Mermaid label: `#` starts an entity, `"` ends the label and `<...>`
    reads as HTML, so all three are written as entities."""
    return text.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def _node_id(kind: str, name: str) -> str:
    safe = "".join(ch if ch.isalnum() else "_" for ch in name)
    return f"{kind}_{safe or 'default'}"


def _mermaid(plan: Plan) -> str:
    lines = ["flowchart LR"]
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
    return "\n".join(lines)
