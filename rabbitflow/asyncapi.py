"""An AsyncAPI 3.0 document of a service: App in, dict out, no I/O.

Servers come from the app's URL list (passwords masked), a channel from each consumed queue and
each `publish_to` destination, an operation from each consumer (receive, or request-reply when
its handler returns something and has no `publish_to`) and each `publish_to` (send). Payloads are
JSON Schemas of the handlers' body and return annotations; the retry and parking topology of a
queue is in its channel's `x-rabbitflow` extension. `rabbitflow asyncapi` prints it (docs/asyncapi.md).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rabbitflow import __version__, names
from rabbitflow.urls import mask

if TYPE_CHECKING:
    from rabbitflow.app import App
    from rabbitflow.spec import ConsumerSpec
    from rabbitflow.topology.compiler import Plan

__all__ = ["document", "markdown", "schema_of"]

AMQP_BINDING = "0.3.0"
_KEY = re.compile(r"[^\w.\-]")  # AsyncAPI keys: ^[\w\d.\-_]+$
_SCHEMAS = "#/components/schemas/"


def document(app: App, *, version: str = "0.0.0") -> dict[str, Any]:
    """The service `app` as an AsyncAPI 3.0.0 document; `version` is the service's own."""
    plan = app.plan
    schemas: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    vhost = app.settings.endpoints[0].vhost or "/"
    for spec in app.consumers:
        hints = _hints(spec)
        key = _key(spec.queue)
        body = _message(f"{key}.body", hints.get("body"), schemas)
        messages[body["name"]] = body
        channels[key] = _queue_channel(spec, plan, vhost, body["name"])
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": f"handled by {spec.handler_name}",
            "messages": [{"$ref": f"#/channels/{key}/messages/{body['name']}"}],
            "bindings": {"amqp": {"ack": True, "bindingVersion": AMQP_BINDING}},
        }
        returns = hints.get("return")
        if returns is not None and returns is not type(None):
            result = _message(f"{key}.result", returns, schemas)
            messages[result["name"]] = result
            if spec.publish_to is None:
                reply = f"{key}.reply"
                channels[reply] = {
                    "address": None,  # RabbitMQ's direct reply-to: the requester's reply_to
                    "description": f"replies of {spec.handler_name}, to the requester's reply_to",
                    "messages": {result["name"]: {"$ref": f"#/components/messages/{result['name']}"}},
                }
                operation["reply"] = {
                    "channel": {"$ref": f"#/channels/{reply}"},
                    "address": {
                        "location": "$message.header#/reply_to",
                        "description": "the request's reply_to property (amq.rabbitmq.reply-to)",
                    },
                }
                operation["x-rabbitflow-pattern"] = "request-reply"
            else:
                out_key, out_channel = _destination(*spec.publish_to, plan, vhost)
                out = channels.setdefault(out_key, out_channel)
                out["messages"][result["name"]] = {"$ref": f"#/components/messages/{result['name']}"}
                operations[f"{key}.publish"] = {
                    "action": "send",
                    "channel": {"$ref": f"#/channels/{out_key}"},
                    "summary": f"what {spec.handler_name} returns; its input is acked once this is confirmed",
                    "messages": [{"$ref": f"#/channels/{out_key}/messages/{result['name']}"}],
                    "bindings": {
                        "amqp": {"deliveryMode": 2, "mandatory": True, "bindingVersion": AMQP_BINDING}
                    },
                }
        operations[f"{key}.receive"] = operation
    doc: dict[str, Any] = {
        "asyncapi": "3.0.0",
        "info": {
            "title": app.name,
            "version": version,
            "description": f"The rabbitflow service {app.name!r} (rabbitflow {__version__}).",
        },
        "defaultContentType": "application/json",
        "servers": _servers(app),
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
        "x-rabbitflow": {"service": app.name, "deadLetterExchange": names.dead_letter_exchange(app.name)},
    }
    if schemas:
        doc["components"]["schemas"] = schemas
    return doc


def _key(name: str) -> str:
    return _KEY.sub("_", name) or "_"


def _servers(app: App) -> dict[str, Any]:
    servers: dict[str, Any] = {}
    for n, endpoint in enumerate(app.settings.endpoints, 1):
        if endpoint.is_memory:
            servers[f"node{n}"] = {
                "host": "memory",
                "protocol": "memory",
                "description": "rabbitflow's in-memory broker (memory://)",
            }
            continue
        servers[f"node{n}"] = {
            "host": f"{endpoint.host}:{endpoint.port}",
            "protocol": endpoint.scheme,
            "protocolVersion": "0.9.1",
            "pathname": endpoint.vhost if endpoint.vhost.startswith("/") else f"/{endpoint.vhost}",
            "description": mask(endpoint.url),
        }
    return servers


