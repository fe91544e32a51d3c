"""Body encoding and decoding; hostile bodies end as decode errors, on the real broker too."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pydantic
import pytest

from rabbitflow import App
from rabbitflow.codec import decode, encode, reader_for
from rabbitflow.errors import DecodeError

from .helpers import Admin, unique, wait_for

JSON = "application/json"


@dataclass
class Point:
    x: int
    y: int


def test_encode_by_type() -> None:
    assert encode({"a": [1, 2]}) == (b'{"a":[1,2]}', "application/json")
    assert encode(Point(1, 2)) == (b'{"x":1,"y":2}', "application/json")
    assert encode("hé") == ("hé".encode(), "text/plain; charset=utf-8")
    assert encode(b"\x00") == (b"\x00", "application/octet-stream")
    with pytest.raises(TypeError, match="cannot encode object as JSON"):
        encode(object())


def test_decode_by_content_type() -> None:
    assert decode(b'{"a":1}', "application/json") == {"a": 1}
    assert decode(b'{"a":1}', "application/vnd.api+json") == {"a": 1}
    assert decode("hé".encode("latin-1"), "text/plain; charset=latin-1") == "hé"
    assert decode(b"raw", None) == b"raw"
    assert decode(b"raw", "application/octet-stream") == b"raw"
    with pytest.raises(DecodeError, match="invalid JSON"):
        decode(b"{", "application/json")
    with pytest.raises(DecodeError, match="utf-8"):
        decode(b"\xff", "text/plain")


def test_dataclass_conversion_validates_fields() -> None:
    read = reader_for(Point)
    assert read(b'{"x": 1, "y": 2}', JSON) == Point(1, 2)
    assert read(b'{"x": 1, "y": 2}', None) == Point(1, 2)  # JSON without saying so
    assert read(b'{"x": "1", "y": 2}', JSON) == Point(1, 2)  # converted, as pydantic does
    assert read(b'{"x": 1, "y": 2, "z": 3}', JSON) == Point(1, 2)  # unknown keys ignored
    with pytest.raises(DecodeError, match=re.escape("invalid Point: y: Field required")):
        read(b'{"x": 1}', JSON)
    with pytest.raises(DecodeError, match=re.escape("invalid Point: x: Input should be a valid integer")):
        read(b'{"x": "one", "y": 2}', JSON)
    with pytest.raises(DecodeError, match="invalid Point: Input should be an object"):
        read(b"[1, 2]", JSON)
    with pytest.raises(DecodeError, match="invalid JSON body for Point"):
        read(b"x=1", "text/plain")


@dataclass
class Quantity:
    sku: str
    qty: int

    def __post_init__(self) -> None:
        if self.qty <= 0:
            raise ValueError(f"qty must be positive, got {self.qty}")


def test_a_dataclass_that_refuses_its_values_is_a_decode_error() -> None:
    read = reader_for(Quantity)
    assert read(b'{"sku": "a", "qty": 2}', JSON) == Quantity("a", 2)
    with pytest.raises(DecodeError, match="invalid Quantity: qty must be positive, got 0"):
        read(b'{"sku": "a", "qty": 0}', JSON)


def test_pydantic_model_conversion() -> None:
    import pydantic

    class Item(pydantic.BaseModel):
        sku: str
        qty: int

    read = reader_for(Item)
    assert read(b'{"sku": "a", "qty": "3"}', JSON).qty == 3
    with pytest.raises(DecodeError, match="qty"):
        read(b'{"sku": "a", "qty": "many"}', JSON)


def test_bytes_and_str_handlers_get_the_body_unparsed() -> None:
    """A handler that asks for bytes or str gets them even when the body is not valid JSON:
    nothing is parsed that the handler did not ask for, and nothing is parked for it."""
    assert reader_for(bytes)(b"{not json", JSON) == b"{not json"
    assert reader_for(str)(b"{not json", JSON) == "{not json"
    assert reader_for(str)("hé".encode("latin-1"), "text/plain; charset=latin-1") == "hé"
    with pytest.raises(DecodeError, match="not UTF-8"):
        reader_for(str)(b"\xff", JSON)
    assert reader_for(None)(b'{"a": 1}', JSON) == {"a": 1}


# -- hostile bodies: every failure to decode or validate is a DecodeError ----------------------


@pytest.mark.parametrize(
    ("body", "content_type", "problem"),
    [
        (b"\\x", "text/plain; charset=punycode", "invalid punycode text body: UnicodeError"),
        (b"abc-\xe9", "text/plain; charset=punycode", "invalid punycode text body"),
        (b"hi", "text/plain; charset=klingon", "charset 'klingon' is no text encoding"),
        (b"hi", "text/plain; charset=rot13", "charset 'rot13' is no text encoding"),
        (b"hi", "text/plain; charset=utf-8\x00", "invalid utf-8\x00 text body: ValueError"),
        (b"\xff", 'text/plain; charset="utf-8"', "invalid utf-8 text body"),
        (b"hi", "text/plain; charset=undefined", "invalid undefined text body: UnicodeError"),
    ],
)
def test_every_charset_failure_is_a_decode_error(body: bytes, content_type: str, problem: str) -> None:
    for read in (decode, reader_for(str), reader_for(Point)):
        with pytest.raises(DecodeError) as info:
            read(body, content_type)
        assert problem in str(info.value)


def test_a_quoted_charset_is_read() -> None:
    assert decode("hé".encode("latin-1"), 'text/plain; charset="latin-1"') == "hé"


class Stop(BaseException):
    """A BaseException of the user's own, raised from their validation code."""


