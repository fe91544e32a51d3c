"""`rabbitflow asyncapi`: the service as an AsyncAPI 3.0 document that the official schema
accepts (tests/asyncapi/: `@asyncapi/specs` 6.11.1, vendored; no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import jsonschema
import pydantic
import pytest
import yaml
from referencing import Registry, Resource

from rabbitflow import App, Message
from rabbitflow.asyncapi import document, plain_schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "tests" / "asyncapi" / "asyncapi-3.0.0.schema.json").read_text())

pytestmark = pytest.mark.unit


def validator() -> jsonschema.Draft7Validator:
    registry: Registry[Any] = Registry().with_resource(SCHEMA["$id"], Resource.from_contents(SCHEMA)).crawl()
    return jsonschema.Draft7Validator(SCHEMA, registry=registry)


def problems(doc: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator().iter_errors(doc)]


class Order(pydantic.BaseModel):
    id: int
    item: str
    quantity: int = 1


@dataclass
class Shipment:
    order: int
    carrier: str


class Price(TypedDict):
    sku: str
    cents: int


def shop() -> App:
    app = App("shop", url="amqp://shop:s3cret@rmq1:5672/prod;amqps://shop:s3cret@rmq2")

    @app.consumer("shop.orders", exchange="shop", routing_key="order.created", retries=2, delay=[1, 30])
    async def on_order(order: Order, message: Message) -> Shipment:
        return Shipment(order.id, "post")

    app.consumer("shop.orders.ship", publish_to=("shipping", "shipment.created"))(_ship)

    @app.consumer("shop.prices", queue_type="classic")
    async def price(sku: str) -> Price:  # answers requests: no publish_to
        return {"sku": sku, "cents": 100}

    @app.consumer("shop.blobs")
    async def blobs(data: bytes) -> None:
        pass

    return app


async def _ship(order: Order) -> Shipment:
    return Shipment(order.id, "post")


def test_the_document_passes_the_official_asyncapi_3_schema() -> None:
    doc = document(shop())
    assert problems(doc) == []
    assert doc["asyncapi"] == "3.0.0"
    broken = json.loads(json.dumps(doc))
    broken["operations"]["shop.orders.receive"]["action"] = "consume"
    assert problems(broken), "the schema check would not notice a wrong document"


def test_servers_are_the_url_list_with_passwords_masked() -> None:
    doc = document(shop())
    assert "s3cret" not in json.dumps(doc)
    servers = doc["servers"]
    assert servers["node1"] == {
        "host": "rmq1:5672",
        "protocol": "amqp",
        "protocolVersion": "0.9.1",
        "pathname": "/prod",
        "description": "amqp://shop:**@rmq1:5672/prod",
    }
    assert servers["node2"]["protocol"] == "amqps"
    assert servers["node2"]["host"] == "rmq2:5671"


def test_channels_operations_and_payloads() -> None:
    doc = document(shop())
    channels, operations = doc["channels"], doc["operations"]
    messages, schemas = doc["components"]["messages"], doc["components"]["schemas"]
    # a consumed queue: its channel, the receive operation, the pydantic model as payload
    assert channels["shop.orders"]["bindings"]["amqp"]["queue"]["name"] == "shop.orders"
    assert operations["shop.orders.receive"]["action"] == "receive"
    assert messages["shop.orders.body"]["payload"] == {"$ref": "#/components/schemas/Order"}
    assert schemas["Order"]["required"] == ["id", "item"]
    assert set(schemas["Order"]["properties"]) == {"id", "item", "quantity"}
    # the retry and parking topology of that queue
    topology = channels["shop.orders"]["x-rabbitflow"]
    assert topology["retries"] == 2
    assert [q["name"] for q in topology["retryQueues"]] == ["shop.orders.retry.1s", "shop.orders.retry.30s"]
    assert [q["ttlMs"] for q in topology["retryQueues"]] == [1000, 30000]
    assert topology["parkedQueue"] == "shop.orders.parked"
    assert topology["boundTo"] == [{"exchange": "shop", "routingKey": "order.created"}]
    # publish_to: a send operation on the destination's channel, with the handler's return type
    send = operations["shop.orders.ship.publish"]
    assert send["action"] == "send"
    destination = send["channel"]["$ref"].rsplit("/", 1)[1]
    assert channels[destination]["address"] == "shipment.created"
    assert channels[destination]["bindings"]["amqp"]["exchange"]["name"] == "shipping"
    assert messages["shop.orders.ship.result"]["payload"] == {"$ref": "#/components/schemas/Shipment"}
    # a handler that returns without publish_to answers requests: request-reply
    ask = operations["shop.prices.receive"]
    assert ask["reply"]["channel"] == {"$ref": "#/channels/shop.prices.reply"}
    assert channels["shop.prices.reply"]["address"] is None
    assert messages["shop.prices.body"] == {
        "name": "shop.prices.body",
        "contentType": "text/plain",
        "payload": {"type": "string"},
    }
    assert messages["shop.prices.result"]["payload"] == {"$ref": "#/components/schemas/Price"}
    assert messages["shop.blobs.body"]["contentType"] == "application/octet-stream"
    assert "reply" not in operations["shop.blobs.receive"]  # returns None: nothing to answer
    # every local $ref points at something in the document
    for ref in _all_refs(doc):
        node: Any = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]


def _all_refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            found.add(node["$ref"])
        for value in node.values():
            found |= _all_refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _all_refs(value)
    return found


def test_without_pydantic_dataclasses_and_typeddicts_are_described_from_annotations() -> None:
    schemas: dict[str, Any] = {}
    assert plain_schema(Shipment, schemas) == {"$ref": "#/components/schemas/Shipment"}
    assert schemas["Shipment"] == {
        "title": "Shipment",
        "type": "object",
        "properties": {"order": {"type": "integer"}, "carrier": {"type": "string"}},
        "required": ["order", "carrier"],
    }
    assert plain_schema(list[Price], schemas) == {
        "type": "array",
        "items": {"$ref": "#/components/schemas/Price"},
    }
    assert schemas["Price"]["required"] == ["cents", "sku"]
    assert plain_schema(dict[str, int], schemas) == {
        "type": "object",
        "additionalProperties": {"type": "integer"},
    }
    assert plain_schema(bytes, schemas) == {"type": "string", "format": "binary"}


def test_the_example_service_document_is_valid_and_the_cli_writes_json_and_yaml(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "asyncapi.json"
    ran = subprocess.run(
        [sys.executable, "-m", "rabbitflow", "asyncapi", "examples/orders.py:app", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    doc = json.loads(out.read_text())
    assert problems(doc) == []
    assert set(doc["channels"]) == {"orders.created", "orders.confirmed"}
    printed = subprocess.run(
        [sys.executable, "-m", "rabbitflow", "asyncapi", "examples/orders.py:app", "--format", "yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout) == doc