def _hints(spec: ConsumerSpec) -> dict[str, Any]:
    """The handler's body annotation (as "body") and return annotation (as "return")."""
    try:
        hints = typing.get_type_hints(spec.handler, include_extras=True)
    except Exception:  # the decorator resolved them once already; a later failure is not ours
        hints = {}
    first = next(iter(inspect.signature(spec.handler).parameters))
    return {"body": hints.get(first), "return": hints.get("return")}


def _message(name: str, annotation: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    content_type = (
        "text/plain"
        if annotation is str
        else "application/octet-stream"
        if annotation is bytes
        else "application/json"
    )
    return {
        "name": name,
        "contentType": content_type,
        "payload": schema_of(annotation, schemas),
    }


def _queue_channel(spec: ConsumerSpec, plan: Plan, vhost: str, message: str) -> dict[str, Any]:
    parked = names.parked_queue(spec.queue)
    retry_queues = [
        {"name": q.name, "ttlMs": q.arguments.get("x-message-ttl")}
        for q in plan.queues
        if q.role == "retry" and q.arguments.get("x-dead-letter-routing-key") == spec.queue
    ]
    queue = plan.queue(spec.queue)
    bindings = [
        {"exchange": b.exchange, "routingKey": b.routing_key} for b in plan.bindings if b.queue == spec.queue
    ]
    return {
        "address": spec.queue,
        "title": spec.queue,
        "description": f"the queue {spec.queue!r}, consumed by {spec.handler_name}",
        "messages": {message: {"$ref": f"#/components/messages/{message}"}},
        "bindings": {
            "amqp": {
                "is": "queue",
                "queue": {
                    "name": spec.queue,
                    "durable": queue.durable,
                    "exclusive": False,
                    "autoDelete": False,
                    "vhost": vhost,
                },
                "bindingVersion": AMQP_BINDING,
            }
        },
        "x-rabbitflow": {
            "queueType": spec.queue_type,
            "arguments": queue.arguments,
            "boundTo": bindings,
            "retries": spec.policy.retries,
            "delays": list(spec.policy.delays),
            "retryQueues": retry_queues,
            "parkedQueue": parked,
            "deadLetterExchange": names.dead_letter_exchange(plan.service),
            "parkedHeaders": [
                "x-rf-reason",
                "x-rf-attempts",
                "x-rf-exception",
                "x-rf-error",
                "x-rf-queue",
                "x-rf-original-exchange",
                "x-rf-original-routing-key",
            ],
        },
    }


def _destination(exchange: str, routing_key: str, plan: Plan, vhost: str) -> tuple[str, dict[str, Any]]:
    """The channel of a `publish_to` destination: a routing key on an exchange."""
    types_ = {e.name: e.type for e in plan.exchanges}
    kind = "default" if exchange == "" else types_.get(exchange)
    amqp_exchange: dict[str, Any] = {"name": exchange, "durable": True, "autoDelete": False, "vhost": vhost}
    if kind is not None:
        amqp_exchange["type"] = kind
    where = exchange or "(default exchange)"
    return f"{_key(exchange or 'default')}.{_key(routing_key)}", {
        "address": routing_key,
        "title": f"{where} / {routing_key}",
        "description": f"published to exchange {where} with routing key {routing_key!r}",
        "messages": {},
        "bindings": {"amqp": {"is": "routingKey", "exchange": amqp_exchange, "bindingVersion": AMQP_BINDING}},
    }


# -- payload schemas -------------------------------------------------------------------------


def schema_of(annotation: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a body annotation; named models go into `schemas` (the document's
    components/schemas) and are referred to. With pydantic installed it writes the schema
    (`TypeAdapter.json_schema`); without, dataclasses, TypedDicts and plain types are described
    from their annotations."""
    if annotation is None or annotation is Any or annotation is object:
        return {}
    try:
        from pydantic import TypeAdapter
    except ImportError:
        return plain_schema(annotation, schemas)
    try:
        schema = TypeAdapter(annotation).json_schema(ref_template=_SCHEMAS + "{model}")
    except Exception:  # a type pydantic cannot describe: say what we can
        return plain_schema(annotation, schemas)
    schemas.update(schema.pop("$defs", {}))
    if isinstance(annotation, type) and schema.get("type") == "object" and "properties" in schema:
        name = _key(annotation.__name__)  # a named model: one place in components/schemas
        schemas[name] = schema
        return {"$ref": _SCHEMAS + name}
    return schema


_PLAIN: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    bytes: {"type": "string", "format": "binary"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    dict: {"type": "object"},
    list: {"type": "array"},
}


def plain_schema(annotation: Any, schemas: dict[str, Any], depth: int = 0) -> dict[str, Any]:
    """A JSON Schema from annotations alone (no pydantic)."""
    if depth > 10 or annotation is Any or annotation is object:
        return {}
    if annotation in _PLAIN:
        return dict(_PLAIN[annotation])
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return plain_schema(args[0], schemas, depth + 1)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [plain_schema(a, schemas, depth + 1) for a in args]}
    if origin in (list, tuple, set, frozenset) or (origin is not None and origin.__name__ == "Sequence"):
        return {"type": "array", "items": plain_schema(args[0], schemas, depth + 1) if args else {}}
    if origin is dict:
        values = plain_schema(args[1], schemas, depth + 1) if len(args) == 2 else {}
        return {"type": "object", "additionalProperties": values or True}
    if isinstance(annotation, type) and (dataclasses.is_dataclass(annotation) or _is_typeddict(annotation)):
        name = _key(annotation.__name__)
        if name not in schemas:
            schemas[name] = {}  # a model that refers to itself ends here
            schemas[name] = _object_schema(annotation, schemas, depth)
        return {"$ref": _SCHEMAS + name}
    return {}


def _is_typeddict(annotation: type) -> bool:
    return issubclass(annotation, dict) and hasattr(annotation, "__required_keys__")


def _object_schema(model: type, schemas: dict[str, Any], depth: int) -> dict[str, Any]:
    hints = typing.get_type_hints(model)
    if dataclasses.is_dataclass(model):
        required = [
            f.name
            for f in dataclasses.fields(model)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
    else:
        required = sorted(getattr(model, "__required_keys__", ()))
    return {
        "title": model.__name__,
        "type": "object",
        "properties": {k: plain_schema(v, schemas, depth + 1) for k, v in hints.items()},
        "required": required,
    }


# -- a readable page ------------------------------------------------------------------------------


def markdown(doc: Mapping[str, Any]) -> str:
    """The document as a Markdown page for a docs site: servers, operations, channels (with the
    retry and parking topology) and message payloads. `rabbitflow asyncapi MODULE:APP --format
    markdown --out docs/service.md` renders one for a service's own docs (mkdocs nav)."""
    info = doc.get("info", {})
    lines = [f"# {info.get('title', 'service')} {info.get('version', '')}".rstrip(), ""]
    if info.get("description"):
        lines += [str(info["description"]), ""]
    lines += ["## Servers", "", "| server | host | protocol |", "|---|---|---|"]
    for name, server in doc.get("servers", {}).items():
        where = f"{server.get('host', '')}{server.get('pathname', '')}"
        lines.append(f"| {name} | `{where}` | {server.get('protocol', '')} |")
    lines += ["", "## Operations", "", "| operation | action | channel | what |", "|---|---|---|---|"]
    for name, operation in doc.get("operations", {}).items():
        channel = str(operation.get("channel", {}).get("$ref", "")).rsplit("/", 1)[-1]
        reply = " (replies)" if operation.get("reply") else ""
        what = _cell(operation.get("summary", ""))
        lines.append(f"| `{name}` | {operation.get('action', '')}{reply} | `{channel}` | {what} |")
    messages = doc.get("components", {}).get("messages", {})
    schemas = doc.get("components", {}).get("schemas", {})
    lines += ["", "## Channels"]
    for name, channel in doc.get("channels", {}).items():
        lines += ["", f"### `{name}`", ""]
        if channel.get("description"):
            lines += [_cell(channel["description"]), ""]
        topology = channel.get("x-rabbitflow", {})
        for bound in topology.get("boundTo", []):
            lines.append(f"- bound to exchange `{bound.get('exchange')}` with `{bound.get('routingKey')}`")
        if "retries" in topology:
            delays = ", ".join(f"{d:g} s" for d in topology.get("delays", []))
            lines.append(f"- retries: {topology['retries']}, after {delays or 'no delay'}")
        if topology.get("parkedQueue"):
            lines.append(
                f"- parked in `{topology['parkedQueue']}` (through `{topology.get('deadLetterExchange')}`)"
            )
        for ref in channel.get("messages", {}).values():
            message = messages.get(str(ref.get("$ref", "")).rsplit("/", 1)[-1], {})
            payload = message.get("payload", {})
            lines.append(
                f"- message `{message.get('name', '')}` ({message.get('contentType', '')}): {_type(payload)}"
            )
            model = (
                schemas.get(str(payload.get("$ref", "")).rsplit("/", 1)[-1]) if "$ref" in payload else payload
            )
            if model and model.get("properties"):
                required = set(model.get("required", ()))
                lines += ["", "| field | type | required |", "|---|---|---|"]
                for field_name, field in model["properties"].items():
                    lines.append(
                        f"| `{field_name}` | {_type(field)} | {'yes' if field_name in required else 'no'} |"
                    )
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _type(schema: Mapping[str, Any]) -> str:
    if "$ref" in schema:
        return f"`{str(schema['$ref']).rsplit('/', 1)[-1]}`"
    kinds = [s.get("type", "any") for s in schema.get("anyOf", ())] or [schema.get("type", "any")]
    text = " or ".join(str(k) for k in kinds)
    if schema.get("type") == "array" and isinstance(schema.get("items"), Mapping):
        text = f"array of {_type(schema['items'])}"
    return text


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")
