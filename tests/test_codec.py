"""Body encoding and decoding."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rabbitflow.codec import DecodeError, decode, encode, reader_for

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
    with pytest.raises(DecodeError, match="unexpected fields for Point: z"):
        read(b'{"x": 1, "y": 2, "z": 3}', JSON)
    with pytest.raises(DecodeError, match="cannot build Point"):
        read(b'{"x": 1}', JSON)
    with pytest.raises(DecodeError, match="expected a JSON object"):
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
    with pytest.raises(DecodeError, match="cannot build Quantity: qty must be positive, got 0"):
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