class Picky(pydantic.BaseModel):
    sku: str

    @pydantic.field_validator("sku")
    @classmethod
    def known(cls, value: str) -> str:
        if value == "type":
            raise TypeError("sku must not be 'type'")  # pydantic passes TypeError through
        if value == "runtime":
            raise RuntimeError("lookup service down")
        if value == "base":
            raise Stop("stop")
        return value


@dataclass
class Strict:
    mode: str

    def __post_init__(self) -> None:
        failures: dict[str, BaseException] = {
            "key": KeyError("mode"),
            "runtime": RuntimeError("refused"),
            "exit": SystemExit(3),
            "cancel": asyncio.CancelledError(),
            "base": Stop("stop"),
        }
        if self.mode in failures:
            raise failures[self.mode]


@pytest.mark.parametrize(
    ("sku", "problem"),
    [
        ("type", "cannot build Picky: sku must not be 'type'"),
        ("runtime", "cannot build Picky: RuntimeError: lookup service down"),
        ("base", "cannot build Picky: Stop: stop"),
    ],
)
def test_a_pydantic_validator_raising_anything_is_a_decode_error(sku: str, problem: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(problem)):
        reader_for(Picky)(orjson.dumps({"sku": sku}), JSON)
    assert reader_for(Picky)(b'{"sku": "a"}', JSON).sku == "a"


@pytest.mark.parametrize(
    ("mode", "problem"),
    [
        ("key", "cannot build Strict: KeyError: 'mode'"),
        ("runtime", "cannot build Strict: RuntimeError: refused"),
        ("exit", "cannot build Strict: SystemExit: 3"),
        ("cancel", "cannot build Strict: CancelledError"),
        ("base", "cannot build Strict: Stop: stop"),
    ],
)
def test_a_post_init_raising_anything_is_a_decode_error(mode: str, problem: str) -> None:
    with pytest.raises(DecodeError, match=re.escape(problem)):
        reader_for(Strict)(orjson.dumps({"mode": mode}), JSON)


def test_a_keyboard_interrupt_is_not_the_bodys_fault() -> None:
    @dataclass
    class Interrupted:
        n: int

        def __post_init__(self) -> None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reader_for(Interrupted)(b'{"n": 1}', JSON)


@dataclass
class Order:
    n: int


async def test_hostile_bodies_from_an_outside_producer_are_parked_as_decode_errors(
    make_app: Callable[..., App], admin: Admin
) -> None:
    """Bodies an outside producer sends that fail to decode or validate are parked with
    `decode-error`, byte for byte, and the messages after them are handled."""
    app = make_app()
    text_q, model_q, strict_q = unique("text"), unique("model"), unique("strict")
    handled: list[object] = []

    @app.consumer(text_q, retries=1, delay=1)
    async def on_text(body: str) -> None:
        handled.append(body)

    @app.consumer(model_q, retries=1, delay=1)
    async def on_model(body: Picky) -> None:
        handled.append(body.sku)

    @app.consumer(strict_q, retries=1, delay=1)
    async def on_strict(body: Strict) -> None:
        handled.append(body.mode)

    hostile = [
        (text_q, b"\\x", "text/plain; charset=punycode"),
        (text_q, b"hi", "text/plain; charset=klingon"),
        (model_q, b'{"sku": "type"}', JSON),
        (model_q, b'{"sku": "runtime"}', JSON),
        (strict_q, b'{"mode": "runtime"}', JSON),
        (strict_q, b'{"mode": "exit"}', JSON),
        (strict_q, b'{"mode": "cancel"}', JSON),
    ]
    async with app:
        for n, (queue, body, content_type) in enumerate(hostile):
            await admin.publish(
                body, routing_key=queue, content_type=content_type, message_id=f"bad-{n}", delivery_mode=2
            )
        await admin.publish(b"plain text", routing_key=text_q, content_type="text/plain")
        await admin.publish(b'{"sku": "good"}', routing_key=model_q, content_type=JSON)
        await admin.publish(b'{"mode": "fine"}', routing_key=strict_q, content_type=JSON)
        await wait_for(lambda: len(handled) == 3)
        parked: dict[str, Any] = {}
        for queue in (text_q, model_q, strict_q):
            expected = sum(1 for q, _, _ in hostile if q == queue)
            await wait_for_count(admin, f"{queue}.parked", expected)
            for message in await admin.drain(f"{queue}.parked"):
                parked[message.header.properties.message_id] = message
        assert await admin.count(text_q) == await admin.count(model_q) == await admin.count(strict_q) == 0

    assert sorted(map(str, handled)) == ["fine", "good", "plain text"]
    assert sorted(parked) == [f"bad-{n}" for n in range(len(hostile))]
    for n, (queue, body, content_type) in enumerate(hostile):
        message = parked[f"bad-{n}"]
        headers = message.header.properties.headers
        assert headers["x-rf-reason"] == "decode-error", headers
        assert headers["x-rf-exception"] == "rabbitflow.errors.DecodeError"
        assert headers["x-rf-attempts"] == 1
        assert headers["x-rf-queue"] == queue
        assert message.body == body
        assert message.header.properties.content_type == content_type
    assert "punycode" in parked["bad-0"].header.properties.headers["x-rf-error"]
    assert "SystemExit" in parked["bad-5"].header.properties.headers["x-rf-error"]


async def wait_for_count(admin: Admin, queue: str, count: int, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while await admin.count(queue) < count:  # noqa: ASYNC110 - the broker's state
            await asyncio.sleep(0.05)
