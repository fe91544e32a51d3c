"""Body encoding and decoding."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from rabbitflow.codec import DecodeError, converter_for, decode, encode


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
    convert = converter_for(Point)
    assert convert is not None
    assert convert({"x": 1, "y": 2}, b"") == Point(1, 2)
    with pytest.raises(DecodeError, match="unexpected fields for Point: z"):
        convert({"x": 1, "y": 2, "z": 3}, b"")
    with pytest.raises(DecodeError, match="cannot build Point"):
        convert({"x": 1}, b"")
    with pytest.raises(DecodeError, match="expected a JSON object"):
        convert([1, 2], b"")


def test_pydantic_model_conversion() -> None:
    import pydantic

    class Item(pydantic.BaseModel):
        sku: str
        qty: int

    convert = converter_for(Item)
    assert convert is not None
    assert convert({"sku": "a", "qty": "3"}, b"").qty == 3
    with pytest.raises(DecodeError, match="qty"):
        convert({"sku": "a", "qty": "many"}, b"")
