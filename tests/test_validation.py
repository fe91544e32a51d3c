"""Bodies validated and converted by the handler's annotation (pydantic's TypeAdapter when
installed, a documented minimum without it), and the same types encoded on publish."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
import textwrap
import typing
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pydantic
import pytest
from typing_extensions import TypedDict

from rabbitflow import App, ConfigError
from rabbitflow.codec import decode, encode, reader_for
from rabbitflow.errors import DecodeError

from .helpers import Admin, unique, wait_for

JSON = "application/json"
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Line:
    sku: str
    qty: int


@dataclass
class Order:
    id: str
    lines: list[Line]


class Address(TypedDict):
    city: str
    zip: int


class Customer(pydantic.BaseModel):
    customer_id: int = pydantic.Field(alias="customerId")
    since: datetime.date
    address: Address
    orders: list[Order] = []

    @pydantic.field_validator("customer_id")
    @classmethod
    def positive(cls, value: int) -> int:
        assert value > 0, "customer ids are positive"
        if value == 13:
            raise TypeError("13 is no customer id")
        return value


def test_nested_dataclasses_are_converted_and_validated() -> None:
    read = reader_for(Order)
    assert read(b'{"id": "abc", "lines": [{"sku": "x", "qty": "2"}]}', JSON) == Order("abc", [Line("x", 2)])
    with pytest.raises(DecodeError) as info:
        read(b'{"id": "abc", "lines": [{"qty": "two"}]}', JSON)
    assert str(info.value) == (
        "invalid Order: lines.0.sku: Field required; lines.0.qty: Input should be a valid integer, "
        "unable to parse string as an integer (got 'two')"
    )


@pytest.mark.parametrize(
    ("annotation", "body", "expected"),
    [
        (list[Line], b'[{"sku": "a", "qty": 1}, {"sku": "b", "qty": "2"}]', [Line("a", 1), Line("b", 2)]),
        (dict[str, Line], b'{"first": {"sku": "a", "qty": 1}}', {"first": Line("a", 1)}),
        (Order | None, b"null", None),
        (typing.Optional[Line], b'{"sku": "a", "qty": 1}', Line("a", 1)),  # noqa: UP045 - Optional itself
        (Line | Address, b'{"city": "Oslo", "zip": "150"}', {"city": "Oslo", "zip": 150}),
        (Address, b'{"city": "Oslo", "zip": "150"}', {"city": "Oslo", "zip": 150}),
        (list[Address], b'[{"city": "Oslo", "zip": 1}]', [{"city": "Oslo", "zip": 1}]),
        (typing.Annotated[Line, "meta"], b'{"sku": "a", "qty": 1}', Line("a", 1)),
    ],
)
def test_containers_unions_and_typeddicts_of_them_are_converted(
    annotation: Any, body: bytes, expected: object
) -> None:
    assert reader_for(annotation)(body, JSON) == expected


@pytest.mark.parametrize(
    ("annotation", "body", "problem"),
    [
        (list[Line], b'[{"sku": "a", "qty": 1}, {"sku": "b"}]', "invalid list[Line]: 1.qty: Field required"),
        (dict[str, Line], b'{"k": 5}', "invalid dict[str, Line]: k: Input should be an object"),
        (Address, b'{"city": "Oslo"}', "invalid Address: zip: Field required"),
        (Address, b'{"city": "Oslo", "zip": "x"}', "zip: Input should be a valid integer"),
        (Order | None, b"[]", "invalid Order | None: Input should be an object"),
    ],
)
def test_a_body_its_annotation_refuses_is_a_decode_error(annotation: Any, body: bytes, problem: str) -> None:
    with pytest.raises(DecodeError) as info:
        reader_for(annotation)(body, JSON)
    assert problem in str(info.value)


def test_a_models_validators_raising_type_value_or_assertion_errors_are_decode_errors() -> None:
    read = reader_for(Customer)
    good = {"customerId": 7, "since": "2024-01-31", "address": {"city": "Oslo", "zip": 150}}
    customer = read(json.dumps(good).encode(), JSON)
    assert (customer.customer_id, customer.since, customer.address) == (
        7,
        datetime.date(2024, 1, 31),
        good["address"],
    )
    for value, problem in [
        (0, "invalid Customer: customerId: Assertion failed, customer ids are positive"),
        (13, "cannot build Customer: 13 is no customer id"),  # pydantic lets TypeError through
        ("x", "invalid Customer: customerId: Input should be a valid integer"),
    ]:
        with pytest.raises(DecodeError) as info:
            read(json.dumps({**good, "customerId": value}).encode(), JSON)
        assert str(info.value).startswith(problem), str(info.value)
        assert "\n" not in str(info.value)


def test_a_validation_error_stays_one_bounded_line() -> None:
    body = json.dumps([{"sku": "s" * 5000, "qty": "x" * 5000}] * 50).encode()
    with pytest.raises(DecodeError) as info:
        reader_for(list[Line])(body, JSON)
    message = str(info.value)
    assert "\n" not in message
    assert len(message) <= 1000
    assert message.startswith("invalid list[Line]: 0.qty: Input should be a valid integer")


def test_bodies_that_name_no_model_keep_the_plain_decoder() -> None:
    """The hot path is unchanged: dict, list[int], Any and unannotated bodies are decoded by
    content type and nothing validates them."""
    for annotation in (None, Any, object, dict, dict[str, Any], list[int], int):
        assert reader_for(annotation) is decode


class Opaque:
    """A class pydantic has no schema for."""


@dataclass
class Holder:
    thing: Opaque


@dataclass
class Early:
    later: Nowhere  # type: ignore[name-defined]  # noqa: F821 - a name never defined


def test_a_body_type_pydantic_cannot_validate_is_refused_when_decorating() -> None:
    app = App("svc", url="memory://")

    async def on_holder(body: Holder) -> None: ...

    with pytest.raises(ConfigError, match=r"@app.consumer\('q'\): pydantic cannot validate Holder: .*Opaque"):
        app.consumer("q")(on_holder)

    async def on_early(body: Early) -> None: ...

    with pytest.raises(
        ConfigError, match=r"pydantic cannot validate Early yet: a type it refers to is not defined"
    ):
        app.consumer("q")(on_early)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="typing.TypedDict works with pydantic from 3.12")
def test_typing_typeddict_on_python_311_is_refused_with_the_way_out() -> None:
    class Plain(typing.TypedDict):
        a: int

    async def handler(body: list[Plain]) -> None: ...

    handler.__annotations__["body"] = list[Plain]
    with pytest.raises(ConfigError, match=r"typing_extensions\.TypedDict"):
        App("svc", url="memory://").consumer("q")(handler)


def test_models_encode_by_alias_so_that_they_validate_back() -> None:
    customer = Customer.model_validate(
        {"customerId": 7, "since": "2024-01-31", "address": {"city": "Oslo", "zip": 150}, "orders": []}
    )
    data, content_type = encode(customer)
    assert content_type == JSON
    assert json.loads(data) == {
        "customerId": 7,
        "since": "2024-01-31",
        "address": {"city": "Oslo", "zip": 150},
        "orders": [],
    }
    assert reader_for(Customer)(data, JSON) == customer
    assert json.loads(encode([customer, Order("o", [Line("a", 1)])])[0])[1] == {
        "id": "o",
        "lines": [{"sku": "a", "qty": 1}],
    }


def test_types_orjson_does_not_know_encode_through_pydantic() -> None:
    @dataclass
    class Priced:
        price: Decimal
        tags: frozenset[str]

    assert json.loads(encode(Priced(Decimal("1.10"), frozenset({"a"})))[0]) == {
        "price": "1.10",
        "tags": ["a"],
    }
    with pytest.raises(TypeError, match="cannot encode object as JSON"):
        encode(object())


def test_import_rabbitflow_and_plain_handlers_never_import_pydantic() -> None:
    script = """
        import sys
        import rabbitflow
        app = rabbitflow.App("svc", url="memory://")
        @app.consumer("q")
        async def handle(body: dict) -> None: ...
        rabbitflow.codec.encode({"a": 1})
        assert "pydantic" not in sys.modules and "pydantic_core" not in sys.modules, "imported"
    """
    run_python(script)


def test_without_pydantic_dataclasses_and_typeddicts_get_the_documented_minimum() -> None:
    """docs/index.md, "Validated bodies": what is checked when pydantic is not installed."""
    script = """
        import json
        import sys
        sys.modules["pydantic"] = sys.modules["pydantic_core"] = None  # import fails: not installed
        from dataclasses import dataclass
        from typing import TypedDict
        from rabbitflow.codec import encode, reader_for
        from rabbitflow.errors import DecodeError

        @dataclass
        class Line:
            sku: str
            qty: int

        @dataclass
        class Order:
            id: str
            lines: list[Line]

        class Address(TypedDict):
            city: str
            zip: int

        def fails(read, body):
            try:
                read(body, "application/json")
            except DecodeError as exc:
                return str(exc)
            raise AssertionError(f"accepted {body!r}")

        read = reader_for(Order)
        # Built from the top-level keys; values not checked, nested dataclasses stay dicts.
        got = read(b'{"id": 1, "lines": [{"qty": "two"}], "extra": 0}', None)
        assert got == Order(1, [{"qty": "two"}]), got
        assert "cannot build Order" in fails(read, b'{"id": "a"}') and "lines" in fails(read, b'{"id": "a"}')
        assert fails(read, b"[1]") == "expected a JSON object for Order, got list"
        read = reader_for(Address)
        body = {"city": "Oslo", "zip": "x", "more": 1}
        assert read(json.dumps(body).encode(), None) == body
        assert fails(read, b'{"city": "Oslo"}') == "invalid Address: missing key(s) zip"
        assert reader_for(list[Line])(b'[{"a": 1}]', None) == [{"a": 1}]  # JSON, unchecked
        assert "invalid JSON body" in fails(reader_for(list[Line]), b"{")
        assert encode([Line("a", 1)])[0] == b'[{"sku":"a","qty":1}]'
        try:
            encode({"when": object()})
        except TypeError as exc:
            assert "is not JSON serializable" in str(exc), exc
        else:
            raise AssertionError("encoded an object")
    """
    run_python(script)


def run_python(script: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


# -- on the real broker ------------------------------------------------------------------------


async def test_a_dataclass_body_arrives_converted_and_an_invalid_one_is_parked(
    make_app: Callable[..., App], admin: Admin
) -> None:
    app = make_app()
    queue = unique("orders")
    received: list[Order] = []

    @app.consumer(queue, retries=2, delay=1)
    async def on_order(order: Order) -> None:
        received.append(order)

    async with app:
        await app.publish(
            {"id": "abc", "lines": [{"sku": "x", "qty": "two"}]}, routing_key=queue, message_id="bad"
        )
        await app.publish({"id": "abc", "lines": [{"sku": "x", "qty": "2"}]}, routing_key=queue)
        await wait_for(lambda: len(received) == 1)
        parked = None
        async with asyncio.timeout(10):
            while parked is None:
                parked = await admin.get(f"{queue}.parked")
    assert received == [Order("abc", [Line("x", 2)])]
    assert isinstance(received[0].lines[0], Line)
    properties = parked.header.properties
    assert properties.message_id == "bad"
    assert properties.headers["x-rf-reason"] == "decode-error"
    assert properties.headers["x-rf-attempts"] == 1  # never retried
    assert properties.headers["x-rf-error"] == (
        "invalid Order: lines.0.qty: Input should be a valid integer, unable to parse string as an "
        "integer (got 'two')"
    )
    assert json.loads(parked.body) == {"id": "abc", "lines": [{"sku": "x", "qty": "two"}]}


async def test_a_pydantic_model_round_trips_publish_to_consume(make_app: Callable[..., App]) -> None:
    app = make_app()
    queue = unique("customers")
    received: list[Customer] = []

    @app.consumer(queue)
    async def on_customer(customer: Customer) -> None:
        received.append(customer)

    sent = Customer(
        customerId=42,
        since=datetime.date(2020, 2, 29),
        address={"city": "Bergen", "zip": 5003},
        orders=[Order("o-1", [Line("a", 3)])],
    )
    async with app:
        await app.publish(sent, routing_key=queue)
        await app.publish([sent], routing_key=queue, message_id="list")  # a list encodes too
        await wait_for(lambda: len(received) >= 1)
    assert received[0] == sent
    assert received[0].orders[0].lines[0] == Line("a", 3)
